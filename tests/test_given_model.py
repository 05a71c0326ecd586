"""`teacher: none`: a trained classifier is the dense reference as it is, its labels matched by name, never
silently reordered; a model that cannot serve the task as it is gets a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

from tests.conftest import tiny_recipe, write_tiny_bert
from ziplm.errors import BadInputError
from ziplm.pipeline.recipe import parse_recipe
from ziplm.stages.finetune import FinetuneConfig, finetune_teacher
from ziplm.tasks import TaskSpec, load_task
from tests.test_pipeline import invoke

LEARNS = FinetuneConfig(epochs=12, learning_rate=2e-3, warmup_fraction=0.0)  # reaches >= 0.85 (test_finetune)


@pytest.fixture
def toy_task(toy_sentiment_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    return load_task(TaskSpec(data=str(toy_sentiment_csv), max_length=32, batch_size=16))


def reversed_classifier(trained: Path, out: Path) -> Path:
    """The trained classifier with its output rows swapped and id2label {0: positive, 1: negative}: the same
    predictions by name, the opposite ones by sorted label id."""
    model = AutoModelForSequenceClassification.from_pretrained(trained)
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight[[1, 0]])
        model.classifier.bias.copy_(model.classifier.bias[[1, 0]])
    model.config.id2label, model.config.label2id = {0: "positive", 1: "negative"}, {"positive": 0, "negative": 1}
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(trained).save_pretrained(out)
    return out


def test_a_trained_classifier_runs_as_it_is_with_its_labels_matched_by_name(toy_task, toy_sentiment_csv,
                                                                             tiny_bert_dir, tmp_path, monkeypatch):
    trained = finetune_teacher(str(tiny_bert_dir), toy_task, LEARNS, progress=lambda _: None)
    assert trained.metric.value >= 0.85
    given = reversed_classifier(trained.path, tmp_path / "given")
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(given, toy_sentiment_csv, teacher="none")))
    result = invoke("run", str(recipe), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert steps == []  # nothing was trained
    assert report["dense"]["origin"] == "given"
    assert report["dense"]["metric"]["value"] == pytest.approx(trained.metric.value)  # not 1 - it
    assert "the given model, used as it is" in (tmp_path / "out" / "report.md").read_text()
    assert "used as it is (teacher: none)" in result.output


def test_a_model_without_a_classification_head_is_refused(toy_task, tmp_path):
    headless = write_tiny_bert(tmp_path / "headless", head=False)
    with pytest.raises(BadInputError, match="has no trained classification head.*teacher: {epochs: 3}"):
        toy_task.given_model(str(headless))


def test_labels_that_differ_are_an_error_listing_both(toy_task):
    config = BertConfig(id2label={0: "spam", 1: "ham"})
    with pytest.raises(BadInputError, match=r"model's labels \(spam, ham, by output row\) are not the task's labels "
                                            r"\(negative, positive\)"):
        toy_task.aligned_to(config)


def test_the_same_label_order_keeps_the_task_and_another_order_relabels_it(toy_task):
    assert toy_task.aligned_to(BertConfig(id2label={0: "negative", 1: "positive"})) is toy_task
    flipped = toy_task.aligned_to(BertConfig(id2label={0: "positive", 1: "negative"}))
    assert flipped.label_names == ["positive", "negative"] and flipped.fingerprint != toy_task.fingerprint
    for before, after in zip(toy_task.validation, flipped.validation):
        assert toy_task.label_names[before.label] == flipped.label_names[after.label]


def test_default_label_names_match_labels_written_as_integers(write_task_file, tmp_path, monkeypatch):
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    rows = [{"text": f"film {i}", "label": str(i % 2)} for i in range(40)]
    task = load_task(TaskSpec(data=str(write_task_file("digits.csv", rows))))
    assert task.aligned_to(BertConfig(num_labels=2)) is task  # id2label LABEL_0, LABEL_1


def test_the_recipe_takes_teacher_none_and_still_refuses_zero_epochs():
    base = "name: r\nmodel: minilm\ntask: {data: mr}\n"
    assert parse_recipe(base + "teacher: none\n").teacher == "none"
    with pytest.raises(BadInputError, match="teacher"):
        parse_recipe(base + "teacher: {epochs: 0}\n")
