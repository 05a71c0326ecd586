"""Shared fixtures: a tiny random BERT classifier on disk and a toy keyword-sentiment data set."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertTokenizerFast

from ziplm.runtimes.policy import policy
from ziplm.tasks import Example
from ziplm.tasks.classification import ClassificationTask

POSITIVE_WORDS = ["good", "great", "fine", "nice"]
NEGATIVE_WORDS = ["bad", "awful", "poor", "dull"]
FILLER_WORDS = ["the", "a", "movie", "film", "was", "is", "very", "plot", "actor", "story", "and", "quite"]
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE_WORDS, *NEGATIVE_WORDS, *FILLER_WORDS]

WriteTaskFile = Callable[[str, list[dict[str, Any]]], Path]


def toy_sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n distinct sentences of filler words with one sentiment word; the label follows the sentiment word."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        label = rng.choice(["positive", "negative"])
        words = rng.choices(FILLER_WORDS, k=rng.randint(3, 8))
        sentiment = rng.choice(POSITIVE_WORDS if label == "positive" else NEGATIVE_WORDS)
        words.insert(rng.randrange(len(words) + 1), sentiment)
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    return rows


def toy_examples(n: int, seed: int = 0) -> list[Example]:
    """toy_sentiment_rows as task examples (negative=0, positive=1), for stages that take examples directly."""
    return [Example(row["text"], None, int(row["label"] == "positive")) for row in toy_sentiment_rows(n, seed)]


def toy_task(n: int = 96, seed: int = 0, max_length: int = 32, batch_size: int = 16) -> ClassificationTask:
    """A classification task over toy examples: half train, a quarter validation, a quarter calibration."""
    examples = toy_examples(n, seed)
    train, validation, calibration = examples[: n // 2], examples[n // 2: 3 * n // 4], examples[3 * n // 4:]
    return ClassificationTask(label_names=["negative", "positive"], dropped_rows=0, name="toy", train=train,
                              validation=validation, calibration=calibration, fingerprint=f"toy-{n}-{seed}",
                              max_length=max_length, batch_size=batch_size)


@pytest.fixture
def write_task_file(tmp_path: Path) -> WriteTaskFile:
    """Write rows (dicts) to tmp_path/name as CSV (header from the first row) or JSONL, chosen by the suffix."""

    def write(name: str, rows: list[dict[str, Any]]) -> Path:
        path = tmp_path / name
        if path.suffix == ".jsonl":
            path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
            return path
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path

    return write


@pytest.fixture
def toy_sentiment_csv(write_task_file: WriteTaskFile) -> Path:
    """160 distinct toy rows (text,label), balanced within sampling noise, in a CSV file."""
    return write_task_file("toy.csv", toy_sentiment_rows(160))


@pytest.fixture
def tiny_bert_dir(tmp_path: Path) -> Path:
    """A randomly initialised 2-layer BERT classifier (hidden 32, 2 heads, 2 labels) with its tokenizer, on disk."""
    return write_tiny_bert(tmp_path / "tiny-bert")


def write_tiny_bert(out: Path, head: bool = True) -> Path:
    """The tiny BERT of `tiny_bert_dir` in `out`; with `head=False` a pretraining checkpoint instead (a masked-LM
    head, no classification head): loading it for a task finds missing and unexpected keys."""
    out.mkdir(parents=True)
    (out / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    # from_pretrained reads vocab.txt; transformers 5 ignores a `vocab_file=` argument to the constructor.
    tokenizer = BertTokenizerFast.from_pretrained(out)
    assert tokenizer.unk_token_id not in tokenizer("a good film")["input_ids"]
    tokenizer.save_pretrained(out)
    config = BertConfig(
        vocab_size=len(TINY_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    torch.manual_seed(0)
    (BertForSequenceClassification if head else BertForMaskedLM)(config).save_pretrained(out)
    return out


def write_gguf_header(path: Path, architecture: str) -> Path:
    """A GGUF file that names `architecture` and holds no tensors."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_recipe(model_dir: Path, data: Path, **overrides: Any) -> dict[str, Any]:
    """A recipe for the tiny BERT and toy task whose whole `ziplm run` takes seconds (one target, 1.3x)."""
    return {
        "name": "tiny",
        "model": str(model_dir),
        "task": {"data": str(data), "calibration_fraction": 0.25, "max_length": 32, "batch_size": 16},
        "teacher": {"epochs": 1},
        "environment": {"threads": 1, "sequence_length": 32},
        "effort": "quick",  # verdicts of 5 to 9 measurements: few, and enough to take the settling path
        "latency_table": {"group_size": 16},
        "calibration": {"samples": 32},
        "verification": {"tolerance": 0.5, "max_rounds": 2},
        "targets": [1.3],
    } | overrides


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of one `ziplm run` of the tiny recipe with a 1.3x target and a loose p90 SLA."""
    from typer.testing import CliRunner

    from ziplm.pipeline.cli import app

    root = tmp_path_factory.mktemp("family")
    data = root / "toy.csv"
    data.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in toy_sentiment_rows(160)))
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(write_tiny_bert(root / "tiny-bert"), data,
                                                 slas=[{"p90_ms": 1000.0}])))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZIPLM_CACHE", str(root / "cache"))
        result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(root / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.output  # built to pass: a tolerance far wider than the noise
    (root / "run.log").write_text(result.output)  # what the user saw (tests/test_artifacts.py)
    return root / "out"


# --- shapes for structure, export, runtime and latency-table tests ----------------------------------------------


SIZES = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
         "ffn": "intermediate_size"}


def tiny_bert_config(**sizes: int) -> BertConfig:
    """The BERT adapter's tiny config (3 layers, hidden 64, 4 heads of 16, FFN 128: small enough for CI, big enough to
    shrink unevenly), with any of `SIZES` changed."""
    from ziplm.families.bert import BertAdapter

    config = BertAdapter().tiny_config()
    for size, value in sizes.items():
        setattr(config, SIZES[size], value)
    return config


@pytest.fixture
def tiny_config() -> BertConfig:
    return tiny_bert_config()


# --- markers: slow tests run only with --runslow (the benchmarks run them) --------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (or `make test-all`)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


# --- a real latency table for the tiny shape, measured once per test session ------------------------------------


@pytest.fixture(scope="session")
def tiny_table():
    from ziplm.runtimes import InferenceEnv
    from ziplm.stages.latency_table import build_table

    return build_table(tiny_bert_config(), InferenceEnv(threads=1, sequence_length=16), 32, QUICK_UNGUARDED,
                       progress=lambda _: None)


# the quick policy without retakes: the guard has its own tests; here a loaded machine must not slow the build
QUICK_UNGUARDED = dataclasses.replace(policy("quick"), retakes=0)


# --- a real PairedVerifier whose paired timings are scripted -------------------------------------------------


@pytest.fixture
def tiny_verifier(tmp_path, monkeypatch):
    """A real PairedVerifier beside a tiny exported model, whose paired timings report the other loads it is given."""
    import ziplm.runtimes.paired as paired
    import ziplm.runtimes.timing as timing
    from ziplm.families import adapter_for
    from ziplm.families.loading import build_model
    from ziplm.runtimes import InferenceEnv, get_runtime
    from ziplm.runtimes.timing import Speedup, TimingStats
    from ziplm.stages.export import export_model

    env = InferenceEnv(threads=1, sequence_length=16)
    config = tiny_bert_config()
    onnx = export_model(build_model(config), tmp_path / "model.onnx", 1, 16)
    loads: list[float | None] = []

    def time_paired(*_, **__):
        load = loads.pop(0) if loads else 0.0
        value = SCRIPTED.pop(0) if SCRIPTED else 2.0 + (load or 0.0)
        return Speedup(value, 1.9, 2.1, 0.95, 60, load), TimingStats((10.0,)), TimingStats((5.0,))

    monkeypatch.setattr(paired, "time_paired", time_paired)
    monkeypatch.setattr(timing, "RETAKE_PAUSE_S", 0.0)
    inputs = adapter_for(config).example_inputs(config, 1, 16)
    standard = policy("standard")  # verdicts of 9 to 27 measurements, 3 retakes above 0.1 cores of other load
    assert (standard.verdict_repeats, standard.max_verdict_repeats, standard.retakes) == (9, 27, 3)
    return paired.PairedVerifier(get_runtime(env), env, onnx, inputs, standard, 0.03), onnx, loads


SCRIPTED: list[float] = []  # tiny_verifier's scripted speedups (after them: 2 + the load)


@pytest.fixture
def speedups() -> list[float]:
    """The speedups tiny_verifier's paired timings return, in order; emptied after each test."""
    yield SCRIPTED
    SCRIPTED.clear()


REQUIRED_ENGINES = "ZIPLM_REQUIRE_ENGINES"  # e.g. "deepsparse": `make test` sets it after installing the engine


def skip_missing_engine(runtime: str, reason: str) -> None:
    """Skip a test whose runtime's engine is not on this machine, or fail it where the engine is required (CI)."""
    if runtime in os.environ.get(REQUIRED_ENGINES, "").split(","):
        pytest.fail(f"runtime {runtime} is required here ({REQUIRED_ENGINES}) but missing: {reason}")
    pytest.skip(reason)
