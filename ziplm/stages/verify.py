"""Verification: a member's speedup measured end to end against the dense model, paired, in the target runtime,
the closed loop that re-solves a target until its member is measured within tolerance, and latency SLAs.

    verification: {tolerance: 0.03, max_rounds: 4, timing_rounds: 60, warmup: 5}
    slas: [{p90_ms: 12.0}, {median_ms: 8.0, batch_size: 1, sequence_length: 128}]

An SLA bounds one latency statistic (p90 or median, in ms) at the environment's batch size and sequence length
(the latency table's shape; naming others is only a check that they agree). It becomes a speedup target with the
measured dense latency: target = dense_ms / (sla_ms * (1 - tolerance)), so that a member measured at the low end
of the tolerance still meets the SLA. The member passes when its measured statistic is at most the SLA's ms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers import PreTrainedModel

from ziplm.families import ModelStructure
from ziplm.runtimes import InferenceEnv, Runtime, Session
from ziplm.runtimes.latency_table import LatencyTable
from ziplm.runtimes.timing import Speedup, TimingStats, time_interleaved, time_paired
from ziplm.stages.export import encoder_inputs, export_checked
from ziplm.stages.search import max_speedup

T = TypeVar("T")


class SessionClassifier(nn.Module):
    """A loaded ONNX session called like a Hugging Face model (keyword tensors in, logits out), so the accuracy of
    the deployed file is measured with the same code as PyTorch's (ziplm.stages.finetune.evaluate_accuracy)."""

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: inputs[name].cpu().numpy().astype(np.int64) for name in self.session.input_names}
        return torch.from_numpy(self.session.run(feed)[0])


class VerificationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tolerance: float = Field(0.03, gt=0.0, lt=1.0, description="allowed |measured / target - 1|")
    max_rounds: int = Field(4, ge=1, description="solve-measure rounds per target (closed loop)")
    timing_rounds: int = Field(60, ge=5, description="interleaved dense/member pairs per measurement")
    warmup: int = Field(5, ge=0)


class LatencySLA(BaseModel):
    """At most `p90_ms` (or `median_ms`) per call, measured in the recipe's environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    p90_ms: float | None = Field(None, gt=0.0)
    median_ms: float | None = Field(None, gt=0.0)
    batch_size: int | None = Field(None, ge=1, description="optional; must equal the environment's")
    sequence_length: int | None = Field(None, ge=1, description="optional; must equal the environment's")

    @model_validator(mode="after")
    def _one_bound(self) -> LatencySLA:
        if (self.p90_ms is None) == (self.median_ms is None):
            raise ValueError("an SLA sets exactly one of p90_ms or median_ms, e.g. {p90_ms: 12.0}")
        return self

    @property
    def metric(self) -> str:
        return "p90" if self.p90_ms is not None else "median"

    @property
    def ms(self) -> float:
        return self.p90_ms if self.p90_ms is not None else self.median_ms  # type: ignore[return-value]

    @property
    def label(self) -> str:
        return f"{self.metric}<={self.ms:g}ms"

    def speedup_target(self, dense: TimingStats, tolerance: float) -> float:
        """The speedup that meets the SLA even at the low end of the tolerance (see the module docstring)."""
        return statistic(dense, self.metric) / (self.ms * (1.0 - tolerance))

    def holds(self, measured: TimingStats) -> bool:
        return statistic(measured, self.metric) <= self.ms

    def to_json(self, measured: TimingStats) -> dict[str, Any]:
        return {"metric": self.metric, "ms": self.ms, "measured_ms": round(statistic(measured, self.metric), 4),
                "holds": self.holds(measured)}


def statistic(stats: TimingStats, metric: str) -> float:
    return stats.p90_ms if metric == "p90" else stats.median_ms


@dataclass(frozen=True)
class LatencyCheck:
    speedup: Speedup
    dense: TimingStats
    member: TimingStats

    def deviation(self, target: float) -> float:
        return self.speedup.value / target - 1.0


class PairedVerifier:
    """Holds the dense model's session and the inputs, and measures members against it."""

    def __init__(self, runtime: Runtime, env: InferenceEnv, dense_onnx: Path, vocab_size: int,
                 settings: VerificationSettings) -> None:
        self.runtime = runtime
        self.env = env
        self.settings = settings
        self.inputs: dict[str, np.ndarray] = encoder_inputs(vocab_size, env.batch_size, env.sequence_length)
        self.dense: Session = runtime.load(dense_onnx)

    def measure(self, member_onnx: Path) -> LatencyCheck:
        member = self.runtime.load(member_onnx)
        speedup, dense, timed = time_paired(lambda: self.dense.run(self.inputs), lambda: member.run(self.inputs),
                                            self.settings.timing_rounds, self.settings.warmup,
                                            max_relative_width=2 * self.settings.tolerance)
        return LatencyCheck(speedup, dense, timed)

    def measure_dense(self) -> TimingStats:
        """The dense model's latency on its own (the reference that turns latency SLAs into speedup targets)."""
        return time_interleaved({"dense": lambda: self.dense.run(self.inputs)}, self.settings.timing_rounds,
                                self.settings.warmup)["dense"]


@dataclass
class Round:
    """One solve-build-measure round of the closed loop for one target."""

    solved_for: float
    structure: ModelStructure
    predicted_speedup: float
    check: LatencyCheck
    seconds: dict[str, float] = field(default_factory=dict)  # wall-clock of solve, build, export, verify
    stage: str = "closed loop"  # or "finished": the same structure after the chain's fine-tuning, measured again

    def to_json(self, target: float) -> dict[str, Any]:
        return {"stage": self.stage, "solved_for": round(self.solved_for, 4),
                "predicted_speedup": round(self.predicted_speedup, 4),
                "measured_speedup": round(self.check.speedup.value, 4), "speedup_ci": self.check.speedup.to_json(),
                "deviation": round(self.check.deviation(target), 4), "structure": self.structure.to_json(),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


@dataclass
class Member:
    """A target's model: every round of its closed loop, and the chosen one (closest to the target)."""

    target: float
    sla: LatencySLA | None = None
    rounds: list[Round] = field(default_factory=list)
    models: list[PreTrainedModel] = field(default_factory=list)
    onnx_paths: list[Path] = field(default_factory=list)
    accuracy: float = float("nan")
    structured: PreTrainedModel | None = None  # fine-tuned, before oBERT and QAT: where gradual ZipLM goes on from
    reference_check: LatencyCheck | None = None  # INT8 members: the same file against the dense FP32 model
    onnx_accuracy: float | None = None  # INT8 members: the accuracy of the ONNX file itself, in the runtime

    @property
    def chosen(self) -> int:
        """The finished model once the chain fine-tuned it, else the closed-loop round closest to the target."""
        if self.rounds and self.rounds[-1].stage == "finished":
            return len(self.rounds) - 1
        return min(range(len(self.rounds)), key=lambda i: abs(self.rounds[i].check.deviation(self.target)))

    def finish(self, model: PreTrainedModel, onnx_path: Path, check: LatencyCheck, seconds: dict[str, float]) -> None:
        """Record the fine-tuned model of the chosen structure, measured again, as the member's final round."""
        chosen = self.final
        self.rounds.append(Round(chosen.solved_for, chosen.structure, chosen.predicted_speedup, check, seconds,
                                 "finished"))
        self.models.append(model)
        self.onnx_paths.append(onnx_path)

    @property
    def final(self) -> Round:
        return self.rounds[self.chosen]

    @property
    def model(self) -> PreTrainedModel:
        return self.models[self.chosen]

    @property
    def onnx_path(self) -> Path:
        return self.onnx_paths[self.chosen]

    def passed(self, tolerance: float) -> bool:
        """An SLA member passes when its SLA holds; a speedup member when it is within tolerance of its target."""
        if self.sla is not None:
            return self.sla.holds(self.final.check.member)
        return abs(self.final.check.deviation(self.target)) <= tolerance


class Stopwatch:
    """Wall-clock per named step, summed when a step runs more than once."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def time(self, step: str, function: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        result = function(*args)
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start
        return result


def closed_loop(target: float, solve: Callable[[float], ModelStructure],
                build: Callable[[ModelStructure], PreTrainedModel], table: LatencyTable, verifier: PairedVerifier,
                work: Path, progress: Callable[[str], None], sla: LatencySLA | None = None) -> Member:
    """Solve, build, export and measure; re-solve with a corrected target until within tolerance (bounded).

    When a member misses, the table was off by measured / solved-for at that point; the next round aims that much
    further (ALGORITHMS.md section 3; ZipLM's open loop deviated by up to 5.28%).
    """
    settings = verifier.settings
    member = Member(target, sla)
    dense_ms = table.dense_ms()
    solved_for = target
    for index in range(settings.max_rounds):
        clock = Stopwatch()
        structure = clock.time("solve", solve, min(solved_for, max_speedup(table)))
        model = clock.time("build", build, structure)
        onnx_path = work / f"round{index}.onnx"
        clock.time("export", export_checked, model, onnx_path, verifier.env)
        check = clock.time("verify", verifier.measure, onnx_path)
        predicted = dense_ms / table.predict_ms(structure)
        member.rounds.append(Round(solved_for, structure, predicted, check, clock.seconds))
        member.models.append(model)
        member.onnx_paths.append(onnx_path)
        progress(f"round {index + 1}: solved for {solved_for:.3f}x, predicted {predicted:.3f}x, measured "
                 f"{check.speedup.value:.3f}x [{check.speedup.ci_low:.3f}, {check.speedup.ci_high:.3f}]")
        if abs(check.deviation(target)) <= settings.tolerance:
            break
        solved_for *= target / check.speedup.value
    return member
