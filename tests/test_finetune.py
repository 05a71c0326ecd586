"""Teacher fine-tuning on a tiny random BERT: caching, the saved directory, and that training learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ziplm.tasks.classification import TaskData, TaskSpec, load_task
from ziplm.stages.finetune import FinetuneConfig, evaluate_accuracy, finetune_teacher

QUICK = FinetuneConfig(epochs=1, batch_size=16, max_length=32)


@pytest.fixture
def toy_task(toy_sentiment_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TaskData:
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    return load_task(TaskSpec(data=str(toy_sentiment_csv)))


def test_second_call_is_cached(tiny_bert_dir: Path, toy_task: TaskData) -> None:
    lines: list[str] = []
    first = finetune_teacher(str(tiny_bert_dir), toy_task, QUICK, progress=lines.append)
    second = finetune_teacher(str(tiny_bert_dir), toy_task, QUICK, progress=lines.append)
    assert (first.cached, second.cached) == (False, True)
    assert (second.path, second.fingerprint) == (first.path, first.fingerprint)
    assert second.validation_accuracy == first.validation_accuracy
    assert first.validation_size == len(toy_task.validation) == 20
    assert [line.split(":")[0] for line in lines] == ["epoch 1/1", "teacher"]


def test_changed_config_trains_a_new_teacher(tiny_bert_dir: Path, toy_task: TaskData) -> None:
    first = finetune_teacher(str(tiny_bert_dir), toy_task, QUICK, progress=lambda _: None)
    reseeded = QUICK.model_copy(update={"seed": 1})
    other = finetune_teacher(str(tiny_bert_dir), toy_task, reseeded, progress=lambda _: None)
    assert not other.cached
    assert other.path != first.path


def test_teacher_directory_loads_with_labels_and_metrics(tiny_bert_dir: Path, toy_task: TaskData) -> None:
    result = finetune_teacher(str(tiny_bert_dir), toy_task, QUICK, progress=lambda _: None)
    model = AutoModelForSequenceClassification.from_pretrained(result.path)
    tokenizer = AutoTokenizer.from_pretrained(result.path)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    metrics = json.loads((result.path / "teacher.json").read_text())
    assert metrics["validation_accuracy"] == result.validation_accuracy
    assert metrics["train_size"] == len(toy_task.train)
    accuracy = evaluate_accuracy(model, tokenizer, toy_task.validation, max_length=32)
    assert accuracy == pytest.approx(result.validation_accuracy)


def test_training_learns_the_toy_task(tiny_bert_dir: Path, toy_task: TaskData) -> None:
    # The random tiny model sits at loss ~0.69 for 4-6 epochs before it learns; at 10 epochs 9 of 9 seed pairs
    # (initialisation x split) reached validation accuracy 1.0, so 12 epochs leave a margin.
    config = FinetuneConfig(epochs=12, learning_rate=2e-3, batch_size=16, max_length=32, warmup_fraction=0.0)
    result = finetune_teacher(str(tiny_bert_dir), toy_task, config, progress=lambda _: None)
    losses = json.loads((result.path / "teacher.json").read_text())["epoch_losses"]
    assert losses[-1] < losses[0]
    assert result.validation_accuracy >= 0.85  # chance is about 0.5; the label is one keyword in the sentence


class LogitsOnly(nn.Module):
    """A module that returns a bare logits tensor, as a pruned or wrapped model may."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.inner(**inputs).logits


def test_evaluate_accuracy_accepts_tensor_outputs_and_restores_mode(tiny_bert_dir: Path, toy_task: TaskData) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model.train()
    with_output = evaluate_accuracy(model, tokenizer, toy_task.validation, batch_size=7)
    assert model.training
    assert evaluate_accuracy(LogitsOnly(model), tokenizer, toy_task.validation) == pytest.approx(with_output)


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValidationError):
        FinetuneConfig(epoch=3)
    with pytest.raises(ValidationError):
        FinetuneConfig(learning_rate=0.0)
