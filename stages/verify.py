"""Verification: a member's speedup measured end to end against the dense model, paired, in the target runtime,
the closed loop that re-solves a target until its member is measured within tolerance, and latency SLAs.

    verification: {tolerance: 0.03, max_rounds: 6, finish_rounds: 2, round_repeats: 3, finished_repeats: 9,
                   verdict_width: 0.02, max_verdict_repeats: 27, precision_blocks: 20, timing_rounds: 60, warmup: 5,
                   reference: same}
    slas: [{p90_ms: 12.0}, {median_ms: 8.0, batch_size: 1, sequence_length: 128}]

A verdict (on a fine-tuned file, the fresh reading that confirms a closed-loop round, the cross-check, `ziplm
verify`) is the median of at least `finished_repeats` paired measurements, two more at a time while the
distribution-free 95% interval of that median reaches further than `verdict_width` from it, at most
`max_verdict_repeats`: where the machine's speed shifts between regimes for minutes, 9 measurements split wherever the
shifts fall, and the verdict with them (benchmarks/results/verdict_settling.md).

`reference: fp32` makes an INT8 family's speedups (and SLAs) over the dense FP32 model: its members are timed
directly beside dense FP32, paired, like any member beside its reference. The INT8 latency table predicts speedups
over dense INT8, so the closed loop scales its predictions by the precision factor (dense INT8 over dense FP32, the
median of `precision_blocks` paired measurements; `table_scale`): the factor aims, the direct measurements judge.

An SLA bounds one latency statistic (p90 or median, in ms) at the environment's batch size and sequence length
(the latency table's shape; naming others is only a check that they agree). It becomes a speedup target with the
measured dense latency: target = dense_ms / (sla_ms * (1 - tolerance)), so that a member measured at the low end
of the tolerance still meets the SLA. The member passes when its measured statistic is at most the SLA's ms.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers import PreTrainedModel

from ziplm.families import ModelStructure
from ziplm.runtimes import InferenceEnv, Runtime, Session
from ziplm.runtimes.latency_table import LatencyTable
from ziplm.runtimes.timing import (BusyMachineWarning, LoadGuard, MachineLoad, Speedup, TimingStats,
                                   WideIntervalWarning, median_ci, median_ci_coverage, median_half_width,
                                   time_interleaved, time_paired)
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
    max_rounds: int = Field(6, ge=1, description="solve-measure rounds per target (closed loop)")
    finish_rounds: int = Field(2, ge=1, description="times the chain may fine-tune a member: when the fine-tuned "
                                                    "file misses the target, the closed loop goes on and the chain "
                                                    "fine-tunes the structure it then chooses")
    reference: Literal["same", "fp32"] = Field(
        "same", description="the dense model a target's speedup is over: 'same' = the dense model in the environment's "
                            "precision; 'fp32' = the dense FP32 model, so an INT8 family promises its speedups over "
                            "the model served in FP32 today")
    timing_rounds: int = Field(60, ge=5, description="interleaved dense/member pairs per measurement")
    round_repeats: int = Field(3, ge=1, description="independent measurements of each closed-loop round's file, whose "
                                                    "median is its reading (one 2-second measurement of an INT8 "
                                                    "member read 4.5% high and stopped the loop on a slow structure)")
    finished_repeats: int = Field(9, ge=1, description="independent measurements a verdict takes at least, whose "
                                                       "median it is: of a fine-tuned file (its fine-tuning cannot be "
                                                       "redone cheaply), of the fresh reading that confirms a "
                                                       "closed-loop round, of the cross-check; more while unsettled "
                                                       "(verdict_width)")
    precision_blocks: int = Field(20, ge=1, description="INT8 families: independent paired measurements of dense "
                                                        "INT8 against dense FP32 whose median is the precision factor")
    warmup: int = Field(5, ge=0)
    max_other_load: float = Field(0.1, ge=0.0, description="a paired measurement during which other processes, "
                                                           "kernel threads or the hypervisor kept more than this "
                                                           "many cores busy is taken again: a busy core slows the "
                                                           "dense model and a small member unequally (on 2 cores, "
                                                           "beside one busy core a 4x INT8 member read -12% to "
                                                           "+20%, a 2x FP32 member -21%)")
    retakes: int = Field(3, ge=0, description="times a disturbed measurement is taken again (after a pause); then "
                                              "the least disturbed one counts and the check records it as disturbed")
    verdict_width: float = Field(0.02, gt=0.0, description="a verdict (finished_repeats measurements) goes on, two "
                                                           "measurements at a time, while the 95% interval of their "
                                                           "median reaches further than this from it (relative): on "
                                                           "a host whose speed shifts for minutes, 9 measurements "
                                                           "split wherever the shifts fall (one verdict's read 4.17, "
                                                           "4.88, 4.95, 4.88, 4.93, 3.56, 3.58, 3.71, 4.12)")
    max_verdict_repeats: int = Field(27, ge=1, description="at most this many measurements per verdict; a verdict "
                                                           "still unsettled then is their median, with a warning")

    @model_validator(mode="after")
    def _verdict_repeats(self) -> VerificationSettings:
        if self.max_verdict_repeats < self.finished_repeats:
            raise ValueError(f"max_verdict_repeats ({self.max_verdict_repeats}) is below finished_repeats "
                             f"({self.finished_repeats}): a verdict takes at least finished_repeats measurements")
        return self

    @property
    def guard(self) -> LoadGuard:
        return LoadGuard(self.max_other_load, self.retakes)


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


class PairedVerifier:
    """Holds the session of a dense model and the inputs, and measures members timed beside it."""

    def __init__(self, runtime: Runtime, env: InferenceEnv, dense_onnx: Path, vocab_size: int,
                 settings: VerificationSettings) -> None:
        self.runtime = runtime
        self.env = env
        self.settings = settings
        self.inputs: dict[str, np.ndarray] = encoder_inputs(vocab_size, env.batch_size, env.sequence_length)
        self.dense: Session = runtime.load(dense_onnx)

    def measure(self, member_onnx: Path, repeats: int = 1) -> LatencyCheck:
        """The member's speedup, timed interleaved. With `repeats`, that many independent measurements and the
        median one: a stretch of a shared machine disturbed for the whole of one measurement (seen on 2 cores: a file
        of unchanged structure read 14% slow, with a tight interval) then decides nothing."""
        return median_check(self.measure_blocks(member_onnx, repeats))

    def verdict(self, member_onnx: Path) -> LatencyCheck:
        """A verdict on a member: `finished_repeats` measurements, and two more at a time while the interval of their
        median reaches further than `verdict_width` from it, up to `max_verdict_repeats`."""
        settings = self.settings
        member = self.runtime.load(member_onnx)
        checks = [self.quiet_block(member) for _ in range(settings.finished_repeats)]
        while len(checks) < settings.max_verdict_repeats and not self.settled(checks):
            checks += [self.quiet_block(member) for _ in range(min(2, settings.max_verdict_repeats - len(checks)))]
        self.warn_if_disturbed(checks, member_onnx)
        verdict = median_check(checks)
        if not self.settled(checks):
            warnings.warn(f"the {len(checks)} paired measurements of {member_onnx.name} disagree: their median "
                          f"{verdict.speedup.value:.3f}x has the 95% interval [{verdict.speedup.ci_low:.3f}, "
                          f"{verdict.speedup.ci_high:.3f}], wider than +-{settings.verdict_width:.0%}: the "
                          "machine's speed shifts while it measures; verify on a quieter machine, or raise "
                          "max_verdict_repeats", WideIntervalWarning, stacklevel=2)
        return verdict

    def settled(self, checks: list[LatencyCheck]) -> bool:
        return median_half_width([check.speedup.value for check in checks]) <= self.settings.verdict_width

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
                          f"{self.settings.max_other_load:g}), after {self.settings.retakes} retakes each: keep "
                          "other work off the machine while verifying", BusyMachineWarning, stacklevel=3)

    def quiet_block(self, member: Session) -> LatencyCheck:
        """One paired measurement, taken again while other work kept cores busy during it (LoadGuard); the least
        disturbed counts."""
        kept, retaken, disturbed = self.settings.guard.take(
            lambda: LatencyCheck(*time_paired(lambda: self.dense.run(self.inputs), lambda: member.run(self.inputs),
                                              self.settings.timing_rounds, self.settings.warmup,
                                              max_relative_width=2 * self.settings.tolerance)),
            lambda check: check.speedup.other_load)
        return dataclasses.replace(kept, retaken=retaken, disturbed=int(disturbed))

    def measure_dense(self) -> TimingStats:
        """The dense model's latency on its own (the reference that turns latency SLAs into speedup targets)."""
        return time_interleaved({"dense": lambda: self.dense.run(self.inputs)}, self.settings.timing_rounds,
                                self.settings.warmup)["dense"]


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
class PrecisionFactor:
    """How much faster the dense INT8 model runs than the dense FP32 one: the median of independent paired blocks.

    It turns the INT8 latency table's speedups (over dense INT8) into speedups over dense FP32, for aiming only: a
    member's speedup over FP32 is timed directly beside dense FP32. (Judging by member/INT8 times this factor was
    tried: timed in the same minutes, the product and the direct reading agree within 1%, and are as noisy per
    block, 2.5-4%; but the ratio drifts about 3% over minutes, and a factor timed 20 minutes before the verdict put
    a file the product read at 3.91x at 3.56x directly.)"""

    value: float
    blocks: tuple[float, ...]

    @classmethod
    def measure(cls, fp32: PairedVerifier, int8_onnx: Path, blocks: int) -> PrecisionFactor:
        values = tuple(check.speedup.value for check in fp32.measure_blocks(int8_onnx, blocks))
        return cls(float(np.median(values)), values)

    def to_json(self) -> dict[str, Any]:
        return {"value": round(self.value, 4), "blocks": len(self.blocks), "min": round(min(self.blocks), 4),
                "max": round(max(self.blocks), 4)}


@dataclass
class Round:
    """One solve-build-measure round of the closed loop for one target."""

    solved_for: float
    structure: ModelStructure
    predicted_speedup: float
    check: LatencyCheck
    seconds: dict[str, float] = field(default_factory=dict)  # wall-clock of solve, build, export, verify
    stage: str = "closed loop"  # or "finished": the same structure after the chain's fine-tuning, measured again
    screening: LatencyCheck | None = None  # a confirmed round: the reading that stopped the loop (`check` confirms it)
    accuracy_by_stage: dict[str, float] = field(default_factory=dict)  # a finished round: after each fine-tuning stage

    def to_json(self, target: float) -> dict[str, Any]:
        screening = {"screening_measurements": [round(v, 4) for v in self.screening.blocks]} if self.screening else {}
        accuracy = {"accuracy_by_stage": self.accuracy_by_stage} if self.accuracy_by_stage else {}
        return {"stage": self.stage, "solved_for": round(self.solved_for, 4),
                "predicted_speedup": round(self.predicted_speedup, 4),
                "measured_speedup": round(self.check.speedup.value, 4), "speedup_ci": self.check.speedup.to_json(),
                "measurements": [round(value, 4) for value in self.check.blocks], "machine_load":
                self.check.load_json(), **screening,
                "deviation": round(self.check.deviation(target), 4), "structure": self.structure.to_json(),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, **accuracy}


@dataclass
class Member:
    """A target's model: every round of its closed loop and of the chain's fine-tuning, and the chosen one."""

    target: float
    sla: LatencySLA | None = None
    rounds: list[Round] = field(default_factory=list)
    models: list[PreTrainedModel] = field(default_factory=list)
    onnx_paths: list[Path] = field(default_factory=list)
    accuracy: float = float("nan")
    # per finished round: the fine-tuned model before oBERT and QAT (where gradual ZipLM goes on from)
    structured_models: dict[int, PreTrainedModel] = field(default_factory=dict)
    cross_check: LatencyCheck | None = None  # INT8 members: the same file against the other precision's dense model
    onnx_accuracy: float | None = None  # INT8 members: the accuracy of the ONNX file itself, in the runtime

    @property
    def chosen(self) -> int:
        """The finished round closest to the target once the chain fine-tuned, else the closed-loop one."""
        finished = [i for i, r in enumerate(self.rounds) if r.stage == "finished"]
        return self._closest(finished or range(len(self.rounds)))

    @property
    def to_finish(self) -> Round | None:
        """The closed-loop round whose structure the chain fine-tunes next: the closest to the target among those
        whose structure was not fine-tuned already (None when there is none)."""
        done = {r.structure for r in self.rounds if r.stage == "finished"}
        fresh = [i for i, r in enumerate(self.rounds) if r.stage == "closed loop" and r.structure not in done]
        return self.rounds[self._closest(fresh)] if fresh else None

    def _closest(self, indices: Iterable[int]) -> int:
        return min(indices, key=lambda i: abs(self.rounds[i].check.deviation(self.target)))

    def finish(self, model: PreTrainedModel, structured: PreTrainedModel, onnx_path: Path, check: LatencyCheck,
               seconds: dict[str, float], accuracy_by_stage: dict[str, float] | None = None) -> None:
        """Record the fine-tuned model of the `to_finish` structure, measured again, as a "finished" round."""
        done = self.to_finish
        if done is None:
            raise ValueError("no closed-loop round has a structure left that was not fine-tuned already")
        self.structured_models[len(self.rounds)] = structured
        self.rounds.append(Round(done.solved_for, done.structure, done.predicted_speedup, check, seconds, "finished",
                                 accuracy_by_stage=dict(accuracy_by_stage or {})))
        self.models.append(model)
        self.onnx_paths.append(onnx_path)

    @property
    def final(self) -> Round:
        return self.rounds[self.chosen]

    @property
    def model(self) -> PreTrainedModel:
        return self.models[self.chosen]

    @property
    def structured(self) -> PreTrainedModel | None:
        return self.structured_models.get(self.chosen)

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
                work: Path, progress: Callable[[str], None], sla: LatencySLA | None = None,
                table_scale: float = 1.0, member: Member | None = None, accept: float | None = None,
                confirm: bool = False) -> Member:
    """Solve, build, export and measure; re-solve with a corrected aim until within `accept` of the target (by
    default the tolerance; bounded by `max_rounds`). Each round's file is read as the median of `round_repeats`
    measurements.

    With `confirm`, a round read within the tolerance is measured again, as a verdict (`PairedVerifier.verdict`), and
    that reading decides whether it is within `accept`:
    the loop stops on the first reading that lands near the target, so the reading it stops on is biased toward it
    (a compound round read 4.048x, its fine-tuned file 3.825x; the same structure, untouched by fine-tuning in speed).
    The screen is the whole tolerance even where `accept` is narrower: a round's reading scatters by a few percent on
    a noisy host, and a compound 3x loop screened at half the tolerance spent its 6 rounds on readings of -1.6% and
    +1.9% that no verdict ever looked at, then fine-tuned a structure chosen on 3 measurements.

    `table_scale` turns the table's speedups (over the dense model it was measured with) into speedups over the
    verifier's dense model: 1 when they are the same model; for an INT8 table whose targets are over the dense
    FP32 model, how much faster the dense INT8 model runs than the dense FP32 one. Aims are in the target's terms.
    Given a `member`, the loop goes on from its rounds (after a finished round missed the target), for at most
    `max_rounds` more.
    """
    settings = verifier.settings
    accept = settings.tolerance if accept is None else accept
    member = member or Member(target, sla)
    reachable = max_speedup(table) * table_scale
    solved_for = next_aim(target, member.rounds) if member.rounds else target
    for _ in range(settings.max_rounds):
        clock = Stopwatch()
        structure = clock.time("solve", solve, min(solved_for, reachable) / table_scale)
        if any(r.structure == structure for r in member.rounds):
            progress(f"solving for {solved_for:.3f}x gives a structure measured already: the rounds so far point back "
                     "to it")
            break
        model = clock.time("build", build, structure)
        onnx_path = work / f"round{len(member.rounds)}.onnx"
        clock.time("export", export_checked, model, onnx_path, verifier.env)
        check, screening = clock.time("verify", verifier.measure, onnx_path, settings.round_repeats), None
        if confirm and abs(check.deviation(target)) <= settings.tolerance:
            screening, check = check, clock.time("confirm", verifier.verdict, onnx_path)
        predicted = table_scale * table.dense_ms() / table.predict_ms(structure)
        member.rounds.append(Round(solved_for, structure, predicted, check, clock.seconds, screening=screening))
        member.models.append(model)
        member.onnx_paths.append(onnx_path)
        confirmed = f" (screened at {screening.speedup.value:.3f}x)" if screening else ""
        progress(f"round {len(member.rounds)}: solved for {solved_for:.3f}x, predicted {predicted:.3f}x, measured "
                 f"{check.speedup.value:.3f}x ({check.interval_note()}){confirmed}{check.load_note()}")
        if abs(check.deviation(target)) <= accept:
            break
        solved_for = next_aim(target, member.rounds)
    return member


def next_aim(target: float, rounds: list[Round]) -> float:
    """The speedup to solve for in the next round of a closed loop: the target over the table's offset.

    A reading shows the table off by measured / predicted for its structure, so aim that much further. The offset is
    pooled over every reading so far (`table_offset`), not taken from the last round: the INT8 table ranks a loop's
    structures within 1-3% of how they time side by side (benchmarks/results/round_structures.md), while a
    3-measurement reading on a noisy host scatters by up to 11%. Re-aiming from single readings chased that scatter:
    a compound 4x loop read 4.302x and 3.891x for two structures the table puts 0.6% apart, and side by side the
    second runs 2.8% faster. Once the pooled aim solves to a structure measured already, the loop stops.
    """
    return target / table_offset(rounds)


def table_offset(rounds: list[Round]) -> float:
    """measured / predicted speedup, pooled over every reading of the rounds (a confirmed round's screening too) as
    the geometric mean weighted by each reading's number of measurements: exp(sum_i n_i log(m_i / p_i) / sum_i n_i)."""
    readings = [(check, r.predicted_speedup) for r in rounds for check in (r.screening, r.check) if check is not None]
    n = np.array([max(1, len(check.blocks)) for check, _ in readings], dtype=float)  # a lone block: one
    log_offsets = np.log([check.speedup.value / predicted for check, predicted in readings])
    return float(np.exp(n @ log_offsets / n.sum()))
