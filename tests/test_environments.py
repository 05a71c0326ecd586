"""One run, several environments: one database, a family per runtime in its own folder, and a comparison report;
the recipe's `environments:` is checked as each environment's recipe would be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import tiny_recipe, toy_sentiment_rows, write_tiny_bert
from ziplm.errors import BadInputError
from ziplm.pipeline.cli import app
from ziplm.pipeline.recipe import parse_recipe
from ziplm.pipeline.registry import member_folders

ENVIRONMENTS = {"ort": {"threads": 1, "sequence_length": 32},
                "ov": {"runtime": "openvino", "threads": 1, "sequence_length": 32}}


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def two_runtimes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ziplm run` of the tiny recipe in ONNX Runtime and OpenVINO: its output folder."""
    root = tmp_path_factory.mktemp("environments")
    data = root / "toy.csv"
    data.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in toy_sentiment_rows(160)))
    payload = tiny_recipe(write_tiny_bert(root / "tiny-bert"), data, environments=ENVIRONMENTS)
    del payload["environment"]
    (root / "recipe.yaml").write_text(yaml.safe_dump(payload))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZIPLM_CACHE", str(root / "cache"))
        result = invoke("run", root / "recipe.yaml", "--out", root / "out")
    assert result.exit_code == 0, result.output
    return root


def test_each_environment_gets_its_own_family_from_one_database(two_runtimes):
    out = two_runtimes / "out"
    assert len(list((two_runtimes / "cache" / "stages" / "database").iterdir())) == 1  # built once
    assert len(list((two_runtimes / "cache" / "stages" / "table").iterdir())) == 2  # one table per runtime
    report = json.loads((out / "report.json").read_text())
    assert set(report["environments"]) == {"ort", "ov"}
    assert [(m["environment"], m["name"], m["folder"]) for m in report["members"]] == [
        ("ort", "tiny-ort-1.3x", "ort/tiny-ort-1.3x"), ("ov", "tiny-ov-1.3x", "ov/tiny-ov-1.3x")]
    for name, runtime in (("ort", "onnxruntime"), ("ov", "openvino")):
        family = json.loads((out / name / "report.json").read_text())
        assert family["runtime"]["name"] == runtime and family["members"][0]["runtime"]["name"] == runtime
        assert (out / name / "dense" / "model.onnx").is_file()
    assert member_folders(out) == [out / "ort" / "tiny-ort-1.3x", out / "ov" / "tiny-ov-1.3x"]


def test_the_comparison_report_lines_the_environments_up_goal_by_goal(two_runtimes):
    markdown = (two_runtimes / "out" / "report.md").read_text()
    assert "# ZipLM across environments: tiny" in markdown and "## 1.3x" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith(("| ort |", "| ov |"))]
    assert len(rows) == 4 and "openvino 2026.4" in markdown and "layers shaped otherwise than in ort" in markdown


def test_a_member_of_the_openvino_family_verifies_in_openvino(two_runtimes):
    result = invoke("verify", two_runtimes / "out" / "ov" / "tiny-ov-1.3x", "--effort", "quick")
    assert result.exit_code == 0, result.output
    assert "openvino" in result.output


BASE = "name: m\nmodel: minilm\ntask: {data: mr}\ntargets: [2]\n"


def test_a_recipe_of_several_environments_round_trips_and_each_is_checked_as_its_own():
    recipe = parse_recipe(BASE + "environments: {ort: {threads: 1}, ov: {runtime: openvino}}\n")
    assert parse_recipe(recipe.dump_yaml()) == recipe
    openvino = recipe.for_environment("ov")
    assert openvino.name == "m-ov" and openvino.environment.runtime == "openvino" and not openvino.environments
    for wrong, message in (("environment: {threads: 4}\nenvironments: {ort: {}}\n", "not both"),
                           ("environments: {'a/b': {}}\n", "names its output folder"),
                           ("environments: {x: {sequence_length: 64}}\nslas: [{p90_ms: 3, sequence_length: 128}]\n",
                            "environments.x: .*SLA p90<=3ms is for sequence_length 128")):
        with pytest.raises(BadInputError, match=message):
            parse_recipe(BASE + wrong)
