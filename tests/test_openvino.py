"""The OpenVINO runtime behind the one interface: the same ONNX files as ONNX Runtime (FP32, QDQ INT8 and the
generation artifact with its KV cache) give the same outputs, its pinned latency settings are recorded, latency
tables and paired timing run through it, and bad input is refused clearly."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tests.conftest import QUICK_UNGUARDED as QUICK
from tests.test_generation import decoder, prompts
from ziplm.errors import BadInputError
from ziplm.families import adapter_for
from ziplm.families.loading import build_model
from ziplm.runtimes import InferenceEnv, available_runtimes, get_runtime
from ziplm.runtimes.paired import PairedVerifier
from ziplm.stages import latency_table as lt
from ziplm.stages.export import export_model
from ziplm.stages.generation import export_for_generation, onnx_greedy_generate, torch_greedy_generate
from ziplm.stages.quantize import deployable

OPENVINO = InferenceEnv(runtime="openvino", threads=1, sequence_length=16)


def test_openvino_is_registered_and_records_its_pinned_latency_settings():
    assert {"onnxruntime", "openvino"} <= set(available_runtimes())
    info = get_runtime(OPENVINO).info()
    assert info.name == "openvino" and info.threads == 1 and info.version.startswith("2026.4")
    assert info.options == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": "1", "NUM_STREAMS": "1",
                            "INFERENCE_PRECISION_HINT": "f32"}
    with pytest.raises(BadInputError, match=r"unknown option\(s\) graph_optimization for runtime 'openvino'"):
        get_runtime(OPENVINO.model_copy(update={"options": {"graph_optimization": "all"}}))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_model_runs_in_openvino_as_in_onnx_runtime(tiny_config, precision, tmp_path):
    torch.manual_seed(0)
    adapter = adapter_for(tiny_config)
    inputs = adapter.example_inputs(tiny_config, 2, 16)
    model = deployable(build_model(tiny_config), adapter.prunable_linears, precision,
                       [{k: torch.from_numpy(v) for k, v in inputs.items()}])
    path = export_model(model, tmp_path / "model.onnx", 2, 16)
    (expected,) = get_runtime(OPENVINO.model_copy(update={"runtime": "onnxruntime"})).load(path).run(inputs)
    session = get_runtime(OPENVINO).load(path)
    assert session.input_names == tuple(adapter.input_names(tiny_config))
    (output,) = session.run(inputs)
    scale = float(np.abs(expected).max())
    # fp32: the same arithmetic up to kernel order; int8: each engine rounds its integer kernels its own way
    assert np.abs(output - expected).max() <= (1e-4 if precision == "fp32" else 0.05) * scale


def test_greedy_generation_over_the_cache_in_openvino_equals_transformers(tmp_path):
    model = decoder("llama", "pruned")  # uneven KV heads, the first layer's attention removed
    path = export_for_generation(model, tmp_path / "generation.onnx")
    session = get_runtime(OPENVINO).load(path)
    assert all(shape[1] != "?" and shape[3] != "?" for name, shape in session.input_shapes.items()
               if name.startswith("past_key_values."))  # KV heads and head_dim are concrete
    input_ids, mask = prompts(model.config.vocab_size)
    np.testing.assert_array_equal(onnx_greedy_generate(session, input_ids, 16, mask),
                                  torch_greedy_generate(model, input_ids, 16, mask))


def test_a_latency_table_and_a_paired_measurement_run_in_openvino(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    table, cached = lt.get_or_build_table(tiny_config, OPENVINO, 32, QUICK, progress=lambda _: None)
    assert not cached and table.environment["name"] == "openvino" and table.max_speedup() > 1.0
    shape = adapter_for(tiny_config).shape(tiny_config)
    identity = lt.table_fingerprint(shape, OPENVINO, get_runtime(OPENVINO), 32)["runtime"]
    assert identity["name"] == "openvino" and identity["options"]["INFERENCE_PRECISION_HINT"] == "f32"
    torch.manual_seed(0)
    adapter = adapter_for(tiny_config)
    dense = export_model(build_model(tiny_config), tmp_path / "dense.onnx", 1, 16)
    verifier = PairedVerifier(get_runtime(OPENVINO), OPENVINO, dense, adapter.example_inputs(tiny_config, 1, 16),
                              QUICK, 0.03)
    check = verifier.measure(dense)
    assert 0.8 < check.speedup.value < 1.25  # the dense model against itself


def test_a_corrupt_file_and_a_missing_package_are_clear_errors(tmp_path, monkeypatch):
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"not an onnx model")
    with pytest.raises(BadInputError, match="openvino cannot load"):
        get_runtime(OPENVINO).load(corrupt)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now fails as if it were not installed
    with pytest.raises(BadInputError, match=r"needs the openvino package: `pip install openvino==2026.4.0`"):
        get_runtime(OPENVINO)
