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

Rules, applied in this order:

1. Rows whose text, text pair (when a pair column is set) or label is empty or blank are dropped and counted in
   ``ClassificationTask.dropped_rows``; every other value is kept verbatim (labels as strings, so ``1`` and ``"1"``
   agree).
2. Label ids follow the sorted unique label strings (``["negative", "positive"]`` gives negative=0, positive=1).
3. The split is stratified by label and seeded: each class is shuffled with ``random.Random(seed)``, and the
   classes are interleaved by each example's relative position within its class, so that every contiguous run
   of the resulting order holds the classes in about their overall proportions. ``max_examples`` keeps the first
   examples of that order; validation and then calibration take the next ``round(fraction * n)`` examples each;
   train gets the rest. The result depends only on the file's rows, their order and the spec.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from ziplm.assets import TASK_FILES, load_pretrained, resolve_model, resolve_task_file
from ziplm.cache import file_digest, fingerprint
from ziplm.errors import BadInputError
from ziplm.tasks.base import Example, Task

ATTENTION = "eager"  # ONNX Runtime fuses Attention only for eagerly exported models
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}


class TaskSpec(BaseModel):
    """Where a classification task's examples are and how to split them (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["classification"] = "classification"
    data: str
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    validation_fraction: float = Field(0.125, gt=0.0, lt=1.0)
    calibration_fraction: float = Field(0.125, ge=0.0, lt=1.0)
    seed: int = 0
    max_examples: int | None = Field(None, ge=2)
    max_length: int = Field(128, ge=8, description="tokens per example wherever the task encodes")
    batch_size: int = Field(32, ge=1, description="examples per batch wherever the task encodes")

    @model_validator(mode="after")
    def _leave_room_for_training(self) -> TaskSpec:
        if self.validation_fraction + self.calibration_fraction >= 1.0:
            raise ValueError(
                "validation_fraction + calibration_fraction must be below 1 so that examples are left for training"
            )
        return self


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
    records = _read_records(path)
    rows, dropped = _usable_rows(records, spec, path)
    label_names = sorted({label for _, _, label in rows})
    if len(label_names) < 2:
        raise BadInputError(
            f"{path}: mislabelled: needs at least 2 classes in column '{spec.label_column}', found only "
            f"{label_names}; check label_column"
        )
    label_ids = {name: i for i, name in enumerate(label_names)}
    examples = [Example(text, pair, label_ids[label]) for text, pair, label in rows]
    ordered = _stratified_order(examples, spec.seed)[: spec.max_examples]
    validation, calibration, train = _split(ordered, spec, path)
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


def _read_records(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix in CSV_DELIMITERS:
            return _read_csv(path, CSV_DELIMITERS[suffix])
        if suffix in JSONL_SUFFIXES:
            return _read_jsonl(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInputError(f"cannot read {path}: {type(exc).__name__}: {exc}; expected UTF-8 text") from exc
    raise BadInputError(f"{path}: unsupported file type '{suffix}': use .csv, .tsv or .jsonl")


def _read_csv(path: Path, delimiter: str) -> list[dict[str, Any]]:
    """Rows as dicts keyed by the header line; a short row's missing cells read as None (and are then dropped)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        records = list(reader)
    if not records:
        raise BadInputError(f"{path} has no rows: expected a header line naming the columns, then one row per example")
    return records


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInputError(f"{path} line {number} is not valid JSON: {exc.msg}") from exc
            if not isinstance(record, dict):
                raise BadInputError(
                    f"{path} line {number}: expected a JSON object per line, got {type(record).__name__}"
                )
            records.append(record)
    if not records:
        raise BadInputError(f"{path} has no rows: expected one JSON object per line")
    return records


def _usable_rows(
    records: list[dict[str, Any]], spec: TaskSpec, path: Path
) -> tuple[list[tuple[str, str | None, str]], int]:
    """(text, pair, label) for each complete row, and how many rows were dropped for an empty value."""
    columns = [spec.text_column, spec.label_column] + ([spec.text_pair_column] if spec.text_pair_column else [])
    rows = []
    for number, record in enumerate(records, start=1):
        missing = [c for c in columns if c not in record]
        if missing:
            raise BadInputError(
                f"{path} record {number}: no column {', '.join(map(repr, missing))}; the columns there are "
                f"{', '.join(map(repr, record))}. Set text_column / text_pair_column / label_column to match."
            )
        values = [_cell(record[c], path, number, c) for c in columns]
        if all(values):
            text, label, *pair = values
            rows.append((text, pair[0] if pair else None, label))
    if not rows:
        raise BadInputError(f"{path} has no usable rows: every row has an empty text or label")
    return rows, len(records) - len(rows)


def _cell(value: Any, path: Path, number: int, column: str) -> str:
    """A cell as a string; "" for missing or blank values, which marks the row to be dropped."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise BadInputError(f"{path} record {number}: column '{column}' holds a {type(value).__name__}, not text")
    text = str(value)
    return text if text.strip() else ""


def _stratified_order(examples: list[Example], seed: int) -> list[Example]:
    """Shuffle each class, then interleave the classes by relative position (jittered): see the module docstring."""
    rng = random.Random(seed)
    by_label: dict[int, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[example.label].append(example)
    keyed = []
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        keyed += [((rank + rng.random()) / len(members), example) for rank, example in enumerate(members)]
    keyed.sort(key=lambda pair: pair[0])
    return [example for _, example in keyed]


def _split(ordered: list[Example], spec: TaskSpec, path: Path) -> tuple[list[Example], ...]:
    n = len(ordered)
    n_validation = round(spec.validation_fraction * n)
    n_calibration = round(spec.calibration_fraction * n)
    if n_validation == 0 or n_validation + n_calibration >= n:
        raise BadInputError(
            f"{path}: {n} usable examples are too few for validation_fraction={spec.validation_fraction} and "
            f"calibration_fraction={spec.calibration_fraction}: add data or change the fractions"
        )
    cut = n_validation + n_calibration
    return ordered[:n_validation], ordered[n_validation:cut], ordered[cut:]
