"""Teacher fine-tuning on a tiny random BERT: caching, the saved directory, and that training learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import toy_sentiment_rows
from ziplm.stages.finetune import FinetuneConfig, finetune_teacher, training_line
from ziplm.tasks import Task, TaskSpec, load_task

QUICK = FinetuneConfig(epochs=1)


@pytest.fixture
def toy_task(toy_sentiment_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Task:
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    return load_task(TaskSpec(data=str(toy_sentiment_csv), max_length=32, batch_size=16))


def test_second_call_is_cached(tiny_bert_dir: Path, toy_task: Task) -> None:
    lines: list[str] = []
    first = finetune_teacher(str(tiny_bert_dir), toy_task, QUICK, progress=lines.append)
    second = finetune_teacher(str(tiny_bert_dir), toy_task, QUICK, progress=lines.append)
    assert (first.cached, second.cached) == (False, True)
    assert (second.path, second.fingerprint) == (first.path, first.fingerprint)
    assert second.metric == first.metric
    assert (first.metric.name, first.metric.size) == ("accuracy", len(toy_task.validation))
    assert len(toy_task.validation) == 20
    # the tiny checkpoint's head has 2 labels, as the task: it is kept and fine-tuned
    assert lines[0] == f"{tiny_bert_dir} is fine-tuned with its own sequence-classification head"
    assert lines[-4].startswith("epoch 1/1 [####################] step 8/8, loss ")
    assert lines[-3].startswith("teacher: validation accuracy")
    assert lines[-2] == f"done in {lines[-2].split()[2]} s ({first.fingerprint})"  # the first call built the stage
    assert lines[-1] == f"cached ({first.fingerprint})"  # the second one read it


def test_changed_config_trains_a_new_teacher(tiny_bert_dir: Path, toy_task: Task) -> None:
    first = finetune_teacher(str(tiny_bert_dir), toy_task, QUICK, progress=lambda _: None)
    reseeded = QUICK.model_copy(update={"seed": 1})
    other = finetune_teacher(str(tiny_bert_dir), toy_task, reseeded, progress=lambda _: None)
    assert not other.cached
    assert other.path != first.path


def test_teacher_directory_loads_with_labels_and_metrics(tiny_bert_dir: Path, toy_task: Task) -> None:
    result = finetune_teacher(str(tiny_bert_dir), toy_task, QUICK, progress=lambda _: None)
    model = AutoModelForSequenceClassification.from_pretrained(result.path)
    tokenizer = AutoTokenizer.from_pretrained(result.path)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    metrics = json.loads((result.path / "teacher.json").read_text())
    assert metrics["metric"]["value"] == result.metric.value
    assert metrics["train_size"] == len(toy_task.train)
    assert toy_task.evaluate(model, tokenizer).value == pytest.approx(result.metric.value)


def test_training_learns_the_toy_task(tiny_bert_dir: Path, toy_task: Task) -> None:
    # The random tiny model sits at loss ~0.69 for 4-6 epochs before it learns; at 10 epochs 9 of 9 seed pairs
    # (initialisation x split) reached validation accuracy 1.0, so 12 epochs leave a margin.
    config = FinetuneConfig(epochs=12, learning_rate=2e-3, warmup_fraction=0.0)
    result = finetune_teacher(str(tiny_bert_dir), toy_task, config, progress=lambda _: None)
    losses = json.loads((result.path / "teacher.json").read_text())["epoch_losses"]
    assert losses[-1] < losses[0]
    assert result.metric.value >= 0.85  # chance is about 0.5; the label is one keyword in the sentence


class LogitsOnly(nn.Module):
    """A module that returns a bare logits tensor, as a pruned or wrapped model may."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.inner(**inputs).logits


def test_evaluate_accepts_tensor_outputs_and_restores_mode(tiny_bert_dir: Path, toy_task: Task) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model.train()
    with_output = toy_task.evaluate(model, tokenizer)
    assert model.training
    assert toy_task.evaluate(LogitsOnly(model), tokenizer) == with_output
    model.eval()
    with torch.no_grad():  # the metric is the fraction of argmax predictions equal to the label
        batch = toy_task.encode(tokenizer, toy_task.validation)
        predicted = model(**batch).logits.argmax(-1)
    expected = float((predicted == toy_task.targets(toy_task.validation, predicted.device)).float().mean())
    assert with_output.value == pytest.approx(expected)


def test_a_head_of_another_size_is_replaced_by_a_fresh_one(tiny_bert_dir: Path, write_task_file, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny checkpoint has a 2-label head; a 3-label task gets a fresh 3-label head, trained by the fine-tune."""
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    rows = [{**row, "label": row["label"] if i % 3 else "neutral"} for i, row in enumerate(toy_sentiment_rows(96))]
    task = load_task(TaskSpec(data=str(write_task_file("three.csv", rows)), max_length=32, batch_size=16))
    lines: list[str] = []
    result = finetune_teacher(str(tiny_bert_dir), task, QUICK, progress=lines.append)
    model = AutoModelForSequenceClassification.from_pretrained(result.path)
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    assert lines[0] == f"a new sequence-classification head is trained on top of {tiny_bert_dir}"


def test_training_line_shows_a_bar_step_loss_and_time_left() -> None:
    assert training_line(1, 3, 40, 120, 0.41234, 60.0) == ("epoch 1/3 [#######.............] step 40/120, loss 0.4123, "
                                                           "2:00 left")


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValidationError):
        FinetuneConfig(epoch=3)
    with pytest.raises(ValidationError):
        FinetuneConfig(learning_rate=0.0)
