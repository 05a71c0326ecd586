"""Inference runtimes behind one small interface. Importing this package registers every runtime."""

from ziplm.runtimes import (deepsparse_cpu, onnxruntime_cpu, onnxruntime_gpu,  # noqa: F401  (registers the runtimes)
                            openvino_cpu, pytorch)
from ziplm.runtimes.base import (InferenceEnv, Runtime, RuntimeInfo, Session, SessionModule, available_runtimes,
                                 get_runtime)

__all__ = ["InferenceEnv", "Runtime", "RuntimeInfo", "Session", "SessionModule", "available_runtimes", "get_runtime"]
