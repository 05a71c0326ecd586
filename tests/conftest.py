"""Shared fixtures: a tiny random BERT classifier on disk and a toy keyword-sentiment data set."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from ziplm.tasks.classification import Example

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


def write_tiny_bert(out: Path) -> Path:
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
    BertForSequenceClassification(config).save_pretrained(out)
    return out


# verdicts of 5 paired measurements, then 7 and 9 while unsettled (a tiny model's timings always are): few, so that
# the suite stays fast, and enough to take the settling path
TINY_VERDICTS = {"finished_repeats": 5, "max_verdict_repeats": 9}


def tiny_recipe(model_dir: Path, data: Path, **overrides: Any) -> dict[str, Any]:
    """A recipe for the tiny BERT and toy task whose whole `ziplm run` takes seconds (one target, 1.3x)."""
    return {
        "name": "tiny",
        "model": str(model_dir),
        "task": {"data": str(data), "calibration_fraction": 0.25},
        "teacher": {"epochs": 1, "batch_size": 16, "max_length": 32},
        "environment": {"threads": 1, "sequence_length": 32},
        "latency_table": {"group_size": 16, "block_rounds": 5, "calibration_rounds": 5, "warmup": 1,
                          "random_calibration_models": 1},
        "calibration": {"samples": 32},
        "verification": {"tolerance": 0.5, "max_rounds": 2, "timing_rounds": 10, "warmup": 1, **TINY_VERDICTS},
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
    assert result.exit_code in (0, 1), result.output
    return root / "out"


# --- shapes for structure, export, runtime and latency-table tests ----------------------------------------------


def tiny_bert_config(hidden: int = 64, layers: int = 3, heads: int = 4, ffn: int = 128) -> BertConfig:
    return BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=ffn, max_position_embeddings=160, num_labels=2)


@pytest.fixture
def tiny_config() -> BertConfig:
    """3 layers, hidden 64, 4 heads of 16, FFN 128: small enough for CI, big enough to shrink unevenly."""
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
    from ziplm.stages.latency_table import TableSettings, build_table

    settings = TableSettings(group_size=32, block_rounds=5, calibration_rounds=5, warmup=1,
                             random_calibration_models=1, retakes=0)
    return build_table(tiny_bert_config(), InferenceEnv(threads=1, sequence_length=16), settings,
                       progress=lambda _: None)
