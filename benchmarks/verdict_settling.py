"""Does a settled verdict land nearer the long-run speedup than the median of 9 measurements? One INT8 member timed
beside dense FP32, verdict after verdict, as `ziplm run` judges a member.

The subject is verdict_drift's: the INT8 structure the compound recipe's table solves for 4x over dense FP32, pruned
one-shot from the cached teacher, and the recipe's dense FP32 reference. For `--minutes` this takes verdicts back to
back with `PairedVerifier.verdict`: `finished_repeats` (9) paired measurements, two more at a time while the 95%
interval of their median reaches further than `verdict_width` (2%) from it, at most `max_verdict_repeats` (27). The
first 9 measurements of each verdict are the verdict as it was taken before (their median), so both rules read the
same minutes of the machine. Each reading is compared with the sitting's median of every measurement (the long-run
speedup), and each settled verdict's interval is checked for whether it holds that median.

    python -m benchmarks.verdict_settling [--minutes 40] [--append]

writes benchmarks/results/verdict_settling.md, .json and .png; `--append` adds the sitting to the stored ones.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import RESULTS, progress, write_results  # noqa: E402
from benchmarks.compound import _commit  # noqa: E402
from benchmarks.verdict_drift import deviation_summary, subjects, summary_cell  # noqa: E402
from ziplm.pipeline.report import environment_line  # noqa: E402
from ziplm.runtimes.timing import WideIntervalWarning  # noqa: E402

COMMAND = "python -m benchmarks.verdict_settling"
FIRST = 9  # finished_repeats: the verdict as it was taken before it settled


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
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", WideIntervalWarning)
                check = refs.verifier.verdict(member)
            verdicts.append({"t": round(began - start, 2), "seconds": round(time.monotonic() - began, 2),
                             "measurements": [round(v, 5) for v in check.blocks],
                             "speedup": round(check.speedup.value, 5), "ci_low": round(check.speedup.ci_low, 5),
                             "ci_high": round(check.speedup.ci_high, 5),
                             "settled": not any(issubclass(w.category, WideIntervalWarning) for w in caught),
                             "retaken": check.retaken, "disturbed": check.disturbed})
            say(f"{verdicts[-1]['t'] / 60:.1f} min: {check.speedup.value:.3f}x ({check.interval_note()}); the first "
                f"{FIRST}: {np.median(check.blocks[:FIRST]):.3f}x")
    return {"commit": _commit(), "started": started, "minutes": minutes, "runtime": runtime,
            "member_structure": structure, "verdict_width": settings.verdict_width,
            "max_verdict_repeats": settings.max_verdict_repeats, "verdicts": verdicts}


def analyse(sitting: dict[str, Any]) -> dict[str, Any]:
    verdicts = sitting["verdicts"]
    reference = float(np.median([v for verdict in verdicts for v in verdict["measurements"]]))
    first = np.array([np.median(verdict["measurements"][:FIRST]) for verdict in verdicts])
    settled = np.array([verdict["speedup"] for verdict in verdicts])
    holds = [verdict["ci_low"] <= reference <= verdict["ci_high"] for verdict in verdicts]
    return {"verdicts": len(verdicts), "reference": round(reference, 4),
            "measurements": round(float(np.mean([len(v["measurements"]) for v in verdicts])), 1),
            "seconds": round(float(np.mean([v["seconds"] for v in verdicts])), 1),
            "unsettled": sum(not v["settled"] for v in verdicts), "interval_holds": int(sum(holds)),
            "first": deviation_summary(first, reference), "settled": deviation_summary(settled, reference)}


def plot(sittings: Sequence[dict[str, Any]], path: Path) -> None:
    figure, axes = plt.subplots(len(sittings), 1, figsize=(9, 3.2 * len(sittings)), squeeze=False)
    for axis, sitting in zip(axes[:, 0], sittings):
        reference = analyse(sitting)["reference"]
        minutes = np.array([v["t"] / 60 for v in sitting["verdicts"]])
        settled = np.array([v["speedup"] for v in sitting["verdicts"]]) / reference
        low = settled - np.array([v["ci_low"] for v in sitting["verdicts"]]) / reference
        high = np.array([v["ci_high"] for v in sitting["verdicts"]]) / reference - settled
        first = [np.median(v["measurements"][:FIRST]) / reference for v in sitting["verdicts"]]
        axis.plot(minutes, first, "x", color="tab:red", label=f"median of the first {FIRST} measurements")
        axis.errorbar(minutes + 0.1, settled, yerr=[low, high], fmt="o", ms=4, color="tab:blue", capsize=2,
                      label="settled verdict and its 95% interval")
        axis.axhspan(0.97, 1.03, color="grey", alpha=0.15, label="+-3% of the sitting's median")
        axis.set_title(f"sitting {sitting['started']} (commit {sitting['commit']})", fontsize=9)
        axis.set_xlabel("minutes")
        axis.set_ylabel("verdict / sitting median")
        axis.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


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
    for sitting in sittings:
        a = analyse(sitting)
        lines.append(f"| {sitting['started']} | {sitting['commit']} | {sitting['runtime']['device']} | {a['verdicts']} "
                     f"| {a['reference']:.3f}x | {a['measurements']} | {a['seconds']} | {a['unsettled']} "
                     f"| {summary_cell(a['first'])} | {summary_cell(a['settled'])} "
                     f"| {a['interval_holds']} of {a['verdicts']} |")
    return "\n".join(lines + ["", "![verdicts](verdict_settling.png)", "", f"Reproduce: `{COMMAND}`.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--append", action="store_true", help="add the sitting to the stored ones")
    args = parser.parse_args()
    stored = RESULTS / "verdict_settling.json"
    sittings = json.loads(stored.read_text())["sittings"] if args.append and stored.exists() else []
    result = {"command": COMMAND, "sittings": sittings + [measure_sitting(args.minutes)]}
    plot(result["sittings"], RESULTS / "verdict_settling.png")
    write_results("verdict_settling", result, markdown(result))


if __name__ == "__main__":
    main()
