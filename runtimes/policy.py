"""How hard to measure: the recipe's one `effort` setting and the named constants behind it.

A user decides how much machine time a verdict may cost (`effort: quick | standard | thorough`); everything else
about how a measurement is taken is fixed here, each constant with the reason it has its value. `standard` is what
the benchmarks in benchmarks/results/ were measured with; `quick` is a smoke run (tests, a first look), whose
readings scatter more; `thorough` is for a release verdict on a noisy host. docs/measurement.md explains each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ziplm.runtimes.timing import LoadGuard, TimingSpan

Effort = Literal["quick", "standard", "thorough"]

MAX_OTHER_LOAD = 0.1  # cores other work may keep busy during a measurement before it is taken again: a busy core
# slows the dense model and a small member unequally (docs/measurement.md, "The load guard")
WARMUP = 5  # calls of each model before a timing: the first calls allocate and page in weights
TABLE_WARMUP = 3  # the same for the latency table's blocks, which are small and warm quickly
TABLE_SEED = 0  # random weights and calibration structures of the latency table (latency does not depend on values)
VERDICT_WIDTH = 0.02  # a verdict takes more measurements while its median's 95% interval reaches further than this
FINISH_ROUNDS = 2  # times the chain may fine-tune a member's structure before the best file so far is kept


@dataclass(frozen=True)
class MeasurementPolicy:
    """The measurement effort of one level (see POLICIES)."""

    timing_rounds: int  # interleaved dense/member pairs in one paired measurement, at most ...
    timing_seconds: float  # ... stopping once this long has passed, so a slow model costs seconds, not minutes ...
    min_timing_rounds: int  # ... but never before this many pairs
    round_repeats: int  # independent measurements whose median is a closed-loop round's reading
    verdict_repeats: int  # independent measurements a verdict takes at least ...
    max_verdict_repeats: int  # ... and at most, two more at a time while unsettled (VERDICT_WIDTH)
    precision_blocks: int  # INT8 families: paired measurements of dense INT8 against dense FP32 (the precision factor)
    block_rounds: int  # latency table: interleaved rounds over every attention and FFN block
    calibration_rounds: int  # latency table: interleaved rounds over the end-to-end calibration models
    random_calibration_models: int  # latency table: random non-uniform structures among those calibration models
    retakes: int  # times a measurement disturbed by other work is taken again, after a pause
    warmup: int = WARMUP
    verdict_width: float = VERDICT_WIDTH
    max_other_load: float = MAX_OTHER_LOAD

    @property
    def span(self) -> TimingSpan:
        return TimingSpan(self.timing_seconds, self.min_timing_rounds)

    @property
    def guard(self) -> LoadGuard:
        return LoadGuard(self.max_other_load, self.retakes)


POLICIES: dict[Effort, MeasurementPolicy] = {
    "quick": MeasurementPolicy(timing_rounds=10, timing_seconds=0.5, min_timing_rounds=6,
                               round_repeats=1, verdict_repeats=5, max_verdict_repeats=9,
                               precision_blocks=5, block_rounds=5, calibration_rounds=5, random_calibration_models=1,
                               retakes=1, warmup=1),
    "standard": MeasurementPolicy(timing_rounds=60, timing_seconds=3.0, min_timing_rounds=20,
                                  round_repeats=3, verdict_repeats=9, max_verdict_repeats=27,
                                  precision_blocks=20, block_rounds=30, calibration_rounds=20,
                                  random_calibration_models=3, retakes=3),
    "thorough": MeasurementPolicy(timing_rounds=100, timing_seconds=6.0, min_timing_rounds=30,
                                  round_repeats=5, verdict_repeats=15, max_verdict_repeats=45,
                                  precision_blocks=30, block_rounds=50, calibration_rounds=30,
                                  random_calibration_models=5, retakes=5),
}


def policy(effort: Effort = "standard") -> MeasurementPolicy:
    return POLICIES[effort]
