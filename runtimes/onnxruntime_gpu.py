"""ONNX Runtime on an NVIDIA GPU: the CUDA execution provider, or TensorRT's (FP16 where asked), from the
onnxruntime-gpu build.

That build replaces the CPU one (both install the `onnxruntime` module) and needs CUDA 13 and cuDNN 9 at run time,
TensorRT's libraries for its provider. None of them can be installed on the project's machines (ENVIRONMENT.md), so
here the runtime refuses with what to install, and its tests are skipped with that reason. Timed calls take numpy
inputs and return numpy outputs, so a measured latency includes the copies to and from the GPU, as a Python service
calling the session sees it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import onnxruntime as ort

from ziplm.cache import cache_root
from ziplm.errors import BadInputError, MissingEngineError
from ziplm.runtimes.base import Runtime, RuntimeInfo, register_runtime
from ziplm.runtimes.onnxruntime_cpu import OrtSession

PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def gpu_name(device_id: int) -> str:
    """The GPU's model as nvidia-smi names it (part of every latency fingerprint), or "GPU <id>" without it."""
    if shutil.which("nvidia-smi") is None:
        return f"GPU {device_id}"
    query = subprocess.run(["nvidia-smi", f"--id={device_id}", "--query-gpu=name", "--format=csv,noheader"],
                           capture_output=True, text=True, check=False)
    return query.stdout.strip() or f"GPU {device_id}"


@register_runtime
class OnnxRuntimeGPU(Runtime):
    """Options: `provider` cuda (default) or tensorrt, `fp16` (TensorRT only: it builds FP16 engines from the FP32
    file; the CUDA provider runs the file's own precision), `device_id`."""

    name = "onnxruntime-gpu"

    def __init__(self, threads: int = 2, provider: str = "cuda", fp16: bool = False, device_id: int = 0) -> None:
        if provider not in PROVIDERS:
            raise BadInputError(f"unknown provider {provider!r} for onnxruntime-gpu; choose one of "
                                f"{', '.join(PROVIDERS)}")
        if fp16 and provider != "tensorrt":
            raise BadInputError("fp16 builds TensorRT engines: set provider: tensorrt (the CUDA provider runs the "
                                "file's own precision)")
        available = ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            raise MissingEngineError(
                f"runtime onnxruntime-gpu with provider {provider} needs ONNX Runtime's {PROVIDERS[provider]}, and "
                f"this onnxruntime {ort.__version__} offers {', '.join(available)}: install onnxruntime-gpu=="
                f"{ort.__version__} in place of onnxruntime, with CUDA 13 and cuDNN 9 (and TensorRT for provider "
                "tensorrt) on a machine with an NVIDIA GPU")
        self.threads, self.provider, self.fp16, self.device_id = threads, provider, fp16, device_id

    def providers(self) -> list[tuple[str, dict[str, object]]]:
        cuda = ("CUDAExecutionProvider", {"device_id": self.device_id})
        if self.provider == "cuda":
            return [cuda]
        engines = cache_root() / "tensorrt-engines"  # building an engine takes minutes: keep them
        return [("TensorrtExecutionProvider", {"device_id": self.device_id, "trt_fp16_enable": self.fp16,
                                               "trt_engine_cache_enable": True, "trt_engine_cache_path": str(engines)}),
                cuda]

    def load(self, onnx_path: Path) -> OrtSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(onnx_path), options, providers=self.providers())
        except Exception as error:  # ORT raises its own exception types for corrupt or invalid files
            raise BadInputError(f"onnxruntime-gpu cannot load {onnx_path}: {error}") from error
        if session.get_providers()[0] != PROVIDERS[self.provider]:  # ORT falls back to the next provider silently
            raise MissingEngineError(f"{PROVIDERS[self.provider]} could not take {onnx_path} (ONNX Runtime fell back "
                                     f"to {session.get_providers()[0]}): check the CUDA / TensorRT libraries")
        return OrtSession(session)

    def info(self) -> RuntimeInfo:
        return RuntimeInfo(name=self.name, version=ort.__version__, device=gpu_name(self.device_id),
                           threads=self.threads,
                           options={"provider": self.provider, "fp16": self.fp16, "device_id": self.device_id})
