"""The Runtime interface, the inference environment it is measured in, and the explicit runtime registry."""

from __future__ import annotations

import inspect
import platform
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ziplm.errors import BadInputError

if TYPE_CHECKING:
    from ziplm.runtimes.worker import EngineEnvironment


Precision = Literal["fp32", "int8"]  # int8: QuantizeLinear/DequantizeLinear models (ziplm.stages.quantize)
# sequence: the whole sequence in, every position's output out (model.onnx). A decoder generating (generation.onnx):
# prefill, a prompt of sequence_length tokens on an empty KV cache (time to first token); decode, one token on a cache
# of context_length tokens (time per output token); request, a whole greedy request: the prefill of the prompt, which
# gives the first new token, then a decode step for each of the other new_tokens - 1 (time to the last token).
Phase = Literal["sequence", "prefill", "decode", "request"]


class InferenceEnv(BaseModel):
    """Where a model will be served; every latency figure and table is tied to one of these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runtime: str = "onnxruntime"
    threads: int = Field(2, ge=1)
    batch_size: int = Field(1, ge=1)
    sequence_length: int = Field(128, ge=1)
    precision: Precision = "fp32"
    options: dict[str, Any] = Field(default_factory=dict)
    phase: Phase = "sequence"
    context_length: int | None = Field(None, ge=1, description="decode: the cache length one new token is timed on")
    new_tokens: int | None = Field(None, ge=1, description="request: the tokens one request generates")
    sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="the fraction of the prunable weights the served files "
                            "have zero: timed files are made that sparse, for runtimes whose kernels skip zeros")
    device: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="measured on a node of "
                               "the Ray cluster (--ray) that offers the resource device:NAME (runtimes/fleet.py)")

    @model_validator(mode="after")
    def _phase_settings(self) -> InferenceEnv:
        if self.phase == "decode" and self.context_length is None:
            raise ValueError("phase decode times one new token on a cache of context_length tokens: set "
                             "context_length")
        if self.phase != "decode" and self.context_length is not None:
            raise ValueError(f"context_length is the cache length of phase decode; phase {self.phase} has none")
        if (self.phase == "request") != (self.new_tokens is not None):
            raise ValueError("phase request times a prompt and new_tokens generated tokens: set new_tokens" if
                             self.phase == "request" else f"new_tokens belongs to phase request, not {self.phase}")
        return self

    def record(self) -> dict[str, Any]:
        """The settings as a table or manifest records them beside its runtime's info (whose `device` is the CPU):
        the fleet's device, where there is one, as `fleet_device`."""
        return self.model_dump(exclude={"device"}) | ({"fleet_device": self.device} if self.device else {})

    def in_phase(self, phase: Phase, context_length: int | None = None,
                 new_tokens: int | None = None) -> InferenceEnv:
        """This environment in another phase (validated: decode needs its context length, request its new tokens)."""
        return InferenceEnv.model_validate({**self.model_dump(), "phase": phase, "context_length": context_length,
                                            "new_tokens": new_tokens})

    @property
    def decode_steps(self) -> int:
        """A request's decode steps: every new token but the first, which the prefill gives."""
        return (self.new_tokens or 1) - 1

    @property
    def decode_context(self) -> int:
        """The cache length this environment's time per token is taken at: decode, its context_length; a request,
        the mean cache length of its decode steps (sequence_length + (new_tokens - 2) / 2, rounded down: a step's
        time grows linearly with its cache); otherwise the first step after the prompt (sequence_length)."""
        if self.phase == "decode":
            return self.context_length  # type: ignore[return-value]
        return self.sequence_length + (max(self.new_tokens, 2) // 2 - 1 if self.new_tokens else 0)

    def request_phases(self) -> tuple[InferenceEnv, InferenceEnv]:
        """A request's two phases: the prefill of its prompt, and a decode step at its mean cache length."""
        return self.in_phase("prefill"), self.in_phase("decode", self.decode_context)

    def describe_phase(self) -> str:
        """e.g. "time per token at context 512" ("" for the whole-sequence phase)."""
        if self.phase == "prefill":
            return f"time to first token of {self.sequence_length} prompt tokens"
        if self.phase == "request":
            return f"time to the last of {self.new_tokens} tokens generated after {self.sequence_length} prompt tokens"
        return f"time per token at context {self.context_length}" if self.phase == "decode" else ""


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
    """A loaded model, ready to run; `input_shapes` as the file declares them (a name for a dynamic axis)."""

    input_names: tuple[str, ...]
    input_shapes: dict[str, tuple[int | str, ...]]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class SessionModule(nn.Module):
    """A loaded session called like a Hugging Face model (keyword int64 tensors in, its first output out), so that the
    deployed file is scored by the same task code as the PyTorch model."""

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: inputs[name].cpu().numpy().astype(np.int64) for name in self.session.input_names}
        return torch.from_numpy(self.session.run(feed)[0])


class Runtime(ABC):
    """An inference runtime: loads ONNX files and runs them with fixed settings, and says what it is."""

    name: ClassVar[str]
    phases: ClassVar[tuple[Phase, ...]] = ("sequence", "prefill", "decode", "request")  # what it can time
    precisions: ClassVar[tuple[Precision, ...]] = ("fp32", "int8")  # the files it runs
    program: ClassVar[bool] = False  # True: it runs the torch.export program written beside each ONNX file
    environment: ClassVar[EngineEnvironment | None] = None  # its own Python environment, where it needs one

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


def runtime_class(name: str) -> type[Runtime]:
    if name not in _RUNTIMES:
        raise BadInputError(f"unknown runtime {name!r}; available runtimes: {', '.join(available_runtimes())}")
    return _RUNTIMES[name]


def get_runtime(env: InferenceEnv) -> Runtime:
    """The runtime named by the environment, configured with its threads and options; for an environment measured on a
    device of the fleet, anywhere but on that device, the device's runtime as seen from here (runtimes.fleet), which
    needs no engine installed here."""
    cls = runtime_class(env.runtime)
    if env.phase not in cls.phases:
        able = ", ".join(name for name, other in sorted(_RUNTIMES.items()) if env.phase in other.phases)
        raise BadInputError(f"runtime {env.runtime!r} cannot time phase {env.phase}: it times "
                            f"{', '.join(cls.phases)} only; runtimes that time {env.phase}: {able}")
    if env.precision not in cls.precisions:
        able = ", ".join(name for name, other in sorted(_RUNTIMES.items()) if env.precision in other.precisions)
        raise BadInputError(f"runtime {env.runtime!r} runs {', '.join(cls.precisions)} files only, not "
                            f"{env.precision}; runtimes that run {env.precision}: {able}")
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "threads"}
    unknown = set(env.options) - allowed
    if unknown:
        raise BadInputError(
            f"unknown option(s) {', '.join(sorted(unknown))} for runtime {env.runtime!r}; "
            f"allowed: {', '.join(sorted(allowed)) or 'none'}"
        )
    if env.device:
        from ziplm.runtimes import fleet

        if not fleet.on_device(env.device):  # the runtime is the device's: here, a handle on it (fleet.DeviceRuntime)
            return fleet.DeviceRuntime(cls.name, env)
    return cls(threads=env.threads, **env.options)


# Instruction-set extensions that inference kernels dispatch on (ONNX Runtime's MLAS picks its GEMM and INT8 kernels by
# them). Hypervisors often mask the model name (two CPUs with different INT8 speed both say "AMD EPYC"), so these and
# the family/model numbers name the CPU.
KERNEL_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                   "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",  # x86 ("flags")
                   "asimd", "asimddp", "i8mm", "bf16", "sve", "sve2")  # Arm ("Features")
_GENERATION_FIELDS = ("cpu family", "model", "stepping", "CPU implementer", "CPU part", "CPU variant")
CPUINFO = Path("/proc/cpuinfo")


def cpu_fields() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    try:
        first = CPUINFO.read_text().split("\n\n", 1)[0]
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in first.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_features() -> set[str]:
    """The instruction-set extensions the CPU reports (x86 "flags", Arm "Features")."""
    return _features(cpu_fields())


def _features(fields: dict[str, str]) -> set[str]:
    return set((fields.get("flags") or fields.get("Features") or "").split())


def cpu_identity() -> str:
    """The CPU as far as kernel speed goes: model name, generation numbers and the kernel-relevant instruction-set
    extensions it has, e.g. "AMD EPYC (cpu family 25, model 1, stepping 1; avx avx2 fma f16c)". Part of every latency
    fingerprint and of the device every measurement names."""
    fields = cpu_fields()
    present = _features(fields)
    name = fields.get("model name") or platform.processor() or platform.machine()
    generation = ", ".join(f"{key} {fields[key]}" for key in _GENERATION_FIELDS if key in fields)
    features = " ".join(feature for feature in KERNEL_FEATURES if feature in present)
    details = "; ".join(part for part in (generation, features) if part)
    return f"{name} ({details})" if details else name
