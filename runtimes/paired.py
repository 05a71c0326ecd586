"""Paired timing of a member beside its dense model in one runtime: one measurement, the median of several, and a
verdict that takes measurements until their median settles (docs/measurement.md).

A measurement is `policy.timing_rounds` interleaved dense/member pairs (runtimes.timing.time_paired), fewer for a
slow model once `policy.timing_seconds` have passed (at least `policy.min_timing_rounds`), taken again
while other work kept cores busy during it (the policy's LoadGuard). A verdict is the median of at least
`verdict_repeats` measurements, two more at a time while the distribution-free 95% interval of that median reaches
further than `verdict_width` from it, at most `max_verdict_repeats`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ziplm.runtimes.base import InferenceEnv, Runtime, Session
from ziplm.runtimes.policy import MeasurementPolicy
from ziplm.runtimes.timing import (BusyMachineWarning, Call, MachineLoad, Speedup, TimingStats, WideIntervalWarning,
                                   median_ci, median_ci_coverage, median_half_width, time_interleaved, time_paired)


def statistic(stats: TimingStats, metric: str) -> float:
    """The latency statistic an SLA bounds: "p90" or "median"."""
    return stats.p90_ms if metric == "p90" else stats.median_ms


@dataclass(frozen=True)
class LatencyCheck:
    """A member timed interleaved beside a dense model: its speedup over that model and both latencies. A check that
    is the median of several measurements keeps all their speedups, in the order taken (`blocks`), the cores other
    work kept busy during each (`other_loads`), how many were taken again because it was too many (`retaken`) and
    how many stayed over the limit however often they were taken (`disturbed`)."""

    speedup: Speedup
    dense: TimingStats
    member: TimingStats
    blocks: tuple[float, ...] = ()
    other_loads: tuple[float | None, ...] = ()
    retaken: int = 0
    disturbed: int = 0

    def deviation(self, target: float) -> float:
        return self.speedup.value / target - 1.0

    def to_record(self) -> dict[str, Any]:
        """Everything the check holds, for a cache entry (`from_record` reads it back)."""
        return {"speedup": dataclasses.asdict(self.speedup), "dense": self.dense.to_record(),
                "member": self.member.to_record(), "blocks": list(self.blocks), "other_loads": list(self.other_loads),
                "retaken": self.retaken, "disturbed": self.disturbed}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LatencyCheck:
        return cls(Speedup(**record["speedup"]), TimingStats(tuple(record["dense"])),
                   TimingStats(tuple(record["member"])), tuple(record["blocks"]), tuple(record["other_loads"]),
                   record["retaken"], record["disturbed"])

    @property
    def load(self) -> MachineLoad:
        return MachineLoad(self.other_loads, self.retaken, self.disturbed)

    def load_json(self) -> dict[str, Any]:
        return self.load.to_json()

    def interval_note(self) -> str:
        """e.g. "median of 27 measurements, 98% interval [3.950, 4.200]" (one measurement: its own interval)."""
        speedup = self.speedup
        count = f"median of {len(self.blocks)} measurements, " if len(self.blocks) > 1 else ""
        return f"{count}{speedup.confidence:.0%} interval [{speedup.ci_low:.3f}, {speedup.ci_high:.3f}]"

    def load_note(self) -> str:
        """What other work on the machine did to the measurements, when it did anything ("" when nothing)."""
        note = self.load.note("measurements")
        either_way = ": the speedup may be off either way" if self.disturbed else ""
        return f" [{note}{either_way}]" if note else ""


Feeds = Callable[[Session], dict[str, np.ndarray]]  # what a loaded file is fed, where files take different inputs


class PairedVerifier:
    """Holds the session of a dense model and the inputs, and measures members timed beside it. `inputs` are the
    same for every file, or a function of the loaded file (a decoder's KV cache has each file's own head counts)."""

    def __init__(self, runtime: Runtime, env: InferenceEnv, dense_onnx: Path,
                 inputs: dict[str, np.ndarray] | Feeds, policy: MeasurementPolicy, tolerance: float) -> None:
        self.runtime = runtime
        self.env = env
        self.policy = policy
        self.tolerance = tolerance
        self.feeds: Feeds = inputs if callable(inputs) else (lambda _: inputs)
        self.dense: Session = runtime.load(dense_onnx)
        self.dense_inputs = self.feeds(self.dense)

    def measure(self, member_onnx: Path, repeats: int = 1) -> LatencyCheck:
        """The member's speedup, timed interleaved. With `repeats`, that many independent measurements and the
        median one: a stretch of a shared machine disturbed for the whole of one measurement (seen on 2 cores: a file
        of unchanged structure read 14% slow, with a tight interval) then decides nothing."""
        return median_check(self.measure_blocks(member_onnx, repeats))

    def verdict(self, member_onnx: Path) -> LatencyCheck:
        """A verdict on a member: `verdict_repeats` measurements, and two more at a time while the interval of their
        median reaches further than `verdict_width` from it, up to `max_verdict_repeats`."""
        policy = self.policy
        member = self.runtime.load(member_onnx)
        checks = [self.quiet_block(member) for _ in range(policy.verdict_repeats)]
        while len(checks) < policy.max_verdict_repeats and not self.settled(checks):
            checks += [self.quiet_block(member) for _ in range(min(2, policy.max_verdict_repeats - len(checks)))]
        self.warn_if_disturbed(checks, member_onnx)
        verdict = median_check(checks)
        if not self.settled(checks):
            warnings.warn(f"the {len(checks)} paired measurements of {member_onnx.name} disagree: their median "
                          f"{verdict.speedup.value:.3f}x has the 95% interval [{verdict.speedup.ci_low:.3f}, "
                          f"{verdict.speedup.ci_high:.3f}], wider than +-{policy.verdict_width:.0%}: the "
                          "machine's speed shifts while it measures; verify on a quieter machine, or with effort: "
                          "thorough", WideIntervalWarning, stacklevel=2)
        return verdict

    def settled(self, checks: list[LatencyCheck]) -> bool:
        return median_half_width([check.speedup.value for check in checks]) <= self.policy.verdict_width

    def measure_blocks(self, member_onnx: Path, blocks: int) -> list[LatencyCheck]:
        """`blocks` independent paired measurements of the member, in the order they were taken."""
        member = self.runtime.load(member_onnx)
        checks = [self.quiet_block(member) for _ in range(blocks)]
        self.warn_if_disturbed(checks, member_onnx)
        return checks

    def warn_if_disturbed(self, checks: list[LatencyCheck], member_onnx: Path) -> None:
        disturbed = [check.speedup.other_load for check in checks if check.disturbed]
        if disturbed:
            warnings.warn(f"{len(disturbed)} of {len(checks)} paired measurements of {member_onnx.name} were taken "
                          f"while other work kept {max(disturbed):.2f} cores busy (limit "
                          f"{self.policy.max_other_load:g}), after {self.policy.retakes} retakes each: keep "
                          "other work off the machine while verifying", BusyMachineWarning, stacklevel=3)

    def quiet_block(self, member: Session) -> LatencyCheck:
        """One paired measurement, taken again while other work kept cores busy during it (LoadGuard); the least
        disturbed counts."""
        inputs = self.feeds(member)
        kept, retaken, disturbed = self.policy.guard.take(
            lambda: LatencyCheck(*time_paired(Call(self.dense, self.dense_inputs), Call(member, inputs),
                                              self.policy.timing_rounds, self.policy.warmup,
                                              max_relative_width=2 * self.tolerance, span=self.policy.span)),
            lambda check: check.speedup.other_load)
        return dataclasses.replace(kept, retaken=retaken, disturbed=int(disturbed))

    def measure_dense(self) -> TimingStats:
        """The dense model's latency on its own (the reference that turns latency SLAs into speedup targets)."""
        return time_interleaved({"dense": Call(self.dense, self.dense_inputs)}, self.policy.timing_rounds,
                                self.policy.warmup)["dense"]


def verifier_for(runtime: Runtime, env: InferenceEnv, dense_onnx: Path, inputs: dict[str, np.ndarray] | Feeds,
                 policy: MeasurementPolicy, tolerance: float) -> PairedVerifier:
    """A PairedVerifier here, or on the environment's device when it names one (runtimes.fleet.RemoteVerifier: the
    same calls, the timing on the device's node)."""
    if env.device:
        from ziplm.runtimes.fleet import RemoteVerifier

        return RemoteVerifier(runtime, env, dense_onnx, inputs, policy, tolerance)  # type: ignore[return-value]
    return PairedVerifier(runtime, env, dense_onnx, inputs, policy, tolerance)


def median_check(checks: list[LatencyCheck]) -> LatencyCheck:
    """Independent measurements taken together: the median one, keeping every speedup (`blocks`) and load. The
    interval of several is that of their median (median_ci across them, at the coverage their number allows): the
    spread between measurements, which one measurement's own interval cannot show. One keeps its own interval."""
    values = [check.speedup.value for check in checks]
    median = sorted(checks, key=lambda check: check.speedup.value)[len(checks) // 2]
    speedup = median.speedup
    if len(checks) > 1:
        low, high = median_ci(values, speedup.confidence)
        speedup = dataclasses.replace(speedup, ci_low=low, ci_high=high,
                                      confidence=round(median_ci_coverage(len(values), speedup.confidence), 4))
    return dataclasses.replace(median, speedup=speedup, blocks=tuple(values),
                               other_loads=tuple(check.speedup.other_load for check in checks),
                               retaken=sum(check.retaken for check in checks),
                               disturbed=sum(check.disturbed for check in checks))


@dataclass(frozen=True)
class SpeedFactor:
    """How much faster one form of the dense model runs than another: the median of independent paired blocks. The
    precision factor: dense INT8 over dense FP32; the sparsity factor: the dense model at the chain's sparsity over
    the dense model.

    A factor turns a latency table's speedups (over the dense model in the table's form) into speedups over the
    reference, for aiming only: a member's speedup is timed directly beside the reference (docs/measurement.md,
    "INT8 over FP32")."""

    value: float
    blocks: tuple[float, ...]

    @classmethod
    def measure(cls, slower: PairedVerifier, faster_onnx: Path, blocks: int) -> SpeedFactor:
        values = tuple(check.speedup.value for check in slower.measure_blocks(faster_onnx, blocks))
        return cls(float(np.median(values)), values)

    def to_json(self) -> dict[str, Any]:
        return {"value": round(self.value, 4), "blocks": len(self.blocks), "min": round(min(self.blocks), 4),
                "max": round(max(self.blocks), 4)}

    def to_record(self) -> dict[str, Any]:
        return {"value": self.value, "blocks": list(self.blocks)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SpeedFactor:
        return cls(record["value"], tuple(record["blocks"]))
