"""Inference runtimes behind one small interface. Importing this package registers every runtime."""

from ziplm.runtimes import onnxruntime_cpu, onnxruntime_gpu, openvino_cpu  # noqa: F401  (registers the runtimes)
from ziplm.runtimes.base import (InferenceEnv, Runtime, RuntimeInfo, Session, SessionModule, available_runtimes,
                                 get_runtime)

__all__ = ["InferenceEnv", "Runtime", "RuntimeInfo", "Session", "SessionModule", "available_runtimes", "get_runtime"]
