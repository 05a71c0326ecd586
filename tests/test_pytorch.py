"""The PyTorch runtime: torch.export programs beside the ONNX files, timed on the CPU here (CUDA where a GPU is)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.conftest import tiny_bert_config, tiny_recipe
from ziplm.errors import BadInputError, MissingEngineError
from ziplm.families import adapter_for
from ziplm.families.loading import build_model
from ziplm.families.registry import adapter_for_type
from ziplm.pipeline.cli import app
from ziplm.runtimes import InferenceEnv, get_runtime
from ziplm.runtimes.pytorch import program_path
from ziplm.stages import latency_table as lt
from ziplm.stages.export import export_model
from ziplm.stages.generation import export_for_generation, phase_feeds
from ziplm.runtimes.policy import policy

CPU = InferenceEnv(runtime="pytorch", threads=1, sequence_length=16, options={"device": "cpu"})
ONNX_RUNTIME = InferenceEnv(threads=1, sequence_length=16)


def test_the_program_runs_as_onnx_runtime_runs_the_file_at_other_shapes(tmp_path):
    """Traced at batch 1 (the environment's), the program still takes other batches and lengths."""
    config = tiny_bert_config()
    torch.manual_seed(0)
    path = export_model(build_model(config), tmp_path / "model.onnx", 1, 16, program=True)
    session = get_runtime(CPU).load(path)
    assert session.input_shapes["input_ids"] == ("batch", "sequence") and set(session.input_names) == {
        "input_ids", "attention_mask", "token_type_ids"}
    for batch, sequence in ((1, 16), (3, 9)):
        inputs = adapter_for(config).example_inputs(config, batch, sequence, seed=batch)
        (expected,) = get_runtime(ONNX_RUNTIME).load(path).run(inputs)
        np.testing.assert_allclose(session.run(inputs)[0], expected, rtol=1e-4, atol=1e-5)


def test_a_decoder_generation_program_takes_a_prompt_and_a_decode_step(tmp_path):
    config = adapter_for_type("llama").tiny_config_of("llama")
    torch.manual_seed(0)
    path = export_for_generation(build_model(config).eval(), tmp_path / "generation.onnx", program=True)
    onnx_session, session = get_runtime(ONNX_RUNTIME).load(path), get_runtime(CPU).load(path)
    for env in (CPU.in_phase("prefill"), CPU.in_phase("decode", context_length=12)):
        feed = phase_feeds(env, config.vocab_size)(session)
        for ours, theirs in zip(session.run(feed), onnx_session.run(feed)):
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_file_without_a_program_a_corrupt_program_and_int8_are_refused(tmp_path):
    config = tiny_bert_config()
    path = export_model(build_model(config), tmp_path / "model.onnx", 1, 16)
    assert not program_path(path).exists()
    with pytest.raises(BadInputError, match=r"model.pt2 is missing: build the artifact with environment runtime "
                                            r"pytorch"):
        get_runtime(CPU).load(path)
    program_path(path).write_bytes(b"not a program")
    with pytest.raises(BadInputError, match="runtime pytorch cannot load"):
        get_runtime(CPU).load(path)
    export_model(build_model(config), path, 1, 16)  # exported again without a program: the stale one goes
    assert not program_path(path).exists()
    with pytest.raises(BadInputError, match=r"runs fp32 files only, not int8; runtimes that run int8: deepsparse"):
        get_runtime(CPU.model_copy(update={"precision": "int8"}))
    with pytest.raises(BadInputError, match="unknown device 'tpu'"):
        get_runtime(CPU.model_copy(update={"options": {"device": "tpu"}}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the refusal cannot happen")
def test_without_a_gpu_the_cuda_device_names_what_to_install():
    with pytest.raises(MissingEngineError, match=r"sees no CUDA device: install torch .* for CUDA .* device: cpu"):
        get_runtime(InferenceEnv(runtime="pytorch"))
    result = CliRunner().invoke(app, ["latency-table", "--model", "bert-base", "--runtime", "pytorch"])
    assert result.exit_code == 2 and "device: cpu" in " ".join(result.output.split())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU and a CUDA build of torch")
def test_on_the_gpu_the_program_runs_as_on_the_cpu(tmp_path):
    config = tiny_bert_config()
    torch.manual_seed(0)
    path = export_model(build_model(config), tmp_path / "model.onnx", 1, 16, program=True)
    inputs = adapter_for(config).example_inputs(config, 2, 16)
    gpu = get_runtime(CPU.model_copy(update={"options": {}}))
    assert gpu.info().device != "CPU"
    np.testing.assert_allclose(gpu.load(path).run(inputs)[0], get_runtime(CPU).load(path).run(inputs)[0],
                               rtol=1e-3, atol=1e-4)


def test_a_latency_table_of_programs(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    table, cached = lt.get_or_build_table(tiny_bert_config(), CPU, 32, policy("quick"), progress=lambda _: None)
    assert not cached and table.environment["name"] == "pytorch" and table.environment["options"]["device"] == "cpu"
    assert table.max_speedup() > 1.0


def test_a_family_is_built_and_verified_in_pytorch(tmp_path, monkeypatch, tiny_bert_dir, toy_sentiment_csv):
    """`ziplm run` with runtime pytorch, after a run in ONNX Runtime on the same cache (whose dense file has no
    program): the members' folders carry model.pt2 beside model.onnx, named with its sha256 in the manifest, and
    `ziplm verify` times the programs again (a changed program is refused)."""
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "recipe.yaml"
    environment = CPU.model_dump(include={"runtime", "threads", "sequence_length", "options"})
    for runtime in ("onnxruntime", "pytorch"):
        options = environment["options"] if runtime == "pytorch" else {}
        recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert_dir, toy_sentiment_csv, environment={
            **environment, "runtime": runtime, "options": options})))
        out = tmp_path / runtime
        result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    (member,) = json.loads((out / "report.json").read_text())["members"]
    assert member["runtime"]["name"] == "pytorch" and member["program"]["file"] == "model.pt2"
    folder = out / member["name"]
    assert (folder / "model.pt2").is_file() and (out / "dense" / "model.pt2").is_file()
    verified = CliRunner().invoke(app, ["verify", str(folder), "--effort", "quick"])
    assert verified.exit_code in (0, 1) and "pytorch" in verified.output, verified.output
    (folder / "model.pt2").write_bytes(b"changed")
    refused = CliRunner().invoke(app, ["verify", str(folder), "--effort", "quick"])
    assert refused.exit_code == 2 and "model.pt2 is corrupt or was changed" in " ".join(refused.output.split())
