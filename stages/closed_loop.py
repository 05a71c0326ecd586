"""The closed loop: solve a target from the latency table, build and export the member, measure it paired beside
the dense model, and re-solve with a corrected aim until it is measured within tolerance (docs/measurement.md).

    verification: {tolerance: 0.03, max_rounds: 6, reference: same}
    slas: [{p90_ms: 12.0}, {median_ms: 8.0, batch_size: 1, sequence_length: 128}]

A verdict (on a fine-tuned file, the fresh reading that confirms a closed-loop round, the cross-check, `ziplm
verify`) is runtimes.paired.PairedVerifier.verdict.

`reference: fp32` makes an INT8 family's speedups (and SLAs) over the dense FP32 model: its members are timed
directly beside dense FP32, paired, like any member beside its reference. The INT8 latency table predicts speedups
over dense INT8, so the closed loop scales its predictions by the precision factor (`table_scale`): the factor aims,
the direct measurements judge.

An SLA bounds one latency statistic (p90 or median, in ms) at the environment's batch size and sequence length
(the latency table's shape; naming others is only a check that they agree). It becomes a speedup target with the
measured dense latency: target = dense_ms / (sla_ms * (1 - tolerance)), so that a member measured at the low end
of the tolerance still meets the SLA. The member passes when its measured statistic is at most the SLA's ms.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import PreTrainedModel

from ziplm.families import ModelStructure
from ziplm.runtimes.paired import LatencyCheck, PairedVerifier, statistic
from ziplm.runtimes.timing import TimingStats
from ziplm.stages.latency_table import LatencyTable
from ziplm.tasks import Metric

T = TypeVar("T")
Export = Callable[[PreTrainedModel, Path], object]  # writes a member's ONNX file (and checks its parity)


class VerificationSettings(BaseModel):
    """What a user decides about verification; how hard to measure is the recipe's `effort` (runtimes.policy)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tolerance: float = Field(0.03, gt=0.0, lt=1.0, description="allowed |measured / target - 1|")
    max_rounds: int = Field(6, ge=1, description="solve-measure rounds per target (closed loop)")
    reference: Literal["same", "fp32"] = Field(
        "same", description="the dense model a target's speedup is over: 'same' = the dense model in the environment's "
                            "precision; 'fp32' = the dense FP32 model, so an INT8 family promises its speedups over "
                            "the model served in FP32 today")


# what a latency bound in a phase of generation is called (a whole request: its end-to-end latency)
PHASE_LABELS = {"prefill": "TTFT", "decode": "TPOT", "request": "E2E"}


class LatencySLA(BaseModel):
    """At most `p90_ms` (or `median_ms`) per call, measured in the recipe's environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    p90_ms: float | None = Field(None, gt=0.0)
    median_ms: float | None = Field(None, gt=0.0)
    batch_size: int | None = Field(None, ge=1, description="optional; must equal the environment's")
    sequence_length: int | None = Field(None, ge=1, description="optional; must equal the environment's")
    phase: Literal["prefill", "decode", "request"] | None = Field(
        None, description="optional; must equal the environment's: prefill bounds the time to first token (TTFT), "
                          "decode the time per output token (TPOT), request a whole request's time (E2E)")

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
        phase = f"{PHASE_LABELS[self.phase]} " if self.phase else ""
        return f"{phase}{self.metric}<={self.ms:g}ms"

    def speedup_target(self, dense: TimingStats, tolerance: float) -> float:
        """The speedup that meets the SLA even at the low end of the tolerance (see the module docstring)."""
        return statistic(dense, self.metric) / (self.ms * (1.0 - tolerance))

    def holds(self, measured: TimingStats) -> bool:
        return statistic(measured, self.metric) <= self.ms

    def to_json(self, measured: TimingStats) -> dict[str, Any]:
        return {"metric": self.metric, "ms": self.ms, "measured_ms": round(statistic(measured, self.metric), 4),
                "holds": self.holds(measured), "phase": self.phase}


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
    metric_by_stage: dict[str, float] = field(default_factory=dict)  # a finished round: after each fine-tuning stage

    def to_record(self) -> dict[str, Any]:
        """Everything the round holds, for a cache entry (`from_record` reads it back)."""
        return {"solved_for": self.solved_for, "structure": self.structure.to_json(),
                "predicted_speedup": self.predicted_speedup, "check": self.check.to_record(), "seconds": self.seconds,
                "stage": self.stage, "screening": self.screening.to_record() if self.screening else None,
                "metric_by_stage": self.metric_by_stage}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Round:
        screening = record["screening"]
        return cls(record["solved_for"], ModelStructure.from_json(record["structure"]), record["predicted_speedup"],
                   LatencyCheck.from_record(record["check"]), record["seconds"], record["stage"],
                   LatencyCheck.from_record(screening) if screening else None, record["metric_by_stage"])

    def to_json(self, target: float) -> dict[str, Any]:
        screening = {"screening_measurements": [round(v, 4) for v in self.screening.blocks]} if self.screening else {}
        by_stage = {"metric_by_stage": self.metric_by_stage} if self.metric_by_stage else {}
        return {"stage": self.stage, "solved_for": round(self.solved_for, 4),
                "predicted_speedup": round(self.predicted_speedup, 4),
                "measured_speedup": round(self.check.speedup.value, 4), "speedup_ci": self.check.speedup.to_json(),
                "measurements": [round(value, 4) for value in self.check.blocks], "machine_load":
                self.check.load_json(), **screening,
                "deviation": round(self.check.deviation(target), 4), "structure": self.structure.to_json(),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, **by_stage}


@dataclass
class Member:
    """A target's model: every round of its closed loop and of the chain's fine-tuning, and the chosen one.

    While it is built it holds every round's model and file; read back from the cache (`from_record`) it holds the
    chosen round's only (the others' entries are None)."""

    target: float
    sla: LatencySLA | None = None
    rounds: list[Round] = field(default_factory=list)
    models: list[PreTrainedModel | None] = field(default_factory=list)
    onnx_paths: list[Path | None] = field(default_factory=list)
    metric: Metric | None = None  # the task's validation metric of the chosen model
    # per finished round: the fine-tuned model before oBERT and QAT (where gradual ZipLM goes on from)
    structured_models: dict[int, PreTrainedModel] = field(default_factory=dict)
    cross_check: LatencyCheck | None = None  # INT8 members: the same file against the other precision's dense model
    onnx_metric: float | None = None  # INT8 members: the metric of the ONNX file itself, in the runtime

    @property
    def chosen(self) -> int:
        """The finished round closest to the target once the chain fine-tuned, else the closed-loop one."""
        finished = [i for i, r in enumerate(self.rounds) if r.stage == "finished"]
        return self._closest(finished or range(len(self.rounds)), self.target)

    @property
    def to_finish(self) -> Round | None:
        """The closed-loop round whose structure the chain fine-tunes next: the closest to the `aim` among those
        whose structure was not fine-tuned already (None when there is none)."""
        done = {r.structure for r in self.rounds if r.stage == "finished"}
        fresh = [i for i, r in enumerate(self.rounds) if r.stage == "closed loop" and r.structure not in done]
        return self.rounds[self._closest(fresh, self.aim)] if fresh else None

    @property
    def finishing_factor(self) -> float:
        """Finished over closed-loop speedup of the same structure, pooled over the finished rounds (geometric mean;
        1 before any): how much faster the chain's fine-tuned file runs than the file the closed loop measured for
        it. A chain that sparsifies leaves its zeros where oBERT put them, which the loop's magnitude-sparse file
        can only stand in for (benchmarks/results/deepsparse_compound.md: the oBERT file ran ~7% slower)."""
        loop = {r.structure: r for r in self.rounds if r.stage == "closed loop"}
        ratios = [r.check.speedup.value / loop[r.structure].check.speedup.value
                  for r in self.rounds if r.stage == "finished"]
        return float(np.exp(np.mean(np.log(ratios)))) if ratios else 1.0

    @property
    def aim(self) -> float:
        """The speedup the closed loop's own files are aimed at, so that the finished file lands on the target: the
        target over the finishing factor."""
        return self.target / self.finishing_factor

    def _closest(self, indices: Iterable[int], speedup: float) -> int:
        return min(indices, key=lambda i: abs(self.rounds[i].check.deviation(speedup)))

    def finish(self, model: PreTrainedModel, structured: PreTrainedModel, onnx_path: Path, check: LatencyCheck,
               seconds: dict[str, float], metric_by_stage: dict[str, float] | None = None) -> None:
        """Record the fine-tuned model of the `to_finish` structure, measured again, as a "finished" round."""
        done = self.to_finish
        if done is None:
            raise ValueError("no closed-loop round has a structure left that was not fine-tuned already")
        self.structured_models[len(self.rounds)] = structured
        self.rounds.append(Round(done.solved_for, done.structure, done.predicted_speedup, check, seconds, "finished",
                                 metric_by_stage=dict(metric_by_stage or {})))
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

    def to_record(self) -> dict[str, Any]:
        """The member's rounds and scores, for a cache entry; its models and file are saved beside it."""
        return {"target": self.target, "sla": self.sla.model_dump() if self.sla else None,
                "rounds": [r.to_record() for r in self.rounds],
                "metric": self.metric.to_json() if self.metric else None,
                "cross_check": self.cross_check.to_record() if self.cross_check else None,
                "onnx_metric": self.onnx_metric}

    @classmethod
    def from_record(cls, record: dict[str, Any], model: PreTrainedModel, structured: PreTrainedModel | None,
                    onnx_path: Path) -> Member:
        """A member read back from a cache entry, holding the chosen round's model, structured model and file."""
        rounds = [Round.from_record(r) for r in record["rounds"]]
        member = cls(record["target"], LatencySLA(**record["sla"]) if record["sla"] else None, rounds,
                     metric=Metric.from_json(record["metric"]) if record["metric"] else None,
                     cross_check=LatencyCheck.from_record(record["cross_check"]) if record["cross_check"] else None,
                     onnx_metric=record["onnx_metric"])
        chosen = member.chosen
        member.models = [model if i == chosen else None for i in range(len(rounds))]
        member.onnx_paths = [onnx_path if i == chosen else None for i in range(len(rounds))]
        member.structured_models = {chosen: structured} if structured is not None else {}
        return member

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
                build: Callable[[ModelStructure], PreTrainedModel], export: Export, table: LatencyTable,
                verifier: PairedVerifier, settings: VerificationSettings, work: Path,
                progress: Callable[[str], None], sla: LatencySLA | None = None,
                table_scale: float = 1.0, member: Member | None = None, accept: float | None = None,
                confirm: bool = False) -> Member:
    """Solve, build, export and measure; re-solve with a corrected aim until within `accept` of the target (by
    default the tolerance; bounded by `settings.max_rounds`). Each round's file is read as the median of the
    verifier's `round_repeats` measurements.

    With `confirm`, a round read within the tolerance is measured again as a verdict (`PairedVerifier.verdict`), and
    that fresh reading decides whether it is within `accept`: the loop stops on the first reading that lands near the
    target, so that reading is biased toward it. The screen is the whole tolerance even where `accept` is narrower.

    `table_scale` turns the table's speedups (over the dense model it was measured with) into speedups over the
    verifier's dense model: 1 when they are the same model; for an INT8 table whose targets are over the dense
    FP32 model, the precision factor. Aims are in the target's terms. Given a `member`, the loop goes on from its
    rounds (after a finished round missed the target), for at most `max_rounds` more, its files aimed at the member's
    `aim` (the target over how much faster its fine-tuned files ran than the loop's).
    """
    accept = settings.tolerance if accept is None else accept
    member = member or Member(target, sla)
    reachable = table.max_speedup() * table_scale
    aim = member.aim  # the target, until a fine-tuned file has shown how far it runs from the loop's file
    if aim != target:
        progress(f"the fine-tuned files run {member.finishing_factor:.3f}x the speed of the closed loop's files of "
                 f"the same structure: the loop aims its files at {aim:.3f}x")
    solved_for = next_aim(aim, member.rounds) if member.rounds else aim
    for _ in range(settings.max_rounds):
        clock = Stopwatch()
        structure = clock.time("solve", solve, min(solved_for, reachable) / table_scale)
        if any(r.structure == structure for r in member.rounds):
            progress(f"solving for {solved_for:.3f}x gives a structure measured already: the rounds so far point back "
                     "to it")
            break
        model = clock.time("build", build, structure)
        onnx_path = work / f"round{len(member.rounds)}.onnx"
        clock.time("export", export, model, onnx_path)
        check, screening = clock.time("verify", verifier.measure, onnx_path, verifier.policy.round_repeats), None
        if confirm and abs(check.deviation(aim)) <= settings.tolerance:
            screening, check = check, clock.time("confirm", verifier.verdict, onnx_path)
        predicted = table_scale * table.dense_ms() / table.predict_ms(structure)
        member.rounds.append(Round(solved_for, structure, predicted, check, clock.seconds, screening=screening))
        member.models.append(model)
        member.onnx_paths.append(onnx_path)
        confirmed = f" (screened at {screening.speedup.value:.3f}x)" if screening else ""
        progress(f"round {len(member.rounds)}: solved for {solved_for:.3f}x, predicted {predicted:.3f}x, measured "
                 f"{check.speedup.value:.3f}x ({check.interval_note()}){confirmed}{check.load_note()}")
        if abs(check.deviation(aim)) <= accept:
            break
        solved_for = next_aim(aim, member.rounds)
    return member


def next_aim(target: float, rounds: list[Round]) -> float:
    """The speedup to solve for in the next round of a closed loop: the target over the table's offset.

    A reading shows the table off by measured / predicted for its structure, so aim that much further. The offset is
    pooled over every reading so far (`table_offset`), not taken from the last round, so that one reading's scatter
    does not set the aim (benchmarks/results/round_structures.md). Once the pooled aim solves to a structure measured
    already, the loop stops.
    """
    return target / table_offset(rounds)


def table_offset(rounds: list[Round]) -> float:
    """measured / predicted speedup, pooled over every reading of the closed loop's rounds (a confirmed round's
    screening too; finished files are the finishing factor's) as the geometric mean weighted by each reading's number
    of measurements: exp(sum_i n_i log(m_i / p_i) / sum_i n_i)."""
    readings = [(check, r.predicted_speedup) for r in rounds if r.stage == "closed loop"
                for check in (r.screening, r.check) if check is not None]
    n = np.array([max(1, len(check.blocks)) for check, _ in readings], dtype=float)  # a lone block: one
    log_offsets = np.log([check.speedup.value / predicted for check, predicted in readings])
    return float(np.exp(n @ log_offsets / n.sum()))
