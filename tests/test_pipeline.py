"""`ziplm run` end to end on a tiny model and toy task: the output contract, exit codes and bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import tiny_recipe, write_gguf_header
from ziplm.families.loading import load_model
from ziplm.pipeline.cli import app
from ziplm.pipeline.recipe import builtin_recipes, load_recipe, parse_recipe
from ziplm.stages.export import verify_export
from ziplm.tasks import TaskSpec, load_task

MANIFEST_KEYS = {"name", "target_speedup", "measured_speedup", "latency_ms", "dense_latency_ms", "runtime", "metric",
                 "structure", "sparsity", "parameters", "file_bytes", "sha256", "passed", "stages", "rounds"}
RUNTIME_KEYS = {"name", "version", "device", "threads", "batch_size", "sequence_length", "precision"}


@pytest.fixture
def recipe(tmp_path, monkeypatch, tiny_bert_dir, toy_sentiment_csv):
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))

    def write(**overrides) -> Path:
        payload = tiny_recipe(tiny_bert_dir, toy_sentiment_csv, **overrides)
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(payload))
        return path

    return write


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_run_writes_the_output_contract(recipe, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", str(recipe()), "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"runtime", "dense", "members"}
    assert RUNTIME_KEYS <= set(report["runtime"])
    (member,) = report["members"]
    assert MANIFEST_KEYS <= set(member)
    assert result.exit_code == (0 if member["passed"] else 1)
    assert member["runtime"]["threads"] == 1 and member["runtime"]["sequence_length"] == 32
    assert len(member["structure"]["heads"]) == 2 and 1 <= len(member["rounds"]) <= 2

    folder = out / member["name"]
    assert {"model.onnx", "config.json", "manifest.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "manifest.json").read_text()) == member
    markdown = (out / "report.md").read_text()
    assert markdown.count(member["name"]) == 1
    for figure in ("accuracy_vs_speedup.png", "structure.png"):  # linked from report.md and real PNG files
        assert f"({figure})" in markdown and (out / figure).read_bytes().startswith(b"\x89PNG")
    assert not list(out.glob(".*partial*"))  # nothing half-written left behind
    assert not (out / ".work").exists()  # nor the rounds' scratch files
    assert (folder / member["dense_reference"]).resolve() == (out / "dense" / "model.onnx").resolve()
    assert json.loads((out / "dense" / "manifest.json").read_text())["runtime"] == report["runtime"]

    reloaded = load_model(str(folder))  # a member reloads in PyTorch from its folder ...
    verify_export(reloaded, folder / "model.onnx")  # ... and its ONNX outputs match
    assert reloaded.config.ziplm_structure["ffn"] == member["structure"]["ffn"]
    task = load_task(TaskSpec(**report["recipe"]["task"]))  # the manifest's metric is the member's, re-scored
    metric = task.evaluate(reloaded, AutoTokenizer.from_pretrained(folder))
    assert member["metric"] | {"value": metric.value} == member["metric"]
    assert (member["metric"]["name"], member["metric"]["validation_size"]) == ("accuracy", len(task.validation))


def test_a_member_folder_loads_with_plain_transformers(recipe, tmp_path, monkeypatch):
    out = tmp_path / "out"
    invoke("run", str(recipe()), "--out", str(out))
    (member,) = json.loads((out / "report.json").read_text())["members"]
    folder = out / member["name"]
    loaded = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    reloaded = load_model(str(folder))
    assert type(loaded) is type(reloaded) and loaded.config.ziplm_structure == reloaded.config.ziplm_structure
    batch = AutoTokenizer.from_pretrained(folder)(["a good film", "the plot was dull"], padding=True,
                                                 return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, reloaded(**batch).logits)
    monkeypatch.setitem(sys.modules, "ziplm.stages.quantize", None)  # a Python without ziplm
    with pytest.raises(ImportError, match="pruned by ZipLM Deploy: install ziplm .* or serve its model.onnx"):
        AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)


def test_a_missed_target_exits_1(recipe, tmp_path):
    """Built to miss: one round to land within a tolerance no measurement meets."""
    strict = {"tolerance": 1e-9, "max_rounds": 1}
    out = tmp_path / "out"
    result = invoke("run", str(recipe(verification=strict)), "--out", str(out))
    assert result.exit_code == 1, result.output
    (member,) = json.loads((out / "report.json").read_text())["members"]
    assert member["passed"] is False and len(member["rounds"]) == 1
    assert json.loads((out / member["name"] / "manifest.json").read_text())["passed"] is False
    assert f"MISS {member['name']}: target 1.3x" in result.output


def assert_nothing_written(tmp_path: Path) -> None:
    """Bad input leaves no output folder and no visible half-written cache entry."""
    assert not (tmp_path / "out").exists()
    cache = tmp_path / "cache"
    leftovers = [p for p in cache.rglob("*") if "partial" in p.name] if cache.exists() else []
    assert not leftovers


@pytest.mark.parametrize("change", [{"targets": [500.0]}, {"targets": [], "slas": [{"p90_ms": 1e-6}]}])
def test_unreachable_target_or_sla_is_bad_input_naming_the_maximum(recipe, tmp_path, change):
    result = invoke("run", str(recipe(**change)), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "largest reachable speedup is" in result.output
    assert_nothing_written(tmp_path)


def test_unsupported_architecture_exits_2_before_training(recipe, tmp_path):
    from transformers import AlbertConfig

    model = tmp_path / "tiny-albert"  # ALBERT shares one layer's weights across its layers: no adapter
    AlbertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                 vocab_size=50).save_pretrained(model)
    result = invoke("run", str(recipe(model=str(model))), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "unsupported architecture 'albert'" in result.output and "supported model types: bert" in result.output
    assert_nothing_written(tmp_path)
    assert not (tmp_path / "cache" / "stages" / "teacher").exists()


def test_a_gguf_model_without_an_adapter_exits_2_before_anything_is_read_or_written(recipe, tmp_path):
    model = write_gguf_header(tmp_path / "state-space.gguf", "mamba")
    result = invoke("run", str(recipe(model=str(model))), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "unsupported architecture 'mamba' (GGUF mamba)" in result.output and "llama" in result.output
    assert_nothing_written(tmp_path)
    assert not (tmp_path / "cache" / "models").exists()


@pytest.mark.parametrize("rows, message", [
    ([], "has no rows"),
    ([{"text": f"good film {i}", "label": "positive"} for i in range(40)], "mislabelled: needs at least 2 classes"),
])
def test_empty_or_mislabelled_dataset_exits_2(recipe, tmp_path, write_task_file, rows, message):
    data = write_task_file("data.csv", rows) if rows else tmp_path / "data.csv"
    if not rows:
        data.write_text("text,label\n")
    result = invoke("run", str(recipe(task={"data": str(data)})), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and message in result.output
    assert_nothing_written(tmp_path)


def test_an_error_message_is_printed_as_text_not_as_markup(recipe, tmp_path):
    data = tmp_path / "reviews[v2].csv"  # rich would take "[v2]" for a style tag and drop it
    data.write_text("text,label\n")
    result = invoke("run", str(recipe(task={"data": str(data)})), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "reviews[v2].csv" in "".join(result.output.split())


def test_missing_asset_names_the_setup_command(recipe, tmp_path):
    result = invoke("run", str(recipe(task={"data": "mr"})), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "has not been fetched" in result.output and "make setup" in result.output
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"environment": {"runtime": "tensorrt-typo"}}, "available runtimes: deepsparse, onnxruntime"),
    ({"colour": "blue"}, "unknown key 'colour'"),
    ({"verification": {"tolerence": 0.1}}, "allowed here: tolerance"),
    ({"targets": [0.5]}, "above 1.0"),
])
def test_bad_recipes_exit_2_with_a_clear_message(recipe, tmp_path, change, message):
    result = invoke("run", str(recipe(**change)), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("name", builtin_recipes())
def test_every_built_in_recipe_loads_and_round_trips(name):
    recipe = load_recipe(name)
    assert parse_recipe(recipe.dump_yaml()) == recipe


def test_malformed_yaml_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    result = invoke("run", str(bad), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "not valid YAML" in result.output
    assert_nothing_written(tmp_path)


def test_prepare_builds_the_cached_stages_and_summarises_them(recipe, tmp_path):
    result = invoke("prepare", str(recipe()), "--out", str(tmp_path / "prep"))
    assert result.exit_code == 0
    summary = json.loads((tmp_path / "prep" / "prepare.json").read_text())
    assert not summary["teacher"]["cached"]
    teacher = summary["teacher"]["path"]  # the summary's metric is the teacher's, re-scored
    task = load_task(TaskSpec(**summary["recipe"]["task"]))
    assert task.evaluate(load_model(teacher), AutoTokenizer.from_pretrained(teacher)).to_json() == \
        summary["teacher"]["metric"]
    assert summary["latency_table"]["dense_predicted_ms"] > summary["latency_table"]["base_ms"] > 0
    assert invoke("prepare", str(recipe()), "--out", str(tmp_path / "again")).exit_code == 0
    again = json.loads((tmp_path / "again" / "prepare.json").read_text())
    assert again["teacher"]["cached"] and again["latency_table"] == summary["latency_table"]


def test_a_latency_table_in_an_unknown_precision_exits_2_naming_the_choices():
    result = invoke("latency-table", "--precision", "int4")
    assert result.exit_code == 2 and "'int4' is not one of 'fp32'" in result.output and "'int8'" in result.output


def test_the_recipe_has_few_settings():
    """What a user decides, not a knob per experiment: at most 36 settings (a list such as `targets`, `slas` or
    `chain` counts once)."""
    from typing import Union, get_args, get_origin

    from pydantic import BaseModel

    from ziplm.pipeline.recipe import Recipe

    def leaves(model: type[BaseModel]) -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            union = get_origin(field.annotation) is Union  # `teacher: {...} | none` counts its settings
            options = get_args(field.annotation) if union else (field.annotation,)
            nested = next((option for option in options if isinstance(option, type)), None)
            found += [f"{name}.{leaf}" for leaf in leaves(nested)] if nested and issubclass(nested, BaseModel) \
                else [name]
        return found

    assert len(leaves(Recipe)) <= 36, leaves(Recipe)


def test_an_internal_error_exits_3_with_its_traceback_not_as_a_miss(recipe, monkeypatch):
    """A gate must tell a crash from a missed target (1) and from bad input (2)."""
    from ziplm.pipeline import cli

    def crash(*_: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "run_recipe", crash)
    result = invoke("run", str(recipe()))
    assert result.exit_code == 3
    assert "RuntimeError: a bug" in result.output and "this is a bug in ziplm" in result.output
