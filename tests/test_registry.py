"""`ziplm publish` to a real MLflow tracking server (sqlite backend) started on a free loopback port."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import onnxruntime as ort
import pytest
from mlflow import MlflowClient  # the test extra installs it (pyproject.toml): a missing one fails, not skips
from transformers import AutoTokenizer
from typer.testing import CliRunner

from ziplm.pipeline.cli import app
from ziplm.pipeline.registry import tags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def family_with_a_failed_member(tiny_family: Path, tmp_path: Path) -> Path:
    """A copy of the tiny family in which the SLA member failed verification."""
    family = Path(shutil.copytree(tiny_family, tmp_path / "family"))
    report = json.loads((family / "report.json").read_text())
    for member in report["members"]:
        member["passed"] = member["name"] == "tiny-1.3x"
        (family / member["name"] / "manifest.json").write_text(json.dumps(member))
    (family / "report.json").write_text(json.dumps(report))
    return family


def test_publish_registers_verified_members_and_refuses_failed_ones(mlflow_server, tiny_family, tmp_path):

    family = family_with_a_failed_member(tiny_family, tmp_path)
    result = CliRunner().invoke(app, ["publish", str(family), "--registry", mlflow_server, "--experiment", "gate"],
                                catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "refused tiny-p90-1000ms" in result.output and "published tiny-1.3x version 1" in result.output

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    assert {m.name for m in client.search_registered_models()} == {"tiny-1.3x"}
    (version,) = client.search_model_versions("name='tiny-1.3x'")
    manifest = json.loads((family / "tiny-1.3x" / "manifest.json").read_text())
    assert version.tags["ziplm.runtime_fingerprint"] == manifest["runtime_fingerprint"]
    assert version.tags["ziplm.passed"] == "true" and version.tags["ziplm.runtime.threads"] == "1"
    assert float(version.tags["ziplm.measured_speedup"]) == pytest.approx(manifest["measured_speedup"], rel=1e-5)
    run = client.get_run(version.run_id)
    assert run.data.metrics["measured_speedup"] == pytest.approx(manifest["measured_speedup"])
    assert run.data.metrics["latency_p90_ms"] == pytest.approx(manifest["latency_ms"]["p90"])
    assert run.data.metrics["accuracy"] == pytest.approx(manifest["metric"]["value"])
    assert run.data.metrics["dense_accuracy"] == pytest.approx(manifest["metric"]["dense_value"])
    assert version.tags["ziplm.parameters"] == str(manifest["parameters"])  # an integer in full, not %g
    assert version.tags["ziplm.file_bytes"] == str(manifest["file_bytes"])
    # the whole member folder, so that a model pulled from the registry can be served (tokenizer, label names)
    member = family / "tiny-1.3x"
    artifacts = {Path(a.path).name for a in client.list_artifacts(version.run_id, "model")}
    assert artifacts == {p.name for p in member.iterdir()}
    assert {"model.onnx", "model.safetensors", "config.json", "tokenizer.json", "manifest.json"} <= artifacts
    pulled = Path(client.download_artifacts(version.run_id, "model", str(tmp_path / "download")))
    assert (pulled / "model.onnx").read_bytes() == (member / "model.onnx").read_bytes()
    assert json.loads((pulled / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    encoded = AutoTokenizer.from_pretrained(pulled)(["a good film"], return_tensors="np")
    session = ort.InferenceSession(str(pulled / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {i.name: encoded[i.name] for i in session.get_inputs()})
    assert logits.shape == (1, 2)

    forced = CliRunner().invoke(app, ["publish", str(family), "--registry", mlflow_server, "--experiment", "gate",
                                      "--force"], catch_exceptions=False)
    assert forced.exit_code == 0, forced.output
    assert len(client.search_model_versions("name='tiny-1.3x'")) == 2
    (failed,) = client.search_model_versions("name='tiny-p90-1000ms'")
    assert failed.tags["ziplm.passed"] == "false" and failed.tags["ziplm.sla"] == "p90<=1000ms"


def test_publish_to_an_unreachable_registry_exits_2(tiny_family):
    result = CliRunner().invoke(app, ["publish", str(tiny_family), "--registry", f"http://127.0.0.1:{free_port()}"],
                                catch_exceptions=False)
    assert result.exit_code == 2 and "cannot reach the MLflow registry" in result.output


def test_publish_a_folder_that_is_not_a_run_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["publish", str(tmp_path), "--registry", "http://127.0.0.1:1"],
                                catch_exceptions=False)
    assert result.exit_code == 2 and "has no report.json or manifest.json" in result.output


def test_tags_write_integers_in_full_and_other_figures_short(tiny_family):
    """A bert-base-sized member: its parameters and bytes read 1.09482e+08 and 4.38003e+08 in %g."""
    manifest = json.loads((tiny_family / "tiny-1.3x" / "manifest.json").read_text())
    manifest |= {"parameters": 109482240, "file_bytes": 438002688, "measured_speedup": 2.0123456789,
                 "latency_ms": {**manifest["latency_ms"], "p90": 12.5}}
    figures = tags(manifest)
    assert (figures["ziplm.parameters"], figures["ziplm.file_bytes"]) == ("109482240", "438002688")
    assert (figures["ziplm.measured_speedup"], figures["ziplm.latency_p90_ms"]) == ("2.01235", "12.5")
