"""Timing on a shared, noisy machine: warm-up, repeated interleaved runs, medians, and paired speedups.

Absolute times drift between runs on a shared machine (docs/measurement.md), so every comparison is made inside one run:
the models are called in turn (A B, B A, A B, ...), and a speedup is the median of the per-round ratios, whose
confidence interval comes from order statistics (no distribution assumed). A paired timing measures more rounds
while the interval is too wide.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from scipy.stats import binom

from ziplm.runtimes.base import Session
from ziplm.runtimes.interleave import Runner, gc_paused, interleaved_samples

T = TypeVar("T")
# A process's own interleaved timing loop (interleaved_samples' signature): what a session's `timer` attribute is
Timer = Callable[[Mapping[str, Runner], int, int, "float | None", int], dict[str, list[float]]]


@dataclass(frozen=True)
class TimingStats:
    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 90))

    def to_json(self) -> dict[str, float]:
        return {"median": round(self.median_ms, 4), "p90": round(self.p90_ms, 4), "runs": len(self.samples_ms)}

    def to_record(self) -> list[float]:
        """Every sample, for a cache entry (to_json summarises)."""
        return list(self.samples_ms)


@dataclass(frozen=True)
class Speedup:
    """Baseline time over candidate time, from per-round ratios of interleaved runs; `other_load`: the cores other
    processes, kernel threads and the hypervisor took while it was measured (None where that cannot be read)."""

    value: float
    ci_low: float
    ci_high: float
    confidence: float
    rounds: int
    other_load: float | None = None

    @property
    def relative_width(self) -> float:
        return (self.ci_high - self.ci_low) / self.value

    def to_json(self) -> dict[str, float | None]:
        load = {} if self.other_load is None else {"other_load": round(self.other_load, 3)}
        return {"value": round(self.value, 4), "ci_low": round(self.ci_low, 4), "ci_high": round(self.ci_high, 4),
                "confidence": self.confidence, "rounds": self.rounds, **load}


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU time so far, in clock ticks: busy on all CPUs (steal included: the hypervisor gave the core to another
    guest), elapsed on all CPUs, used by this process (all its threads) and its engine workers, and stolen."""

    busy: int
    elapsed: int
    own: int
    cpus: int
    steal: int = 0


OWN_WORKERS: set[int] = set()  # the pids of engine workers this process started: their CPU time is our own work


def cpu_snapshot(proc: Path = Path("/proc")) -> CpuSnapshot | None:
    """Read /proc/stat and the stat of this process and its engine workers (OWN_WORKERS); None where there is no
    such file system (the load is then unknown)."""
    try:
        lines = (proc / "stat").read_text().splitlines()
        own = process_ticks(proc / "self" / "stat")
    except (OSError, IndexError):
        return None
    for pid in sorted(OWN_WORKERS):
        try:
            own += process_ticks(proc / str(pid) / "stat")
        except (OSError, IndexError):
            pass  # the worker has ended: what it used is no longer anyone's
    # cpu  user nice system idle iowait irq softirq steal ...
    ticks = [int(v) for v in lines[0].split()[1:9]]
    cpus = sum(line.startswith("cpu") and line[3:4].isdigit() for line in lines)
    return CpuSnapshot(busy=sum(ticks) - ticks[3] - ticks[4], elapsed=sum(ticks), own=own, cpus=max(cpus, 1),
                       steal=ticks[7])


def process_ticks(stat: Path) -> int:
    """utime + stime of one process (all its threads), in clock ticks (proc(5))."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


MIN_LOAD_SPAN_S = 0.5  # /proc counts in clock ticks (10 ms): over a shorter span one tick reads as a fifth of a core


def other_load(before: CpuSnapshot | None, after: CpuSnapshot | None) -> float | None:
    """Cores (on average) that everything but this process kept busy between two snapshots; None when unknown or
    when the span is too short to tell (under MIN_LOAD_SPAN_S)."""
    if before is None or after is None:
        return None
    wall = (after.elapsed - before.elapsed) / after.cpus
    if wall < MIN_LOAD_SPAN_S * os.sysconf("SC_CLK_TCK"):
        return None
    return max(0.0, (after.busy - before.busy) - (after.own - before.own)) / wall


def with_load(measure: Callable[[], T]) -> tuple[T, float | None]:
    """measure() and the cores other work kept busy while it ran (None where unknown, see other_load)."""
    before = cpu_snapshot()
    value = measure()
    return value, other_load(before, cpu_snapshot())


RETAKE_PAUSE_S = 2.0  # before a disturbed measurement is taken again: a short burst of other work passes


@dataclass(frozen=True)
class TimingSpan:
    """How long a paired timing may run before it stops short of its rounds: `seconds` (None: never), and never
    before `min_rounds` rounds."""

    seconds: float | None = None
    min_rounds: int = 2


@dataclass(frozen=True)
class LoadGuard:
    """Takes a measurement again (at most `retakes` times, after a pause) while other processes, kernel threads or
    the hypervisor kept more than `max_other_load` cores busy during it: a busy core slows the models being compared
    unequally, so the reading may be off either way."""

    max_other_load: float = 0.1
    retakes: int = 3

    def too_busy(self, load: float | None) -> bool:
        return load is not None and load > self.max_other_load

    def take(self, measure: Callable[[], T], load_of: Callable[[T], float | None]) -> tuple[T, int, bool]:
        """(the least disturbed of the takes, how many times it was taken again, whether even that one was too
        busy); `load_of` reads a take's other load."""
        tries = []
        for attempt in range(1 + self.retakes):
            if attempt:
                time.sleep(RETAKE_PAUSE_S)
            tries.append(measure())
            if not self.too_busy(load_of(tries[-1])):
                break
        kept = min(tries, key=lambda value: load_of(value) or 0.0)
        return kept, len(tries) - 1, self.too_busy(load_of(kept))


@dataclass(frozen=True)
class MachineLoad:
    """What other work on the machine did to a guarded measurement taken in parts: the cores it kept busy during
    each part that counts (None where unknown), how many parts were taken again, and how many stayed over the limit
    however often they were taken."""

    other_loads: tuple[float | None, ...] = ()
    retaken: int = 0
    disturbed: int = 0

    def to_json(self) -> dict[str, Any]:
        loads = [None if load is None else round(load, 3) for load in self.other_loads]
        return {"other_load": loads, "retaken": self.retaken, "disturbed": self.disturbed}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> MachineLoad:
        return cls(tuple(payload["other_load"]), payload["retaken"], payload["disturbed"])

    def note(self, parts: str) -> str:
        """What other work did, in words ("" when nothing), e.g. "3 chunks taken again: the machine was busy"."""
        if not (self.retaken or self.disturbed):
            return ""
        disturbed = (f"; {self.disturbed} of {len(self.other_loads) or 1} measured while other work kept cores busy"
                     if self.disturbed else "")
        noun = parts.removesuffix("s") if self.retaken == 1 else parts
        return f"{self.retaken} {noun} taken again: the machine was busy{disturbed}"


class WideIntervalWarning(UserWarning):
    """A speedup's confidence interval is too wide to trust at the requested tolerance."""


class BusyMachineWarning(UserWarning):
    """Other processes kept cores busy while a speedup was measured, and stayed busy when it was taken again."""


def time_interleaved(runners: Mapping[str, Runner], rounds: int = 30, warmup: int = 3,
                     max_seconds: float | None = None, min_rounds: int = 2) -> dict[str, TimingStats]:
    """Call every runner once per round, alternating the order each round; return per-runner statistics. With
    `max_seconds`, stop early once that long has passed, at the first even round count (each model first as often)
    from `min_rounds` on. Where every runner is a Call on a session another process holds (an engine's worker), that
    process runs the loop (runtimes.interleave)."""
    timer = holding_timer(runners)
    samples = (timer or interleaved_samples)(runners, rounds, warmup, max_seconds, min_rounds)
    return {name: TimingStats(tuple(values)) for name, values in samples.items()}


@dataclass(frozen=True)
class Call:
    """A loaded session called on its inputs: a runner that timing can hand to the process holding the session."""

    session: Session
    inputs: dict[str, np.ndarray]

    def __call__(self) -> object:
        return self.session.run(self.inputs)


def holding_timer(runners: Mapping[str, Runner]) -> Timer | None:
    """The `timer` of the one other process that holds every runner's session; None where they run in this one. Runs
    in two processes cannot be interleaved fairly (one would wait on the pipe while the other is timed): refused."""
    timers = {getattr(runner.session, "timer", None) if isinstance(runner, Call) else None
              for runner in runners.values()}
    if len(timers) > 1:
        raise ValueError("these models run in different processes and cannot be timed interleaved: load them all "
                         "in one runtime")
    return next(iter(timers), None)


GUARD_CHUNK_S = 1.0  # long enough for /proc to read the load (MIN_LOAD_SPAN_S), short enough that a burst of
# other work costs one chunk of a guarded timing, not the whole of it


def time_interleaved_guarded(runners: Mapping[str, Runner], rounds: int, warmup: int,
                             guard: LoadGuard) -> tuple[dict[str, TimingStats], MachineLoad]:
    """time_interleaved in chunks of about GUARD_CHUNK_S, each taken again while other work kept cores busy
    (`guard`); the statistics pool the chunks that count (`rounds` rounds in all)."""
    time_interleaved(runners, rounds=0, warmup=warmup)
    stats: dict[str, TimingStats] = {name: TimingStats(()) for name in runners}
    loads: list[float | None] = []
    retaken = disturbed = 0
    with gc_paused():
        while (done := rounds_of(stats)) < rounds:
            (chunk, load), again, busy = guard.take(
                lambda: with_load(lambda: time_interleaved(runners, rounds - done, 0, GUARD_CHUNK_S)),
                lambda taken: taken[1])
            stats = pooled(stats, chunk)
            loads.append(load)
            retaken, disturbed = retaken + again, disturbed + busy
    return stats, MachineLoad(tuple(loads), retaken, disturbed)


def rounds_of(stats: Mapping[str, TimingStats]) -> int:
    return len(next(iter(stats.values())).samples_ms)


def pooled(first: Mapping[str, TimingStats], second: Mapping[str, TimingStats]) -> dict[str, TimingStats]:
    """Each runner's samples of two timings, one after the other."""
    return {name: TimingStats(first[name].samples_ms + second[name].samples_ms) for name in first}


def median_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for the median: order statistics at binomial(n, 1/2) quantiles."""
    ordered = np.sort(values)
    lower, upper = median_ranks(len(ordered), confidence)
    return float(ordered[lower]), float(ordered[upper])


def median_ranks(n: int, confidence: float) -> tuple[int, int]:
    """The 0-based ranks of median_ci's bounds among n sorted values."""
    rank = int(binom.ppf((1 - confidence) / 2, n, 0.5))  # 1-based rank of the lower bound
    return max(rank - 1, 0), min(n - rank, n - 1)


def median_ci_coverage(n: int, confidence: float) -> float:
    """How often median_ci of n values holds the true median: P(X_(r) <= m <= X_(n+1-r)) = 1 - 2 P(Bin(n, 1/2) < r)
    for 1-based rank r; at least `confidence` where n allows it (3 values: their range, 75%)."""
    lower, _ = median_ranks(n, confidence)
    return float(1.0 - 2.0 * binom.cdf(lower, n, 0.5))


def median_half_width(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> float:
    """How far median_ci reaches from the median, relative: the larger of its two sides."""
    median = float(np.median(values))
    low, high = median_ci(values, confidence)
    return max(high / median - 1.0, 1.0 - low / median)


def speedup_of(baseline: TimingStats, candidate: TimingStats, confidence: float = 0.95) -> Speedup:
    """Speedup of `candidate` over `baseline` from the same interleaved run (round i against round i)."""
    ratios = np.asarray(baseline.samples_ms) / np.asarray(candidate.samples_ms)
    low, high = median_ci(ratios, confidence)
    return Speedup(float(np.median(ratios)), low, high, confidence, len(ratios))


def time_paired(baseline: Runner, candidate: Runner, rounds: int = 40, warmup: int = 3,
                max_relative_width: float = 0.05, extra_batches: int = 2,
                span: TimingSpan | None = None) -> tuple[Speedup, TimingStats, TimingStats]:
    """Time two models interleaved and return (speedup of candidate over baseline, baseline, candidate stats).

    `rounds` pairs, or with a `span` fewer once its seconds have passed (never under its minimum of rounds), so
    that timing a model of a tenth of a second per call costs seconds, not minutes; whether fewer pairs were enough
    is the caller's interval rule to decide (the extra batches here, a verdict's width in runtimes.paired).

    One call of each per round, so both models run in the same cache regime as the latency table's blocks (calling
    the faster model several times per round would warm its caches and flatter it). While the interval is wider
    than `max_relative_width`, up to `extra_batches` more batches of rounds are measured; if it is still wide, a
    WideIntervalWarning says so.
    """
    runners = {"baseline": baseline, "candidate": candidate}
    (stats, speedup), load = with_load(lambda: paired_rounds(runners, rounds, warmup, max_relative_width,
                                                             extra_batches, span or TimingSpan()))
    speedup = replace(speedup, other_load=load)
    warn_if_wide(speedup, max_relative_width)
    return speedup, stats["baseline"], stats["candidate"]


def paired_rounds(runners: Mapping[str, Runner], rounds: int, warmup: int, max_relative_width: float,
                  extra_batches: int, span: TimingSpan) -> tuple[dict[str, TimingStats], Speedup]:
    """time_paired's rounds (runners "baseline" and "candidate"), and the speedup they give."""
    stats = time_interleaved(runners, rounds, warmup, span.seconds, span.min_rounds)
    speedup = speedup_of(stats["baseline"], stats["candidate"])
    for _ in range(extra_batches):
        if speedup.relative_width <= max_relative_width:
            break
        stats = pooled(stats, time_interleaved(runners, rounds, 0, span.seconds, span.min_rounds))
        speedup = speedup_of(stats["baseline"], stats["candidate"])
    return stats, speedup


def warn_if_wide(speedup: Speedup, max_relative_width: float) -> None:
    if speedup.relative_width > max_relative_width:
        warnings.warn(
            f"speedup {speedup.value:.3f}x has a wide {speedup.confidence:.0%} interval "
            f"[{speedup.ci_low:.3f}, {speedup.ci_high:.3f}] ({speedup.relative_width:.1%} of the value, more than "
            f"{max_relative_width:.0%}): the machine is noisy; use more rounds or a quieter machine",
            WideIntervalWarning,
            stacklevel=2,
        )
