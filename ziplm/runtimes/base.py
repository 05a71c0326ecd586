"""The Runtime interface, the inference environment it is measured in, and the explicit runtime registry."""

from __future__ import annotations

import inspect
import platform
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ziplm.pipeline.errors import BadInputError


Precision = Literal["fp32", "int8"]  # int8: QuantizeLinear/DequantizeLinear models (ziplm.stages.quantize)


class InferenceEnv(BaseModel):
    """Where a model will be served; every latency figure and table is tied to one of these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runtime: str = "onnxruntime"
    threads: int = Field(2, ge=1)
    batch_size: int = Field(1, ge=1)
    sequence_length: int = Field(128, ge=1)
    precision: Precision = "fp32"
    options: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class RuntimeInfo:
    name: str
    version: str
    device: str
    threads: int
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Session(Protocol):
    """A loaded model, ready to run."""

    input_names: tuple[str, ...]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Runtime(ABC):
    """An inference runtime: loads ONNX files and runs them with fixed settings, and says what it is."""

    name: ClassVar[str]

    @abstractmethod
    def load(self, onnx_path: Path) -> Session: ...

    @abstractmethod
    def info(self) -> RuntimeInfo: ...


_RUNTIMES: dict[str, type[Runtime]] = {}


def register_runtime(cls: type[Runtime]) -> type[Runtime]:
    if cls.name in _RUNTIMES:
        raise ValueError(f"runtime {cls.name!r} is registered twice")
    _RUNTIMES[cls.name] = cls
    return cls


def available_runtimes() -> list[str]:
    return sorted(_RUNTIMES)


def get_runtime(env: InferenceEnv) -> Runtime:
    """The runtime named by the environment, configured with its threads and options."""
    if env.runtime not in _RUNTIMES:
        raise BadInputError(
            f"unknown runtime {env.runtime!r}; available runtimes: {', '.join(available_runtimes())}"
        )
    cls = _RUNTIMES[env.runtime]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "threads"}
    unknown = set(env.options) - allowed
    if unknown:
        raise BadInputError(
            f"unknown option(s) {', '.join(sorted(unknown))} for runtime {env.runtime!r}; "
            f"allowed: {', '.join(sorted(allowed)) or 'none'}"
        )
    return cls(threads=env.threads, **env.options)


def cpu_model() -> str:
    """The CPU's model name, part of every latency fingerprint."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
