"""Reading a task's examples from a file and splitting them: what every task type that reads texts shares.

Rules, applied in this order:

1. Rows whose text, text pair (when a pair column is set) or label (when a label column is set) is empty or blank are
   dropped and counted; every other value is kept verbatim (labels as strings, so ``1`` and ``"1"`` agree).
2. The split is stratified by label and seeded: each class is shuffled with ``random.Random(seed)``, and the
   classes are interleaved by each example's relative position within its class, so that every contiguous run
   of the resulting order holds the classes in about their overall proportions (without labels: one shuffle).
   ``max_examples`` keeps the first examples of that order; validation and then calibration take the next
   ``round(fraction * n)`` examples each; train gets the rest. The result depends only on the file's rows, their
   order and the spec.
"""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ziplm.errors import BadInputError
from ziplm.tasks.base import Example

CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}


class DataSpec(BaseModel):
    """Where a task's examples are and how to split them (the settings every task type that reads texts has)."""

    model_config = ConfigDict(extra="forbid")
    fine_tunes: ClassVar[bool] = True  # False: the task always uses the given model as it is (Task.adopt)
    blocks_of_sequence_length: ClassVar[bool] = False  # True: examples are max_length tokens, the environment's length

    data: str
    text_column: str = "text"
    validation_fraction: float = Field(0.125, gt=0.0, lt=1.0)
    calibration_fraction: float = Field(0.125, ge=0.0, lt=1.0)
    seed: int = 0
    max_examples: int | None = Field(None, ge=2)
    max_length: int = Field(128, ge=8, description="tokens per example wherever the task encodes")
    batch_size: int = Field(32, ge=1, description="examples per batch wherever the task encodes")

    @model_validator(mode="after")
    def _leave_room_for_training(self) -> DataSpec:
        if self.validation_fraction + self.calibration_fraction >= 1.0:
            raise ValueError(
                "validation_fraction + calibration_fraction must be below 1 so that examples are left for training"
            )
        return self


def read_records(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix in CSV_DELIMITERS:
            return read_csv_rows(path, CSV_DELIMITERS[suffix])
        if suffix in JSONL_SUFFIXES:
            return read_jsonl_rows(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInputError(f"cannot read {path}: {type(exc).__name__}: {exc}; expected UTF-8 text") from exc
    raise BadInputError(f"{path}: unsupported file type '{suffix}': use .csv, .tsv or .jsonl")


def read_csv_rows(path: Path, delimiter: str) -> list[dict[str, Any]]:
    """Rows as dicts keyed by the header line; a short row's missing cells read as None (and are then dropped)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        records = list(reader)
    if not records:
        raise BadInputError(f"{path} has no rows: expected a header line naming the columns, then one row per example")
    return records


def read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
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


def usable_rows(records: list[dict[str, Any]], path: Path, text_column: str, label_column: str | None,
                pair_column: str | None = None) -> tuple[list[tuple[str, str | None, str | None]], int]:
    """(text, pair, label) for each complete row (None for a column not asked for), and how many rows were dropped
    for an empty value."""
    columns = [text_column, *([label_column] if label_column else []), *([pair_column] if pair_column else [])]
    rows = []
    for number, record in enumerate(records, start=1):
        missing = [c for c in columns if c not in record]
        if missing:
            raise BadInputError(
                f"{path} record {number}: no column {', '.join(map(repr, missing))}; the columns there are "
                f"{', '.join(map(repr, record))}. Set text_column / text_pair_column / label_column to match."
            )
        cells = {c: _cell(record[c], path, number, c) for c in columns}
        if all(cells.values()):
            rows.append((cells[text_column], cells.get(pair_column), cells.get(label_column)))
    if not rows:
        raise BadInputError(f"{path} has no usable rows: every row has an empty {' or '.join(columns)}")
    return rows, len(records) - len(rows)


def _cell(value: Any, path: Path, number: int, column: str) -> str:
    """A cell as a string; "" for missing or blank values, which marks the row to be dropped."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise BadInputError(f"{path} record {number}: column '{column}' holds a {type(value).__name__}, not text")
    text = str(value)
    return text if text.strip() else ""


def stratified_order(examples: list[Example], seed: int) -> list[Example]:
    """Shuffle each class, then interleave the classes by relative position (jittered): see the module docstring."""
    rng = random.Random(seed)
    by_label: dict[int | None, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[example.label].append(example)
    keyed = []
    for label in sorted(by_label, key=lambda label: -1 if label is None else label):
        members = by_label[label]
        rng.shuffle(members)
        keyed += [((rank + rng.random()) / len(members), example) for rank, example in enumerate(members)]
    keyed.sort(key=lambda pair: pair[0])
    return [example for _, example in keyed]


def split(ordered: list[Example], spec: DataSpec, path: Path) -> tuple[list[Example], ...]:
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
