"""Sequence classification: read a CSV/JSONL file, map labels to ids, split it reproducibly; cross-entropy loss,
accuracy metric.

Recipe snippet::

    task:
      type: classification      # the default
      data: mr                  # or rotten_tomatoes, or a path to a .csv / .tsv / .jsonl file
      text_column: text
      text_pair_column: null    # a second text segment (sentence pairs), optional
      label_column: label
      validation_fraction: 0.125
      calibration_fraction: 0.125
      max_examples: null        # keep only the first N of the stratified order
      max_length: 128           # tokens per example, everywhere (training, calibration, scoring)
      batch_size: 32            # examples per batch, everywhere
      seed: 0

The examples are read and split by the rules of ziplm.tasks.data (rows with an empty text, pair or label are
dropped and counted in ``ClassificationTask.dropped_rows``; a stratified, seeded split). Label ids follow the sorted
unique label strings (``["negative", "positive"]`` gives negative=0, positive=1); a classifier used as it is
(``teacher: none``) reads them in its own ``id2label`` order instead (``ClassificationTask.aligned_to``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from ziplm.assets import TASK_FILES, load_pretrained, resolve_model, resolve_task_file
from ziplm.cache import file_digest, fingerprint
from ziplm.errors import BadInputError
from ziplm.tasks.base import Example, Task
from ziplm.tasks.data import DataSpec, read_records, split, stratified_order, usable_rows

ATTENTION = "eager"  # ONNX Runtime fuses Attention only for eagerly exported models


class TaskSpec(DataSpec):
    """Where a classification task's examples are and how to split them (see the module docstring)."""

    type: Literal["classification"] = "classification"
    text_pair_column: str | None = None
    label_column: str = "label"


class ClassificationTask(Task):
    """Sequence classification: cross-entropy against label ids, scored by accuracy."""

    metric_name = "accuracy"
    higher_is_better = True
    head = "sequence-classification"

    def __init__(self, label_names: list[str], dropped_rows: int, **splits: Any) -> None:
        super().__init__(**splits)
        self.label_names = label_names
        self.dropped_rows = dropped_rows

    def new_model(self, source: str) -> tuple[PreTrainedModel, bool]:
        """The checkpoint with a classification head of this task's labels, and whether the head is new: a head of
        another size, or none, is replaced by a fresh one (trained by the fine-tune that follows)."""
        model, loading = load_pretrained(
            AutoModelForSequenceClassification.from_pretrained, resolve_model(source),
            num_labels=len(self.label_names), id2label=dict(enumerate(self.label_names)),
            label2id={name: i for i, name in enumerate(self.label_names)}, ignore_mismatched_sizes=True,
            output_loading_info=True, attn_implementation=ATTENTION)
        return model, bool(loading["missing_keys"] or loading["mismatched_keys"])

    def adopt(self, source: str) -> tuple[ClassificationTask, PreTrainedModel]:
        model = self.given_model(source)
        return self.aligned_to(model.config), model

    def given_model(self, source: str) -> PreTrainedModel:
        """The trained classifier at `source` as it is (its labels must be this task's: `aligned_to`)."""
        model, loading = load_pretrained(AutoModelForSequenceClassification.from_pretrained, resolve_model(source),
                                         output_loading_info=True, attn_implementation=ATTENTION)
        if loading["missing_keys"]:
            raise BadInputError(
                f"{source} has no trained classification head (its weights lack {', '.join(loading['missing_keys'])}),"
                " so it cannot be used as it is: fine-tune it on the task instead (teacher: {epochs: 3})")
        return model

    def aligned_to(self, config: PretrainedConfig) -> ClassificationTask:
        """This task with label ids in the order of the model's `id2label`, matched by name. transformers' default
        names (LABEL_0, LABEL_1, ...) match labels written as the integers 0, 1, ...; any other difference in the
        label sets is a BadInputError listing both, never a silent reordering."""
        order = model_label_order(config, self.label_names)
        if order == self.label_names:
            return self
        new_id = {old: order.index(name) for old, name in enumerate(self.label_names)}

        def relabel(examples: list[Example]) -> list[Example]:
            return [dataclasses.replace(e, label=new_id[e.label]) for e in examples]

        return ClassificationTask(label_names=order, dropped_rows=self.dropped_rows, name=self.name,
                                  train=relabel(self.train), validation=relabel(self.validation),
                                  calibration=relabel(self.calibration),
                                  fingerprint=fingerprint({"task": self.fingerprint, "label_order": order}),
                                  max_length=self.max_length, batch_size=self.batch_size)

    def targets(self, batch: Sequence[Example], device: torch.device) -> torch.Tensor:
        return torch.tensor([e.label for e in batch], device=device)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return float((outputs.argmax(dim=-1) == targets).sum())


def model_label_order(config: PretrainedConfig, label_names: list[str]) -> list[str]:
    """The task's label strings in the order of the model's output rows (see ClassificationTask.aligned_to)."""
    model_names = [str(config.id2label[i]) for i in range(config.num_labels)]
    if sorted(model_names) == sorted(label_names):
        return model_names
    defaults = [f"LABEL_{i}" for i in range(len(model_names))]
    if model_names == defaults and sorted(label_names) == sorted(str(i) for i in range(len(model_names))):
        return [str(i) for i in range(len(model_names))]
    raise BadInputError(
        f"the model's labels ({', '.join(model_names)}, by output row) are not the task's labels "
        f"({', '.join(label_names)}): a classifier is used as it is only for the labels it was trained on. Point "
        "label_column at the column with these labels, or fine-tune the model on the task (teacher: {epochs: 3})")


def load_classification(spec: TaskSpec) -> ClassificationTask:
    """Read, label and split the task described by ``spec``; BadInputError says what is wrong with the data."""
    path = resolve_task_file(spec.data)
    rows, dropped = usable_rows(read_records(path), path, spec.text_column, spec.label_column, spec.text_pair_column)
    label_names = sorted({label for _, _, label in rows})
    if len(label_names) < 2:
        raise BadInputError(
            f"{path}: mislabelled: needs at least 2 classes in column '{spec.label_column}', found only "
            f"{label_names}; check label_column"
        )
    label_ids = {name: i for i, name in enumerate(label_names)}
    examples = [Example(text, pair, label_ids[label]) for text, pair, label in rows]
    validation, calibration, train = split(stratified_order(examples, spec.seed)[: spec.max_examples], spec, path)
    return ClassificationTask(
        name=spec.data if spec.data in TASK_FILES else path.stem,
        label_names=label_names,
        dropped_rows=dropped,
        train=train,
        validation=validation,
        calibration=calibration,
        fingerprint=fingerprint({"file": file_digest(path), "spec": spec.model_dump()}),
        max_length=spec.max_length,
        batch_size=spec.batch_size,
    )
