"""The DeepSparse runtime: a worker process in its own environment behind the one interface. The same ONNX files give
the same outputs as in ONNX Runtime (FP32, QDQ INT8, newer IR versions converted), timing runs inside the worker and
its CPU time counts as our own work, latency tables and paired verdicts run through it, sparse weights make a file
faster there, and a missing environment, a corrupt file, a dead worker and a phase it cannot time are clear errors."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import onnx
import pytest
import torch
import yaml
from transformers import AutoTokenizer
from typer.testing import CliRunner

from tests.conftest import QUICK_UNGUARDED as QUICK
from tests.conftest import skip_missing_engine, tiny_bert_config, tiny_recipe
from ziplm.errors import BadInputError, MissingEngineError
from ziplm.families import adapter_for
from ziplm.families.loading import build_model
from ziplm.pipeline.cli import app
from ziplm.runtimes import InferenceEnv, SessionModule, get_runtime
from ziplm.runtimes.deepsparse_cpu import DEEPSPARSE, private_copy
from ziplm.runtimes.paired import PairedVerifier
from ziplm.runtimes.timing import Call, cpu_snapshot, holding_timer, time_interleaved
from ziplm.runtimes.worker import WorkerError
from ziplm.stages import latency_table as lt
from ziplm.stages.export import export_model
from ziplm.stages.quantize import deployable
from ziplm.tasks import TaskSpec, load_task

DEEPSPARSE_ENV = InferenceEnv(runtime="deepsparse", threads=1, sequence_length=16)
ONNX_RUNTIME = InferenceEnv(threads=1, sequence_length=16)


@pytest.fixture(autouse=True)
def engine() -> None:
    if not DEEPSPARSE.installed():
        skip_missing_engine("deepsparse", "DeepSparse's environment is not installed: `ziplm runtimes install "
                                          "deepsparse`")


def tiny_file(tmp_path, precision: str = "fp32", name: str = "model.onnx", **sizes: int):
    config = tiny_bert_config(**sizes)
    torch.manual_seed(0)
    adapter = adapter_for(config)
    inputs = adapter.example_inputs(config, 1, 16)
    model = deployable(build_model(config), adapter.prunable_linears, precision,
                       [{k: torch.from_numpy(v) for k, v in inputs.items()}])
    return export_model(model, tmp_path / name, 1, 16), inputs


def test_deepsparse_describes_its_engine_and_refuses_options_and_phases_it_lacks():
    info = get_runtime(DEEPSPARSE_ENV).info()
    assert info.name == "deepsparse" and info.version == "1.8.0" and info.threads == 1
    assert info.options["num_streams"] == 1 and {"isa", "vnni"} <= set(info.options)
    with pytest.raises(BadInputError, match=r"unknown option\(s\) num_streams for runtime 'deepsparse'"):
        get_runtime(DEEPSPARSE_ENV.model_copy(update={"options": {"num_streams": 2}}))
    with pytest.raises(BadInputError, match=r"'deepsparse' cannot time phase decode: it times sequence only; "
                                            r"runtimes that time decode: .*onnxruntime"):
        get_runtime(InferenceEnv(runtime="deepsparse", phase="decode", context_length=64))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_model_runs_in_deepsparse_as_in_onnx_runtime(tmp_path, precision):
    path, inputs = tiny_file(tmp_path, precision)
    (expected,) = get_runtime(ONNX_RUNTIME).load(path).run(inputs)
    session = get_runtime(DEEPSPARSE_ENV).load(path)
    assert session.input_shapes["input_ids"] == ("batch", "sequence")  # compiled per shape it is run on
    (output,) = session.run(inputs)
    scale = float(np.abs(expected).max())
    assert np.abs(output - expected).max() <= (1e-4 if precision == "fp32" else 0.05) * scale


def test_deepsparse_gets_a_copy_converted_where_the_file_is_newer_than_it_accepts(tmp_path):
    path, inputs = tiny_file(tmp_path)
    original = path.read_bytes()
    runtime = get_runtime(DEEPSPARSE_ENV)
    runtime.load(path).run(inputs)
    assert path.read_bytes() == original  # DeepSparse rewrites the file it compiles: never the caller's
    model = onnx.load(str(path))
    model.ir_version = 10
    newer = tmp_path / "newer.onnx"
    onnx.save(model, str(newer))
    (workdir := tmp_path / "copies").mkdir()
    assert onnx.load(str(private_copy(newer, onnx.load(str(newer)), workdir))).ir_version == 9
    np.testing.assert_allclose(runtime.load(newer).run(inputs)[0], get_runtime(ONNX_RUNTIME).load(path).run(inputs)[0],
                               rtol=1e-4, atol=1e-5)


def test_timing_runs_in_the_worker_and_its_cpu_time_is_our_own(tmp_path):
    path, inputs = tiny_file(tmp_path, hidden=128, ffn=512)
    runtime = get_runtime(DEEPSPARSE_ENV)
    a, b = runtime.load(path), runtime.load(path)
    calls = {"a": Call(a, inputs), "b": Call(b, inputs)}
    assert holding_timer(calls) == runtime.worker.time_calls
    with pytest.raises(ValueError, match="different processes"):  # never interleaved across a pipe
        holding_timer({"a": Call(a, inputs), "ort": Call(get_runtime(ONNX_RUNTIME).load(path), inputs)})
    before, began = cpu_snapshot(), time.monotonic()
    stats = time_interleaved(calls, rounds=10_000, warmup=2, max_seconds=1.0)
    after, wall = cpu_snapshot(), time.monotonic() - began
    assert len(stats["a"].samples_ms) == len(stats["b"].samples_ms) >= 2
    # the worker ran one core for the second: were its CPU time not ours, this process would show almost none
    assert (after.own - before.own) / os.sysconf("SC_CLK_TCK") >= 0.5 * min(wall, 1.0)


def test_a_latency_table_and_a_paired_verdict_run_in_deepsparse(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    config = tiny_bert_config()
    table, cached = lt.get_or_build_table(config, DEEPSPARSE_ENV, 32, QUICK, progress=lambda _: None)
    assert not cached and table.environment["name"] == "deepsparse" and table.max_speedup() > 1.0
    path, inputs = tiny_file(tmp_path)
    verifier = PairedVerifier(get_runtime(DEEPSPARSE_ENV), DEEPSPARSE_ENV, path, inputs, QUICK, 0.03)
    check = verifier.verdict(path)
    assert 0.8 < check.speedup.value < 1.25 and len(check.blocks) >= QUICK.verdict_repeats  # dense against itself


def test_sparse_weights_make_a_file_faster_in_deepsparse(tmp_path):
    """What the runtime is for: 90% zeros in every weight matrix of a BERT-base-wide layer stack, timed paired on 128
    tokens (on 16, its sparse kernels were slower than its dense ones here: 0.70x)."""
    config = tiny_bert_config(hidden=768, ffn=3072, heads=12, layers=2)
    torch.manual_seed(0)
    inputs = adapter_for(config).example_inputs(config, 1, 128)
    path = export_model(build_model(config), tmp_path / "dense.onnx", 1, 128)
    model = onnx.load(str(path))
    for weight in model.graph.initializer:
        values = onnx.numpy_helper.to_array(weight)
        if values.ndim == 2 and min(values.shape) >= 768:
            threshold = np.quantile(np.abs(values), 0.9)
            weight.CopyFrom(onnx.numpy_helper.from_array(np.where(np.abs(values) < threshold, 0, values), weight.name))
    sparse = tmp_path / "sparse.onnx"
    onnx.save(model, str(sparse))
    env = DEEPSPARSE_ENV.model_copy(update={"sequence_length": 128})
    verifier = PairedVerifier(get_runtime(env), env, path, inputs, QUICK, 0.03)
    assert verifier.measure(sparse, repeats=3).speedup.value > 1.5  # 3.3x here


def test_a_corrupt_file_a_dead_worker_and_a_missing_environment_are_clear_errors(tmp_path, monkeypatch):
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"not an onnx model")
    runtime = get_runtime(DEEPSPARSE_ENV)
    with pytest.raises(BadInputError, match="deepsparse cannot load"):
        runtime.load(corrupt)
    path, inputs = tiny_file(tmp_path, name="tiny.onnx")
    session = runtime.load(path)
    os.kill(runtime.worker.process.pid, signal.SIGKILL)
    runtime.worker.process.wait()
    with pytest.raises(WorkerError, match="the worker process ended during `run`"):
        session.run(inputs)
    assert get_runtime(DEEPSPARSE_ENV).load(path).run(inputs)  # the next runtime starts a new worker
    monkeypatch.setenv("ZIPLM_ENGINES", str(tmp_path / "no-engines"))
    with pytest.raises(MissingEngineError, match=r"not installed: run `ziplm runtimes install deepsparse`"):
        get_runtime(DEEPSPARSE_ENV)
    result = CliRunner().invoke(app, ["latency-table", "--model", "bert-base", "--runtime", "deepsparse"])
    assert result.exit_code == 2 and "ziplm runtimes install deepsparse" in " ".join(result.output.split())


def test_the_runtimes_command_lists_engines_and_installs_only_what_has_an_environment():
    listed = CliRunner().invoke(app, ["runtimes", "list"])
    assert listed.exit_code == 0 and "deepsparse" in listed.output and "ready" in listed.output
    refused = CliRunner().invoke(app, ["runtimes", "install", "onnxruntime"])
    assert refused.exit_code == 2 and "runs in the core environment" in refused.output
    assert CliRunner().invoke(app, ["runtimes", "install", "tensorrt-typo"]).exit_code == 2


def test_a_family_is_built_and_verified_in_deepsparse(tmp_path, monkeypatch, tiny_bert_dir, toy_sentiment_csv):
    """`ziplm run` with runtime deepsparse: its table, closed loop and verdicts, the files scored in DeepSparse (one
    engine per batch shape), and `ziplm verify` re-measuring the member there."""
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert_dir, toy_sentiment_csv,
                                                 environment={"runtime": "deepsparse", "threads": 1,
                                                              "sequence_length": 32})))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output  # built to pass: a tolerance far wider than the noise
    report = json.loads((out / "report.json").read_text())
    (member,) = report["members"]
    assert member["runtime"]["name"] == "deepsparse" and member["runtime"]["version"] == "1.8.0"
    folder = out / member["name"]
    session = SessionModule(get_runtime(DEEPSPARSE_ENV).load(folder / "model.onnx"))  # batches of several shapes
    scored = load_task(TaskSpec(**report["recipe"]["task"])).evaluate(session, AutoTokenizer.from_pretrained(folder))
    assert scored.value == pytest.approx(member["metric"]["value"], abs=0.02)
    verified = CliRunner().invoke(app, ["verify", str(out / member["name"]), "--effort", "quick"])
    assert verified.exit_code in (0, 1) and "deepsparse" in verified.output, verified.output
