"""`ziplm verify` (release gating with JUnit output) and latency SLAs, on one tiny family built per test session."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ziplm.pipeline.cli import app
from ziplm.errors import BadInputError
from ziplm.pipeline.recipe import parse_recipe
from ziplm.runtimes.timing import TimingStats
from ziplm.stages.closed_loop import LatencySLA


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def speedup_member(family: Path) -> Path:
    return family / "tiny-1.3x"


def copy_family(family: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(family, tmp_path / "family"))


def test_the_family_has_a_dense_reference_and_an_sla_member(tiny_family):
    report = json.loads((tiny_family / "report.json").read_text())
    by_name = {m["name"]: m for m in report["members"]}
    assert set(by_name) == {"tiny-1.3x", "tiny-p90-1000ms"}
    sla_member = by_name["tiny-p90-1000ms"]
    assert sla_member["sla"]["metric"] == "p90" and sla_member["sla"]["ms"] == 1000.0
    assert sla_member["passed"] is sla_member["sla"]["holds"] is (sla_member["sla"]["measured_ms"] <= 1000.0)
    assert by_name["tiny-1.3x"]["sla"] is None
    for member in report["members"]:
        reference = (tiny_family / member["name"] / member["dense_reference"]).resolve()
        assert reference == (tiny_family / "dense" / "model.onnx").resolve() and reference.is_file()
    dense = json.loads((tiny_family / "dense" / "manifest.json").read_text())
    assert dense["runtime_fingerprint"] == sla_member["runtime_fingerprint"]


def test_verify_passes_a_met_guarantee_and_writes_a_clean_junit(tiny_family, tmp_path):
    junit = tmp_path / "verify.xml"
    manifest = json.loads((speedup_member(tiny_family) / "manifest.json").read_text())
    slower_than_dense = 2 * manifest["dense_latency_ms"]["p90"]  # a member twice as slow as dense fails the gate
    result = invoke("verify", speedup_member(tiny_family), "--max-latency-ms", f"{slower_than_dense:.4f}",
                    "--effort", "quick", "--junit", junit)  # speedup: the default, target x (1 - tolerance)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("PASS tiny-1.3x: speedup") and "p90 latency" in result.output
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "0"
    assert [case.get("name") for case in suite.iter("testcase")] == ["speedup", "p90 latency"]
    assert suite.find(".//property[@name='runtime.threads']").get("value") == "1"
    assert json.loads(suite.find(".//property[@name='runtime.options']").get("value"))["graph_optimization"] == "all"
    assert suite.find(".//property[@name='machine_load.retaken']").get("value").isdigit()  # 0 on a quiet machine
    assert suite.find(".//property[@name='speedup.measurements']").get("value") in ("5", "7", "9")
    assert "measurements, " in result.output and "interval [" in result.output  # the verdict's interval


def test_verify_says_when_the_member_was_measured_on_another_cpu(tiny_family, tmp_path):
    family = copy_family(tiny_family, tmp_path)
    path = speedup_member(family) / "manifest.json"
    manifest = json.loads(path.read_text())
    assert "another CPU" not in invoke("verify", speedup_member(family), "--min-speedup", "0.2", "--effort",
                                       "quick").output
    manifest["runtime"]["device"] = "CPU (AMD EPYC (cpu family 25, model 17; avx avx2 avx512f avx512_vnni))"
    path.write_text(json.dumps(manifest))
    result = invoke("verify", speedup_member(family), "--min-speedup", "0.2", "--effort", "quick")
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith("[the manifest was measured on another CPU: CPU (AMD EPYC (cpu family 25, "
                                           "model 17; avx avx2 avx512f avx512_vnni))]")


def test_verify_with_a_too_strict_sla_exits_1_and_writes_the_junit_failure(tiny_family, tmp_path):
    junit = tmp_path / "verify.xml"
    result = invoke("verify", speedup_member(tiny_family), "--max-latency-ms", "0.0001", "--min-speedup", "0.2",
                    "--effort", "quick", "--junit", junit)
    assert result.exit_code == 1
    assert result.output.startswith("FAIL tiny-1.3x") and "0.0001 ms required" in result.output
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "1"
    (failure,) = suite.iter("failure")
    assert "p90 latency" in failure.get("message") and "> 0.0001 ms required" in failure.get("message")


@pytest.mark.parametrize("factor, verdict", [(5.0, "PASS"), (1e-6, "FAIL")])
def test_verify_gates_an_sla_member_on_its_own_sla(tiny_family, tmp_path, factor, verdict):
    """The SLA in the manifest, set to 5 times the p90 the member was measured at (a member that slow fails it; the
    p90 of a 0.1 ms model on a busy machine can double) or to one no model meets."""
    member = copy_family(tiny_family, tmp_path) / "tiny-p90-1000ms"
    manifest = json.loads((member / "manifest.json").read_text())
    manifest["sla"]["ms"] = sla_ms = factor * manifest["sla"]["measured_ms"]
    (member / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("verify", member, "--effort", "quick", "--threads", "1")
    assert result.exit_code == (0 if verdict == "PASS" else 1), result.output
    assert result.output.startswith(f"{verdict} tiny-p90-1000ms: p90 latency")
    assert f"{sla_ms:.4g} ms required" in result.output and "speedup" not in result.output


def test_verify_a_corrupt_onnx_exits_2(tiny_family, tmp_path):
    family = copy_family(tiny_family, tmp_path)
    onnx = speedup_member(family) / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    junit = tmp_path / "verify.xml"
    result = invoke("verify", speedup_member(family), "--junit", junit)
    assert result.exit_code == 2
    assert "corrupt" in result.output and "model.onnx" in result.output
    assert not junit.exists() and not list(tmp_path.glob(".*partial*"))


def test_verify_without_the_dense_reference_exits_2(tiny_family, tmp_path):
    family = copy_family(tiny_family, tmp_path)
    shutil.rmtree(family / "dense")
    result = invoke("verify", speedup_member(family))
    assert result.exit_code == 2
    assert "keep the dense folders of `ziplm run` beside the member" in " ".join(result.output.split())


@pytest.mark.parametrize("args, message", [
    (["--runtime", "tensorrt-typo"], "available runtimes: deepsparse, onnxruntime"),
    (["--metric", "p99"], "choose p90 or median"),
])
def test_verify_bad_options_exit_2(tiny_family, args, message):
    result = invoke("verify", speedup_member(tiny_family), *args)
    assert result.exit_code == 2 and message in result.output


def test_time_per_token_gates_of_an_encoder_member_exit_2(tiny_family):
    result = invoke("verify", speedup_member(tiny_family), "--max-tpot-ms", "10")
    assert result.exit_code == 2 and "apply to fp32 decoder members" in " ".join(result.output.split())


def test_verify_a_folder_without_manifest_exits_2(tmp_path):
    result = invoke("verify", tmp_path)
    assert result.exit_code == 2 and "has no manifest.json" in result.output


def test_sla_becomes_a_speedup_target_with_room_for_the_tolerance():
    dense = TimingStats((9.0, 10.0, 10.0, 10.0, 20.0))
    sla = LatencySLA(p90_ms=5.0)
    target = sla.speedup_target(dense, tolerance=0.05)
    assert target == pytest.approx(dense.p90_ms / (5.0 * 0.95))
    assert sla.holds(TimingStats((4.0,) * 5)) and not sla.holds(TimingStats((5.5,) * 5))
    assert LatencySLA(median_ms=5.0).speedup_target(dense, 0.0) == pytest.approx(2.0)


@pytest.mark.parametrize("slas, message", [
    ([{"p90_ms": 5.0, "median_ms": 4.0}], "exactly one of p90_ms or median_ms"),
    ([{"p99_ms": 5.0}], "unknown key 'slas.0.p99_ms'; allowed here: p90_ms, median_ms, batch_size, sequence_length"),
    ([{"p90_ms": 5.0, "batch_size": 8}], "run a recipe whose environment has batch_size: 8"),
])
def test_bad_slas_are_rejected_with_a_clear_message(slas, message):
    text = json.dumps({"name": "x", "model": "minilm", "task": {"data": "mr"}, "slas": slas})
    with pytest.raises(BadInputError) as error:
        parse_recipe(text)
    assert message in " ".join(str(error.value).split())


def test_an_sla_of_a_phase_of_generation_is_named_for_it_and_must_match_the_environment(tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("a b c")
    base = f"name: g\nmodel: m\ntask: {{type: causal_lm, data: {texts}}}\n"
    recipe = parse_recipe(base + "environment: {phase: decode, context_length: 64}\n"
                                 "slas: [{p90_ms: 25, phase: decode}]\n")
    (sla,) = recipe.slas
    assert sla.label == "TPOT p90<=25ms" and sla.to_json(TimingStats((20.0,)))["phase"] == "decode"
    with pytest.raises(BadInputError, match="is for phase decode, but the environment .* has phase prefill"):
        parse_recipe(base + "environment: {phase: prefill}\nslas: [{p90_ms: 25, phase: decode}]\n")


def test_a_recipe_with_only_slas_round_trips():
    recipe = parse_recipe(json.dumps({"name": "x", "model": "minilm", "task": {"data": "mr"}, "targets": [],
                                      "slas": [{"median_ms": 8.0, "sequence_length": 128}]}))
    assert parse_recipe(recipe.dump_yaml()) == recipe and recipe.slas[0].label == "median<=8ms"


def test_junit_writes_mappings_as_json_not_a_python_repr():
    from ziplm.pipeline.gate import property_value

    assert property_value({"graph_optimization": "all", "allow_spinning": False}) == \
        '{"allow_spinning": false, "graph_optimization": "all"}'
    assert property_value(2) == "2" and property_value("CPU (x)") == "CPU (x)"
