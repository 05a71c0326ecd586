"""Verification: a member's speedup measured end to end against the dense model, paired, in the target runtime.

    verification: {tolerance: 0.03, max_rounds: 4, timing_rounds: 60, warmup: 5}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ziplm.runtimes import InferenceEnv, Runtime, Session
from ziplm.runtimes.timing import Speedup, TimingStats, time_paired
from ziplm.stages.export import encoder_inputs


class VerificationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tolerance: float = Field(0.03, gt=0.0, lt=1.0, description="allowed |measured / target - 1|")
    max_rounds: int = Field(4, ge=1, description="solve-measure rounds per target (closed loop)")
    timing_rounds: int = Field(60, ge=5, description="interleaved dense/member pairs per measurement")
    warmup: int = Field(5, ge=0)


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
        self.settings = settings
        self.inputs: dict[str, np.ndarray] = encoder_inputs(vocab_size, env.batch_size, env.sequence_length)
        self.dense: Session = runtime.load(dense_onnx)

    def measure(self, member_onnx: Path) -> LatencyCheck:
        member = self.runtime.load(member_onnx)
        speedup, dense, timed = time_paired(lambda: self.dense.run(self.inputs), lambda: member.run(self.inputs),
                                            self.settings.timing_rounds, self.settings.warmup,
                                            max_relative_width=2 * self.settings.tolerance)
        return LatencyCheck(speedup, dense, timed)
