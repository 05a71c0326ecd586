"""ONNX Runtime on the CPU execution provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ziplm.errors import BadInputError
from ziplm.runtimes.base import Runtime, RuntimeInfo, cpu_features, cpu_identity, register_runtime

_X86_VNNI = {"avx512_vnni", "avx_vnni", "amx_int8"}


def int8_pair_sums_saturate() -> bool:
    """Whether this CPU's u8 x s8 kernels in ONNX Runtime saturate: x86 without VNNI multiplies with VPMADDUBSW,
    which adds each pair of u8 x s8 products in 16 bits, clipped at 32767 (255 x 127 x 2 = 64770). Weights within
    -63..63 never reach it (benchmarks/results/int8_parity.md measures what that costs in accuracy)."""
    features = cpu_features()
    return "avx2" in features and not features & _X86_VNNI


_OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OrtSession:
    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self.input_names = tuple(i.name for i in session.get_inputs())
        self.input_shapes = {i.name: tuple(i.shape) for i in session.get_inputs()}

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(None, {name: inputs[name] for name in self.input_names})


@register_runtime
class OnnxRuntimeCPU(Runtime):
    """Options: `graph_optimization` (disabled / basic / extended / all, default all) and `allow_spinning`.

    Spinning is off by default: a thread pool that busy-waits after a run steals the cores of the next session,
    which corrupts interleaved timing of several loaded models (and costs a shared server CPU for nothing).
    """

    name = "onnxruntime"

    def __init__(self, threads: int = 2, graph_optimization: str = "all", allow_spinning: bool = False) -> None:
        if graph_optimization not in _OPTIMIZATION_LEVELS:
            raise BadInputError(
                f"unknown graph_optimization {graph_optimization!r} for onnxruntime; "
                f"choose one of {', '.join(_OPTIMIZATION_LEVELS)}"
            )
        self.threads = threads
        self.graph_optimization = graph_optimization
        self.allow_spinning = allow_spinning

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = _OPTIMIZATION_LEVELS[self.graph_optimization]
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        return options

    def load(self, onnx_path: Path) -> OrtSession:
        try:
            session = ort.InferenceSession(str(onnx_path), self.session_options(), providers=["CPUExecutionProvider"])
        except Exception as error:  # ORT raises its own exception types for corrupt or invalid files
            raise BadInputError(f"onnxruntime cannot load {onnx_path}: {error}") from error
        return OrtSession(session)

    def save_optimized(self, onnx_path: Path, out_path: Path) -> Path:
        """Write the graph as this runtime's session optimises it (which kernels really run, e.g. INT8 ones)."""
        options = self.session_options()
        options.optimized_model_filepath = str(out_path)
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        return Path(out_path)

    def info(self) -> RuntimeInfo:
        return RuntimeInfo(
            name=self.name,
            version=ort.__version__,
            device=f"CPU ({cpu_identity()})",
            threads=self.threads,
            options={"graph_optimization": self.graph_optimization, "allow_spinning": self.allow_spinning},
        )
