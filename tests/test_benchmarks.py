"""The benchmarks stay runnable as the library changes: every module imports, its command line parses, and every
stored result renders again to the markdown beside it (no timing: the renderers read the stored JSON)."""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import benchmarks

RESULTS = Path(benchmarks.__file__).parent / "results"
MODULES = sorted(name for _, name, is_package in pkgutil.walk_packages(benchmarks.__path__, "benchmarks.")
                 if not is_package)
# stored result -> (module, how its markdown is rendered from the stored JSON)
RENDERERS: dict[str, tuple[str, Callable[[Any, dict[str, Any]], str]]] = {
    "accuracy_vs_speedup": ("benchmarks.accuracy_vs_speedup", lambda m, r: m.markdown(r["tasks"])),
    "compound": ("benchmarks.compound", lambda m, r: m.markdown(r)),
    "cost": ("benchmarks.cost", lambda m, r: m.markdown(r["models"], r.get("commit"))),
    "int8_parity": ("benchmarks.int8_parity", lambda m, r: m.markdown(r["runs"])),
    "int8_speedup": ("benchmarks.int8_speedup", lambda m, r: m.markdown(r)),
    "latency_prediction": ("benchmarks.latency_prediction", lambda m, r: m.markdown(m.Result.from_json(r))),
    "obert_oneshot": ("benchmarks.obert_oneshot", lambda m, r: m.markdown(r)),
    "speedup_guarantee": ("benchmarks.speedup_guarantee", lambda m, r: m.markdown(r["models"])),
    "contention": ("benchmarks.measurement.contention", lambda m, r: m.markdown(r)),
    "round_structures": ("benchmarks.measurement.round_structures", lambda m, r: m.markdown(r)),
    "table_contention": ("benchmarks.measurement.table_contention", lambda m, r: m.markdown(r)),
    "verdict_drift": ("benchmarks.measurement.verdict_drift", lambda m, r: m.markdown(r)),
    "verdict_settling": ("benchmarks.measurement.verdict_settling", lambda m, r: m.markdown(r)),
}


@pytest.mark.parametrize("name", [m for m in MODULES if m != "benchmarks.common"])
def test_every_benchmark_imports_and_its_command_line_parses(name, monkeypatch, capsys):
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


def test_every_stored_result_has_a_renderer():
    assert {path.stem for path in RESULTS.glob("*.json")} == set(RENDERERS)


@pytest.mark.parametrize("name", sorted(RENDERERS))
def test_a_stored_result_renders_to_the_markdown_beside_it(name, monkeypatch, tmp_path):
    module_name, render = RENDERERS[name]
    module = importlib.import_module(module_name)
    monkeypatch.setattr(module, "RESULTS", tmp_path, raising=False)  # plots drawn on the way go here, not over ours
    stored = json.loads((RESULTS / f"{name}.json").read_text())
    assert render(module, stored) == (RESULTS / f"{name}.md").read_text()
