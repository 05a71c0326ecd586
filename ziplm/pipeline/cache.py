"""Fingerprints and the on-disk cache that every expensive stage writes into.

The cache lives outside git (default ~/.cache/ziplm, override with ZIPLM_CACHE). Entries are written to a
temporary name and renamed when complete, so an interrupted run never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; rename it to `final` only if the block completes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; artifacts and cache entries are meant to be shared
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


def cached_directory(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """Return cache_root()/kind/key, building it with `build(tmp_dir)` first when it does not exist."""
    final = cache_root() / kind / key
    if not final.exists():
        with atomic_directory(final) as tmp:
            build(tmp)
    return final
