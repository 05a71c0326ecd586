"""What every benchmark script shares: where results go, how they are written, how progress is shown."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from ziplm.pipeline.cache import write_json_atomic

RESULTS = Path(__file__).parent / "results"


def progress(stage: str) -> Callable[[str], None]:
    return lambda message: print(f"[{stage}] {message}", flush=True)


def write_results(name: str, result: Any, markdown: str) -> None:
    """benchmarks/results/NAME.json and NAME.md; the markdown is also printed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / f"{name}.json", asdict(result) if is_dataclass(result) else result)
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
