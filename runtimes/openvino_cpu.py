"""OpenVINO on the CPU: reads our ONNX files as they are (FP32, and QuantizeLinear/DequantizeLinear INT8, which it
runs on its 8-bit kernels), compiled for latency with its settings pinned and recorded in `info().options` (and so in
every latency table's fingerprint):

    PERFORMANCE_HINT LATENCY, INFERENCE_NUM_THREADS = threads, NUM_STREAMS 1, INFERENCE_PRECISION_HINT f32

f32 is pinned because OpenVINO otherwise computes in bf16 on CPUs that have it (this one does: avx512_bf16), which
changes a model's outputs and would make its latency incomparable across CPUs. The `openvino` package is part of the
core install; where it is missing, loading the runtime says how to install it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ziplm.errors import BadInputError, MissingEngineError
from ziplm.runtimes.base import Runtime, RuntimeInfo, cpu_identity, register_runtime


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as error:
        raise MissingEngineError("runtime openvino needs the openvino package: `pip install openvino==2026.4.0` in "
                                 "this environment (the core install has it), or choose runtime onnxruntime") from error
    return openvino


class OvSession:
    """A compiled model and one infer request. Inputs are named as the file names them (the read model's ports:
    compiling may rename a port after a tensor it was merged with) and fed by position; dynamic dimensions are "?" in
    `input_shapes`."""

    def __init__(self, model: Any, compiled: Any) -> None:
        self._request = compiled.create_infer_request()
        self._outputs = len(compiled.outputs)
        self.input_names = tuple(port.get_any_name() for port in model.inputs)
        self.input_shapes = {port.get_any_name(): tuple(dim.get_length() if dim.is_static else "?"
                                                        for dim in port.get_partial_shape())
                             for port in model.inputs}

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self._request.infer({index: inputs[name] for index, name in enumerate(self.input_names)})
        return [np.asarray(results[index]) for index in range(self._outputs)]


@register_runtime
class OpenVINOCPU(Runtime):
    """OpenVINO's CPU plugin with the latency settings above (no options: they are pinned)."""

    name = "openvino"

    def __init__(self, threads: int = 2) -> None:
        self.threads = threads
        self.ov = _openvino()
        self.core = self.ov.Core()

    @property
    def settings(self) -> dict[str, str]:
        return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(self.threads), "NUM_STREAMS": "1",
                "INFERENCE_PRECISION_HINT": "f32"}

    def load(self, onnx_path: Path) -> OvSession:
        try:
            model = self.core.read_model(str(onnx_path))
            compiled = self.core.compile_model(model, "CPU", self.settings)
        except Exception as error:  # OpenVINO raises RuntimeError subclasses of its own for unreadable files
            raise BadInputError(f"openvino cannot load {onnx_path}: {error}") from error
        return OvSession(model, compiled)

    def info(self) -> RuntimeInfo:
        return RuntimeInfo(name=self.name, version=self.ov.get_version(), device=f"CPU ({cpu_identity()})",
                           threads=self.threads, options=self.settings)
