"""Task loading: splits, determinism, stratification and the errors a user sees for bad data."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from ziplm.errors import BadInputError
from ziplm.tasks import Example, TaskSpec, load_task


def texts(examples: list[Example]) -> list[str]:
    return [e.text for e in examples]


def test_split_sizes_and_label_ids(toy_sentiment_csv: Path) -> None:
    task = load_task(TaskSpec(data=str(toy_sentiment_csv)))
    assert (len(task.train), len(task.validation), len(task.calibration)) == (120, 20, 20)
    assert task.label_names == ["negative", "positive"]
    assert task.name == "toy"
    assert task.dropped_rows == 0


def test_splits_are_disjoint_and_cover_the_file(toy_sentiment_csv: Path) -> None:
    task = load_task(TaskSpec(data=str(toy_sentiment_csv)))
    parts = [set(texts(part)) for part in (task.train, task.validation, task.calibration)]
    assert sum(len(p) for p in parts) == len(set.union(*parts)) == 160


def test_split_is_deterministic_and_seeded(toy_sentiment_csv: Path) -> None:
    first = load_task(TaskSpec(data=str(toy_sentiment_csv)))
    again = load_task(TaskSpec(data=str(toy_sentiment_csv)))
    other = load_task(TaskSpec(data=str(toy_sentiment_csv), seed=1))
    assert (first.train, first.validation, first.calibration) == (again.train, again.validation, again.calibration)
    assert first.fingerprint == again.fingerprint
    assert texts(first.validation) != texts(other.validation)
    assert first.fingerprint != other.fingerprint


def test_validation_is_stratified(write_task_file) -> None:
    rows = [{"text": f"pos {i}", "label": "pos"} for i in range(150)]
    rows += [{"text": f"neg {i}", "label": "neg"} for i in range(50)]
    task = load_task(TaskSpec(data=str(write_task_file("skewed.csv", rows)), validation_fraction=0.2))
    counts = Counter(e.label for e in task.validation)
    assert abs(counts[task.label_names.index("pos")] - 30) <= 1
    assert abs(counts[task.label_names.index("neg")] - 10) <= 1


def test_max_examples_takes_a_stratified_subset_first(write_task_file) -> None:
    rows = [{"text": f"t {i}", "label": "ab"[i % 2]} for i in range(400)]
    task = load_task(TaskSpec(data=str(write_task_file("big.csv", rows)), max_examples=80))
    everything = task.train + task.validation + task.calibration
    assert (len(everything), len(task.validation), len(task.calibration)) == (80, 10, 10)
    assert abs(Counter(e.label for e in everything)[0] - 40) <= 1


def test_jsonl_with_text_pairs_and_integer_labels(write_task_file) -> None:
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "y": i % 3} for i in range(48)]
    path = write_task_file("pairs.jsonl", rows)
    task = load_task(
        TaskSpec(data=str(path), text_column="premise", text_pair_column="hypothesis", label_column="y")
    )
    assert task.label_names == ["0", "1", "2"]
    example = task.train[0]
    assert example.text_pair == "h" + example.text[1:]
    assert int(example.text[1:]) % 3 == example.label


def test_rows_with_empty_text_or_label_are_dropped_and_counted(write_task_file) -> None:
    rows = [{"text": f"t {i}", "label": "ab"[i % 2]} for i in range(40)]
    rows += [{"text": "  ", "label": "a"}, {"text": "x", "label": ""}]
    task = load_task(TaskSpec(data=str(write_task_file("gaps.csv", rows))))
    assert task.dropped_rows == 2
    assert len(task.train + task.validation + task.calibration) == 40


def test_unknown_column_names_the_columns_that_exist(toy_sentiment_csv: Path) -> None:
    with pytest.raises(BadInputError, match=r"no column 'sentence'.*'text', 'label'"):
        load_task(TaskSpec(data=str(toy_sentiment_csv), text_column="sentence"))


def test_single_class_is_reported_as_mislabelled(write_task_file) -> None:
    path = write_task_file("one.csv", [{"text": f"t {i}", "label": "a"} for i in range(20)])
    with pytest.raises(BadInputError, match="mislabelled: needs at least 2 classes"):
        load_task(TaskSpec(data=str(path)))


def test_missing_file_empty_file_and_bad_lines(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        load_task(TaskSpec(data=str(tmp_path / "absent.csv")))
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(BadInputError, match="has no rows"):
        load_task(TaskSpec(data=str(tmp_path / "header.csv")))
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": \n')
    with pytest.raises(BadInputError, match="line 2 is not valid JSON"):
        load_task(TaskSpec(data=str(tmp_path / "broken.jsonl")))
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    with pytest.raises(BadInputError, match="expected UTF-8"):
        load_task(TaskSpec(data=str(tmp_path / "latin1.csv")))
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(BadInputError, match="unsupported file type"):
        load_task(TaskSpec(data=str(tmp_path / "data.parquet")))


def test_too_few_examples_for_the_fractions(write_task_file) -> None:
    path = write_task_file("tiny.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    with pytest.raises(BadInputError, match="too few"):
        load_task(TaskSpec(data=str(path)))


def test_spec_rejects_unknown_keys_and_bad_fractions() -> None:
    with pytest.raises(ValidationError):
        TaskSpec(data="mr", text_colum="text")
    with pytest.raises(ValidationError):
        TaskSpec(data="mr", validation_fraction=0.0)
    with pytest.raises(ValidationError, match="below 1"):
        TaskSpec(data="mr", validation_fraction=0.5, calibration_fraction=0.5)
    spec = TaskSpec(data="mr", seed=3)
    assert TaskSpec.model_validate(spec.model_dump()) == spec
