"""The interleaved timing loop itself, in the standard library alone: the core process runs it on its own sessions
(runtimes.timing), and an engine's worker process in its own environment runs the same loop on the models it holds
(runtimes.deepsparse_worker), so that what crosses the pipe between them is never inside a measurement."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

Runner = Callable[[], object]


def interleaved_samples(runners: Mapping[str, Runner], rounds: int = 30, warmup: int = 3,
                        max_seconds: float | None = None, min_rounds: int = 2) -> dict[str, list[float]]:
    """Call every runner once per round, alternating the order each round; each runner's call times in ms. With
    `max_seconds`, stop early once that long has passed, at the first even round count (each model first as often)
    from `min_rounds` on."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    with gc_paused():
        start = time.perf_counter()
        for round_index in range(rounds):
            out_of_time = max_seconds is not None and time.perf_counter() - start >= max_seconds
            if round_index >= max(min_rounds, 1) and round_index % 2 == 0 and out_of_time:
                break
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                began = time.perf_counter()
                runners[name]()
                samples[name].append((time.perf_counter() - began) * 1e3)
    return samples


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's garbage collector off while timing (as in `timeit`): after fine-tuning, a process holds many objects,
    and a collection landing inside one call would be charged to that model. Collects first, unless already paused
    (a collection in a big process takes longer than a guarded timing's chunk)."""
    if not gc.isenabled():
        yield
        return
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
