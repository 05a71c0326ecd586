"""Does a settled verdict land nearer the long-run speedup than the median of 9 measurements? One INT8 member timed
beside dense FP32, verdict after verdict, as `ziplm run` judges a member.

The subject is verdict_drift's: the INT8 structure the compound recipe's table solves for 4x over dense FP32, pruned
one-shot from the cached teacher, and the recipe's dense FP32 reference. For `--minutes` this takes verdicts back to
back with `PairedVerifier.verdict`: `finished_repeats` (9) paired measurements, two more at a time while the 95%
interval of their median reaches further than `verdict_width` (2%) from it, at most `max_verdict_repeats` (27). The
first 9 measurements of each verdict are the verdict as it was taken before (their median), so both rules read the
same minutes of the machine. Each reading is compared with the sitting's median of every measurement (the long-run
speedup), and each settled verdict's interval is checked for whether it holds that median.

    python -m benchmarks.measurement.verdict_settling [--minutes 40] [--append | --redraw]

writes benchmarks/results/verdict_settling.md, .json and .png; `--append` adds the sitting to the stored ones,
`--redraw` writes the stored ones again without measuring.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes

from benchmarks.common import RESULTS, head_commit, progress, write_results
from benchmarks.measurement.verdict_drift import (consecutive_verdicts, deviation_summary, plot_sittings, subjects,
                                                  summary_cell)
from ziplm.pipeline.report import environment_line
from ziplm.runtimes.timing import median_half_width

COMMAND = "python -m benchmarks.measurement.verdict_settling"
FIRST = 9  # finished_repeats: the verdict as it was taken before it settled
EARLY = 17  # a verdict settled by this many measurements "settled early"
WINDOWS = (27, 45, 81)  # fixed verdict lengths, read off the stream of measurements


def measure_sitting(minutes: float) -> dict[str, Any]:
    started = datetime.now(timezone.utc).isoformat(timespec="minutes")
    with tempfile.TemporaryDirectory(prefix="ziplm-settling-") as work:
        refs, member, structure, runtime = subjects(Path(work))
        settings = refs.verifier.settings
        verdicts: list[dict[str, Any]] = []
        start, say = time.monotonic(), progress("settling")
        say(f"verdicts on the 4x member beside dense FP32 for {minutes:g} minutes")
        while time.monotonic() - start < minutes * 60:
            began = time.monotonic()
            check = refs.verifier.verdict(member)
            verdicts.append({"t": round(began - start, 2), "seconds": round(time.monotonic() - began, 2),
                             "measurements": [round(v, 5) for v in check.blocks],
                             "speedup": round(check.speedup.value, 5), "ci_low": round(check.speedup.ci_low, 5),
                             "ci_high": round(check.speedup.ci_high, 5),
                             "retaken": check.retaken, "disturbed": check.disturbed})
            say(f"{verdicts[-1]['t'] / 60:.1f} min: {check.speedup.value:.3f}x ({check.interval_note()}); the first "
                f"{FIRST}: {np.median(check.blocks[:FIRST]):.3f}x")
    return {"commit": head_commit(), "started": started, "minutes": minutes, "runtime": runtime,
            "member_structure": structure, "verdict_width": settings.verdict_width,
            "max_verdict_repeats": settings.max_verdict_repeats, "verdicts": verdicts}


def analyse(sitting: dict[str, Any]) -> dict[str, Any]:
    verdicts = sitting["verdicts"]
    stream = np.array([v for verdict in verdicts for v in verdict["measurements"]])  # back to back, in order
    reference = float(np.median(stream))
    settled_ones = [median_half_width(v["measurements"]) <= sitting["verdict_width"] for v in verdicts]
    early = [v["speedup"] / reference - 1.0 for v in verdicts if len(v["measurements"]) <= EARLY]
    first = np.array([np.median(verdict["measurements"][:FIRST]) for verdict in verdicts])
    settled = np.array([verdict["speedup"] for verdict in verdicts])
    holds = [verdict["ci_low"] <= reference <= verdict["ci_high"] for verdict in verdicts]
    return {"verdicts": len(verdicts), "reference": round(reference, 4),
            "measurements": round(float(np.mean([len(v["measurements"]) for v in verdicts])), 1),
            "seconds": round(float(np.mean([v["seconds"] for v in verdicts])), 1),
            "unsettled": settled_ones.count(False), "interval_holds": int(sum(holds)),
            "first": deviation_summary(first, reference), "settled": deviation_summary(settled, reference),
            "early_deviations": [round(d, 4) for d in early], "lag1": _lag1(np.log(stream)),
            "windows": {size: deviation_summary(consecutive_verdicts(stream, size), reference) for size in WINDOWS
                        if len(stream) >= 2 * size}}


def _lag1(values: np.ndarray) -> float:
    """Correlation of each measurement with the next: how much a few seconds of the machine carry over."""
    return round(float(np.corrcoef(values[:-1], values[1:])[0, 1]), 3)


def plot(sittings: Sequence[dict[str, Any]], path: Path) -> None:
    def draw(axis: Axes, sitting: dict[str, Any]) -> None:
        reference, verdicts = analyse(sitting)["reference"], sitting["verdicts"]
        minutes = np.array([v["t"] / 60 for v in verdicts])
        settled = np.array([v["speedup"] for v in verdicts]) / reference
        low = settled - np.array([v["ci_low"] for v in verdicts]) / reference
        high = np.array([v["ci_high"] for v in verdicts]) / reference - settled
        first = [np.median(v["measurements"][:FIRST]) / reference for v in verdicts]
        axis.plot(minutes, first, "x", color="tab:red", label=f"median of the first {FIRST} measurements")
        axis.errorbar(minutes + 0.1, settled, yerr=[low, high], fmt="o", ms=4, color="tab:blue", capsize=2,
                      label="settled verdict and its 95% interval")

    plot_sittings(sittings, path, draw, "verdict / sitting median", "+-3% of the sitting's median")


def markdown(result: dict[str, Any]) -> str:
    sittings = result["sittings"]
    first = sittings[0]
    lines = ["# Settled verdicts against the median of 9 measurements, on the same minutes of the machine", "",
             f"{environment_line({**first['runtime'], 'device': 'the CPU each sitting names'})}. verdict_drift's "
             "subject: the INT8 structure the compound recipe's table solves for 4x over dense FP32, beside the "
             "dense FP32 model. Verdicts are taken back to back as `ziplm run` takes them: 9 paired measurements, "
             f"two more at a time while the 95% interval of their median reaches further than "
             f"{first['verdict_width']:.0%} from it, at most {first['max_verdict_repeats']}. **first 9**: the median "
             "of each verdict's first 9 measurements (the verdict before it settled); **settled**: the verdict. "
             "Deviations are from the sitting's median of every measurement (the long-run speedup).", "",
             "| sitting (UTC) | commit | CPU | verdicts | long-run speedup | measurements per verdict | seconds per "
             "verdict | unsettled at the limit | first 9: SD, max, within 1.5% / 3% | settled: SD, max, within 1.5% / "
             "3% | settled interval holds the long-run speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    analyses = [analyse(sitting) for sitting in sittings]
    for sitting, a in zip(sittings, analyses):
        lines.append(f"| {sitting['started']} | {sitting['commit']} | {sitting['runtime']['device']} | {a['verdicts']} "
                     f"| {a['reference']:.3f}x | {a['measurements']} | {a['seconds']} | {a['unsettled']} "
                     f"| {summary_cell(a['first'])} | {summary_cell(a['settled'])} "
                     f"| {a['interval_holds']} of {a['verdicts']} |")
    lines += ["", "Why settled verdicts still miss: the measurements of a verdict are taken back to back and are not "
              "independent, so a verdict inside one stretch of the machine can settle tight and off; and fixed "
              "verdict lengths, read off each sitting's stream of measurements (disjoint windows), show how much "
              "of the spread no verdict of a few minutes averages away.", "",
              "| sitting (UTC) | lag-1 correlation of measurements | verdicts settled within "
              f"{EARLY} measurements: deviations | " + " | ".join(f"windows of {n}: SD, max, within 1.5% / 3%"
                                                                   for n in WINDOWS) + " |",
              "|---|---|---|" + "---|" * len(WINDOWS)]
    for sitting, a in zip(sittings, analyses):
        early = ", ".join(f"{d:+.1%}" for d in a["early_deviations"]) or "none"
        windows = " | ".join(summary_cell(a["windows"][n]) if n in a["windows"] else "-" for n in WINDOWS)
        lines.append(f"| {sitting['started']} | {a['lag1']} | {early} | {windows} |")
    return "\n".join(lines + ["", "![verdicts](verdict_settling.png)", "", f"Reproduce: `{COMMAND}`.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--append", action="store_true", help="add the sitting to the stored ones")
    parser.add_argument("--redraw", action="store_true", help="measure nothing: write the stored sittings again")
    args = parser.parse_args()
    stored = RESULTS / "verdict_settling.json"
    sittings = json.loads(stored.read_text())["sittings"] if (args.append or args.redraw) and stored.exists() else []
    new = [] if args.redraw else [measure_sitting(args.minutes)]
    result = {"command": COMMAND, "sittings": sittings + new}
    plot(result["sittings"], RESULTS / "verdict_settling.png")
    write_results("verdict_settling", result, markdown(result))


if __name__ == "__main__":
    main()
