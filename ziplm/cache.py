"""Fingerprints, the on-disk cache, and the one mechanism that makes every stage of a run resumable.

The cache lives outside git (default ~/.cache/ziplm, override with ZIPLM_CACHE). Entries are written to a hidden
temporary name (`.NAME.partial-PID-...`) and renamed when complete, so an interrupted run never leaves a half-written
entry behind; the next build of the same entry removes temporary folders whose process has died.

Every cached result of the product is a stage: one call of `StageCache.run`, cached under a fingerprint of exactly
its inputs (pass the upstream stages' keys among them), so a rerun reuses every finished stage and a changed input
rebuilds only the stages that depend on it. A stage writes files into its folder (JSON, safetensors, ONNX, a saved
model) and reads its value back from them; nothing is pickled, so an entry outlives the code that wrote it:

    stages = StageCache(cache_root() / "stages", progress)
    hessians = stages.run("calibrate", {"teacher": teacher_key, "settings": settings.model_dump()},
                          build=lambda folder, progress: save_hessians(collect_hessians(...), folder),
                          read=load_hessians)

`SCHEMA_VERSION` is part of every key: raising it retires every entry written in an older layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Progress = Callable[[str], None]
StageProgress = Callable[[str], Progress]
SCHEMA_VERSION = 2  # the layout of stage folders; 1 pickled values


def cache_root() -> Path:
    root = Path(os.environ.get("ZIPLM_CACHE", Path.home() / ".cache" / "ziplm"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def fingerprint(payload: Any) -> str:
    """A short stable hash of any JSON-serialisable payload (dict keys are sorted)."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def directory_digest(path: Path) -> str:
    """Digest of every file under a directory (names and contents), for fingerprinting model directories."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file_digest(file).encode())
    return digest.hexdigest()[:16]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(final: Path) -> None:
    """Remove the temporary folders of `final` left by processes that were killed while building it."""
    for partial in final.parent.glob(f".{final.name}.partial-*"):
        pid = partial.name.removeprefix(f".{final.name}.partial-").split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; rename it to `final` only if the block completes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
        share(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def share(folder: Path) -> None:
    """Folders 0755 and files 0644 below and including `folder`: mkdtemp and some writers (safetensors) make them
    private, while artifacts and cache entries are meant to be read by other users (a serving process, a CI job)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a hidden temporary name beside `path`, then rename: a reader sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.replace(path)


@dataclass(frozen=True)
class StageResult(Generic[T]):
    """A stage's output: its value, its folder (the files the value was read from), its key and whether reused."""

    name: str
    key: str
    path: Path
    value: T
    cached: bool


class StageCache:
    """Runs stages, each cached under root/<stage name>/<fingerprint of its inputs>."""

    def __init__(self, root: Path, stage: StageProgress) -> None:
        self.root = Path(root)
        self.stage = stage

    def run(self, name: str, inputs: Mapping[str, Any], build: Callable[[Path, Progress], None],
            read: Callable[[Path], T], label: str | None = None, rebuild: bool = False) -> StageResult[T]:
        """`read(folder)` of the folder `build(folder, progress)` wrote for these inputs; built (atomically) only when
        missing, or when `rebuild`. `label` names the stage in progress lines when several calls share a stage
        name (one per target)."""
        key = fingerprint({"stage": name, "schema": SCHEMA_VERSION, **inputs})
        progress = self.stage(label or name)
        final = self.root / name / key
        if final.exists() and not rebuild:
            progress(f"cached ({key})")
            return StageResult(name, key, final, read(final), True)
        start = time.perf_counter()
        with atomic_directory(final) as folder:
            build(folder, progress)
        progress(f"done in {time.perf_counter() - start:.1f} s ({key})")
        return StageResult(name, key, final, read(final), False)


def default_stages(progress: Progress | None = None) -> StageCache:
    """The product's stage cache (cache_root()/stages), reporting every stage to `progress` (default: print)."""
    return StageCache(cache_root() / "stages", lambda _: progress or print)
