"""What other work on the machine does to a paired verdict, and what the guard against it (re-taking a measurement
while other processes keep cores busy: the measurement policy's `max_other_load`, `retakes`) gives back.

On 2 cores, a process busy on one core slows the dense FP32 model (its matmuls split over both threads) and a small INT8
member unequally, so a member timed beside dense FP32 reads off, either way: the compound benchmark's runs had single
blocks 20-35% above their neighbours. Subjects: the compound recipe's references (dense FP32 and INT8) and the INT8
structure its table solves for 4x over dense FP32, pruned one-shot (benchmarks.measurement.verdict_drift.subjects;
speed does not depend on the weights' values).

1. One paired block of member / dense FP32 under each kind of load (nothing; a loop busy on one core; a loop
   streaming 256 MB through memory; a loop reading a 32 MB array at random, the size of the L3 cache), the loads
   taken in turn, cycle after cycle, so the machine's drift falls on all of them alike.
2. Verdicts as the pipeline takes them (the median of 9 blocks) while a neighbour works on one core in bursts
   (1-4 s busy, 2-6 s idle, at random): without the guard (no retakes) and with it (the defaults), taken in turn,
   against verdicts of the quiet machine taken in the same turns.

    python -m benchmarks.measurement.contention [--cycles 4] [--verdicts 3]

writes benchmarks/results/contention.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import head_commit, progress, write_results
from benchmarks.measurement.verdict_drift import subjects
from ziplm.pipeline.report import environment_line
from ziplm.runtimes.paired import LatencyCheck, PairedVerifier

COMMAND = "python -m benchmarks.measurement.contention"
VERDICT_BLOCKS = 9  # the pipeline's finished_repeats
LOADS = {  # a Python loop per kind of load, on one core
    "none": None,
    "one busy core": "while True: pass",
    "memory stream": "import numpy as np\na = np.ones(2**26, np.float32); b = np.empty_like(a)\n"
                     "while True: np.copyto(b, a)",
    "cache thrash": "import numpy as np\na = np.ones(2**23, np.float32); i = np.random.default_rng(0).integers(0, "
                    "2**23, 2**20)\nwhile True: a[i].sum()",
}
BURSTS = ("import random, time\nrandom.seed(0)\nwhile True:\n    end = time.monotonic() + random.uniform(1, 4)\n"
          "    while time.monotonic() < end: pass\n    time.sleep(random.uniform(2, 6))")


@contextmanager
def running(code: str | None) -> Iterator[None]:
    """A Python process running `code` for the duration (nothing for None)."""
    if code is None:
        yield
        return
    process = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(1.0)  # started, its arrays allocated
        yield
    finally:
        process.kill()
        process.wait()


def block_json(check: LatencyCheck) -> dict[str, Any]:
    return {"speedup": round(check.speedup.value, 5), "other_load": check.speedup.other_load,
            "dense_ms": round(check.dense.median_ms, 4), "member_ms": round(check.member.median_ms, 4)}


def unguarded(verifier: PairedVerifier) -> PairedVerifier:
    """The same verifier (the same dense session) that never takes a measurement again."""
    plain = copy.copy(verifier)
    plain.policy = dataclasses.replace(verifier.policy, retakes=0)
    return plain


def loads_part(verifier: PairedVerifier, member: Path, cycles: int) -> list[dict[str, Any]]:
    """One unguarded block under each load, cycle after cycle."""
    say, blocks, plain = progress("loads"), [], unguarded(verifier)
    for cycle in range(cycles):
        for load, code in LOADS.items():
            with running(code):
                check = plain.measure_blocks(member, 1)[0]
            blocks.append({"cycle": cycle, "load": load, **block_json(check)})
            say(f"cycle {cycle + 1}/{cycles}, {load}: {check.speedup.value:.3f}x, other work "
                f"{check.speedup.other_load or 0:.2f} cores")
    return blocks


def verdicts_part(guarded: PairedVerifier, member: Path, count: int) -> list[dict[str, Any]]:
    """Verdicts in turn: the quiet machine (guarded), bursts without the guard, bursts with it."""
    variants = {"quiet": (guarded, None), "bursts, no guard": (unguarded(guarded), BURSTS),
                "bursts, guard": (guarded, BURSTS)}
    say, verdicts = progress("verdicts"), []
    for turn in range(count):
        for variant, (verifier, code) in variants.items():
            start = time.monotonic()
            with running(code):
                check = verifier.measure(member, VERDICT_BLOCKS)
            verdicts.append({"turn": turn, "variant": variant, "speedup": round(check.speedup.value, 5),
                             "blocks": list(check.blocks), **check.load_json(),
                             "seconds": round(time.monotonic() - start, 1)})
            say(f"turn {turn + 1}/{count}, {variant}: {check.speedup.value:.3f}x ({check.retaken} retaken, "
                f"{check.disturbed} disturbed, {verdicts[-1]['seconds']:.0f} s)")
    return verdicts


def summary(result: dict[str, Any]) -> dict[str, Any]:
    quiet_blocks = [b["speedup"] for b in result["blocks"] if b["load"] == "none"]
    quiet_verdicts = [v["speedup"] for v in result["verdicts"] if v["variant"] == "quiet"]
    loads = {}
    for load in LOADS:
        blocks = [b for b in result["blocks"] if b["load"] == load]
        deviations = np.array([b["speedup"] for b in blocks]) / np.median(quiet_blocks) - 1.0
        loads[load] = {"blocks": len(blocks), "median_deviation": float(np.median(deviations)),
                       "min_deviation": float(deviations.min()), "max_deviation": float(deviations.max()),
                       "other_load": float(np.mean([b["other_load"] or 0.0 for b in blocks]))}
    variants = {}
    for variant in ("quiet", "bursts, no guard", "bursts, guard"):
        taken = [v for v in result["verdicts"] if v["variant"] == variant]
        deviations = np.array([v["speedup"] for v in taken]) / np.median(quiet_verdicts) - 1.0
        variants[variant] = {"verdicts": len(taken), "deviations": [round(float(d), 4) for d in deviations],
                             "max_abs_deviation": float(np.abs(deviations).max()),
                             "retaken": sum(v["retaken"] for v in taken),
                             "disturbed": sum(v["disturbed"] for v in taken),
                             "seconds": float(np.mean([v["seconds"] for v in taken]))}
    return {"loads": loads, "variants": variants}


def markdown(result: dict[str, Any]) -> str:
    s = summary(result)
    settings = result["settings"]
    lines = ["# A paired verdict under other load on the machine, with and without the guard", "",
             f"{environment_line(result['runtime'])}; commit {result['commit']}. The member: the INT8 structure the "
             f"compound recipe's table solves for 4x over dense FP32 ({result['member_structure']}), timed beside "
             "dense FP32. Deviations are from the quiet machine's median, measured in the same run.", "",
             f"## 1. One block under each load ({result['cycles']} cycles, the loads in turn)", "",
             "| load | blocks | median deviation | range | other work (cores) |", "|---|---|---|---|---|"]
    for load, row in s["loads"].items():
        lines.append(f"| {load} | {row['blocks']} | {row['median_deviation']:+.1%} "
                     f"| {row['min_deviation']:+.1%} to {row['max_deviation']:+.1%} | {row['other_load']:.2f} |")
    lines += ["", f"## 2. Verdicts (median of {VERDICT_BLOCKS} blocks) while a neighbour works in bursts", "",
              f"The guard: a block during which other work kept more than {settings['max_other_load']} cores busy "
              f"is taken again, up to {settings['retakes']} times, after a pause; then the least disturbed one "
              "counts and is recorded as disturbed. Without it, no block is taken again.", "",
              "| verdicts | each against the quiet median | largest | blocks retaken | blocks left disturbed "
              "| seconds per verdict |", "|---|---|---|---|---|---|"]
    for variant, row in s["variants"].items():
        lines.append(f"| {variant} ({row['verdicts']}) | {', '.join(f'{d:+.1%}' for d in row['deviations'])} "
                     f"| {row['max_abs_deviation']:.1%} | {row['retaken']} | {row['disturbed']} "
                     f"| {row['seconds']:.0f} |")
    return "\n".join(lines + ["", f"Reproduce: `{COMMAND}`.", ""])


def run(cycles: int, verdicts: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ziplm-contention-") as work:
        refs, member, structure, runtime = subjects(Path(work))
        return {"command": COMMAND, "commit": head_commit(), "runtime": runtime, "member_structure": structure,
                "settings": {"max_other_load": refs.verifier.policy.max_other_load,
                             "retakes": refs.verifier.policy.retakes},
                "cycles": cycles, "blocks": loads_part(refs.verifier, member, cycles),
                "verdicts": verdicts_part(refs.verifier, member, verdicts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--verdicts", type=int, default=3)
    args = parser.parse_args()
    result = run(args.cycles, args.verdicts)
    result["summary"] = summary(result)
    write_results("contention", result, markdown(result))


if __name__ == "__main__":
    main()
