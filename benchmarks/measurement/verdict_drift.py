"""How repeatable a paired verdict is on this machine: the same INT8 files timed beside dense FP32, block after block.

The compound recipe judges its 4x member by the median of 9 paired blocks beside dense FP32, taken in about a
minute. Over four sessions, 14 fine-tuned files read a mean of -1.8% (SD 4.7%) from the closed-loop round that chose
their structure minutes earlier, against a 3% window. This measures where that spread comes from, on files
exported from the cached teacher (no fine-tuning: ONNX Runtime's speed does not depend on the weights' values):

- dense FP32 and dense INT8, the compound recipe's references (its stage cache);
- the INT8 structure the compound recipe's table solves for 4x over dense FP32, pruned one-shot from the teacher.

For `--minutes` it cycles through three paired blocks, each as the pipeline takes one (`PairedVerifier`): the
member beside dense FP32 (the verdict's reading), dense INT8 beside dense FP32 (the precision factor) and the member
beside dense INT8 (the cross-check), and records when each was taken, the 1-minute load average, the share of
CPU time the hypervisor gave to other guests (steal, from /proc/stat), and what one core reads per second just
before and after the block from a 256 MB array (main memory) and from a warm 8 MB array (the L3 cache the host
shares with other guests; read_gbps): the dense FP32 model (85 MB of weights) streams from main memory, the INT8 files
mostly fit in the cache, so memory or cache pressure from other guests, which shows as neither load nor steal, would
move the precision factor. From the member-over-FP32 series:
- the verdict as the pipeline takes it: the median of 9 consecutive blocks, over each disjoint window;
- the verdict spread over the sitting: the median of 9 blocks taken evenly across it, over each disjoint set;
how far each lands from the sitting's median, and whether the member and the precision factor move together.

    python -m benchmarks.measurement.verdict_drift [--minutes 25] [--append]

writes benchmarks/results/verdict_drift.md, .json and _series.png; `--append` adds a sitting to the stored ones
(the drift between sittings hours apart is the part one sitting cannot show).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from benchmarks.common import RESULTS, head_commit, progress, write_results  # noqa: E402
from ziplm.families import adapter_for  # noqa: E402
from ziplm.cache import StageCache, cache_root  # noqa: E402
from ziplm.pipeline.recipe import load_recipe  # noqa: E402
from ziplm.pipeline.report import environment_line, runtime_json  # noqa: E402
from ziplm.pipeline.run import References, Start, database_stage, deployer, prepare_inputs, references  # noqa: E402
from ziplm.runtimes.timing import CpuSnapshot, cpu_snapshot  # noqa: E402
from ziplm.stages import ziplm as zipl  # noqa: E402
from ziplm.stages.export import export_checked  # noqa: E402

COMMAND = "python -m benchmarks.measurement.verdict_drift"
TARGET = 4.0  # the compound recipe's last target, over dense FP32
VERDICT_BLOCKS = 9  # the pipeline's finished_repeats
SERIES = {"member_over_fp32": "member / dense FP32 (the verdict's reading)",
          "int8_over_fp32": "dense INT8 / dense FP32 (the precision factor)",
          "member_over_int8": "member / dense INT8 (the cross-check)"}


def steal_share(before: CpuSnapshot | None, after: CpuSnapshot | None) -> float | None:
    """The share of CPU time the hypervisor gave to other guests between two snapshots."""
    if before is None or after is None or after.elapsed <= before.elapsed:
        return None
    return (after.steal - before.steal) / (after.elapsed - before.elapsed)


MAIN_MEMORY_MB, CACHE_MB = 256, 8


def read_gbps(buffer: np.ndarray, passes: int = 1) -> float:
    """GB/s one core reads taking the max of `buffer`'s 8-byte words (vectorised and cheap, so it runs at the pace
    memory delivers; a float sum does not: 10 GB/s from the cache and from main memory alike here); the fastest of
    `passes` passes, after an untimed one when there are several (a small buffer is then read from the cache, and
    its rate climbs over the first few passes as the core wakes up)."""
    if passes > 1:
        buffer.max()
    rates = []
    for _ in range(passes):
        began = time.perf_counter()
        buffer.max()
        rates.append(buffer.nbytes / (time.perf_counter() - began) / 1e9)
    return max(rates)


def probe_memory(main: np.ndarray, cache: np.ndarray) -> dict[str, float]:
    return {"main_gbps": read_gbps(main), "cache_gbps": read_gbps(cache, passes=8)}


def load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def subjects(work: Path) -> tuple[References, Path, dict[str, Any], dict[str, Any]]:
    """The compound recipe's references, and its 4x structure pruned one-shot from the teacher, exported in INT8."""
    recipe = load_recipe("minilm_mr_compound")
    stages = StageCache(cache_root() / "stages", progress)
    inputs = prepare_inputs(recipe, stages)
    refs = references(recipe, inputs, stages)
    database = database_stage(recipe, inputs, Start(inputs.dense, inputs.dense_key), stages)
    structure = zipl.solve(database.value, inputs.table, TARGET / refs.table_scale)
    stitched = zipl.stitch(inputs.dense, adapter_for(inputs.dense.config), database.value, structure)
    member = work / "member.onnx"
    export_checked(deployer(recipe, inputs, "int8")(stitched), member, recipe.environment)
    return refs, member, structure.to_json(), runtime_json(inputs.table)


def measure_sitting(minutes: float) -> dict[str, Any]:
    started = datetime.now(timezone.utc).isoformat(timespec="minutes")
    with tempfile.TemporaryDirectory(prefix="ziplm-drift-") as work:
        refs, member, structure, runtime = subjects(Path(work))
        assert refs.own is not None and refs.cross is not None, "the compound recipe has an INT8 and an FP32 dense"
        pairs = {"member_over_fp32": (refs.verifier, member), "int8_over_fp32": (refs.verifier,
                                                                                 refs.own.path / "model.onnx"),
                 "member_over_int8": (refs.cross, member)}
        blocks: list[dict[str, Any]] = []
        main, cache = (np.ones(mb * 2**20 // 8, dtype=np.int64) for mb in (MAIN_MEMORY_MB, CACHE_MB))
        start, say = time.monotonic(), progress("drift")
        say(f"cycling through {len(pairs)} paired blocks for {minutes:g} minutes")
        while time.monotonic() - start < minutes * 60:
            for name, (verifier, onnx) in pairs.items():
                probe_before = probe_memory(main, cache)
                before, began = cpu_snapshot(), time.monotonic()
                check = verifier.measure_blocks(onnx, 1)[0]
                steal = steal_share(before, cpu_snapshot())
                probe_after = probe_memory(main, cache)
                memory = {key: round((probe_before[key] + probe_after[key]) / 2, 3) for key in probe_before}
                blocks.append({"series": name, "t": round(began - start, 2), "speedup": round(check.speedup.value, 5),
                               "load": load_average(), "steal": None if steal is None else round(steal, 5),
                               "other_load": check.speedup.other_load, "retaken": check.retaken, **memory})
            say(f"{blocks[-1]['t'] / 60:.1f} min: " + ", ".join(f"{b['series']} {b['speedup']:.3f}x"
                                                                 for b in blocks[-len(pairs):]))
    return {"commit": head_commit(), "started": started,
            "minutes": minutes, "runtime": runtime, "member_structure": structure,
            "precision_factor": refs.precision_factor.to_json() if refs.precision_factor else None, "blocks": blocks}


def series(sitting: dict[str, Any], name: str, key: str = "speedup") -> np.ndarray:
    """One field (by default the speedup) of every block of one series, in the order taken."""
    return np.array([b[key] for b in sitting["blocks"] if b["series"] == name])


def consecutive_verdicts(values: np.ndarray, size: int = VERDICT_BLOCKS) -> np.ndarray:
    """The median of each disjoint window of `size` consecutive blocks: a verdict as the pipeline takes it."""
    return np.array([np.median(values[i:i + size]) for i in range(0, len(values) - size + 1, size)])


def spread_verdicts(values: np.ndarray, size: int = VERDICT_BLOCKS) -> np.ndarray:
    """The median of `size` blocks taken evenly across the whole series, over each disjoint such set."""
    stride = len(values) // size
    return np.array([np.median(values[offset::stride][:size]) for offset in range(stride)])


def deviation_summary(verdicts: np.ndarray, reference: float) -> dict[str, Any]:
    """How far verdicts land from the reference (the sitting's median), relative."""
    deviations = verdicts / reference - 1.0
    return {"count": len(verdicts), "sd": round(float(np.std(deviations, ddof=1)), 5) if len(verdicts) > 1 else None,
            "max_abs": round(float(np.max(np.abs(deviations))), 5),
            "within_1_5": int(np.sum(np.abs(deviations) <= 0.015)), "within_3": int(np.sum(np.abs(deviations) <= 0.03))}


def analyse(sitting: dict[str, Any]) -> dict[str, Any]:
    member, factor, cross = (series(sitting, name) for name in SERIES)
    cycles = min(len(member), len(factor), len(cross))
    member, factor, cross = member[:cycles], factor[:cycles], cross[:cycles]
    median = float(np.median(member))
    steal = np.array([b["steal"] or 0.0 for b in sitting["blocks"] if b["series"] == "member_over_fp32"][:cycles])
    thirds = np.array_split(member, 3)
    return {
        "cycles": cycles, "median": {name: round(float(np.median(series(sitting, name))), 4) for name in SERIES},
        "block_sd": round(float(np.std(member / median - 1.0, ddof=1)), 5),
        "consecutive": deviation_summary(consecutive_verdicts(member), median),
        "spread": deviation_summary(spread_verdicts(member), median),
        "first_to_last_third": round(float(np.median(thirds[-1]) / np.median(thirds[0]) - 1.0), 5),
        # does the verdict's reading move with the precision factor (the FP32 side), or with the cross-check?
        "corr_member_factor": _correlation(np.log(member), np.log(factor)),
        "corr_member_cross": _correlation(np.log(member), np.log(cross)),
        "product_vs_direct_sd": round(float(np.std(cross * factor / member - 1.0, ddof=1)), 5),
        "corr_member_steal": _correlation(np.log(member), steal),
        "steal_mean": round(float(np.mean(steal)), 5),
        "memory": memory_correlations(sitting, cycles),
    }


def memory_correlations(sitting: dict[str, Any], cycles: int) -> dict[str, Any] | None:
    """How the main-memory and cache read rates beside each block vary, and whether the verdict's reading and the
    precision factor move with them (None for sittings recorded before the probes were)."""
    if "main_gbps" not in sitting["blocks"][0]:
        return None
    member, factor = (np.log(series(sitting, name)[:cycles]) for name in ("member_over_fp32", "int8_over_fp32"))
    result: dict[str, Any] = {}
    for key in ("main_gbps", "cache_gbps"):
        rates = series(sitting, "member_over_fp32", key)[:cycles]
        result[key] = {"median": round(float(np.median(rates)), 3),
                       "sd": round(float(np.std(rates / np.median(rates), ddof=1)), 5),
                       "corr_member": _correlation(member, np.log(rates)),
                       "corr_factor": _correlation(factor, np.log(series(sitting, "int8_over_fp32", key)[:cycles]))}
    return result


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    if np.std(a) == 0 or np.std(b) == 0:
        return None
    return round(float(np.corrcoef(a, b)[0, 1]), 3)


def plot(sittings: Sequence[dict[str, Any]], path: Path) -> None:
    def draw(axis: Axes, sitting: dict[str, Any]) -> None:
        for name, label in SERIES.items():
            blocks = [b for b in sitting["blocks"] if b["series"] == name]
            values = np.array([b["speedup"] for b in blocks])
            axis.plot([b["t"] / 60 for b in blocks], values / np.median(values), marker=".", lw=0.8, label=label)

    plot_sittings(sittings, path, draw, "block / series median", "+-3% of the series' median")


def plot_sittings(sittings: Sequence[dict[str, Any]], path: Path, draw: Callable[[Axes, dict[str, Any]], None],
                  ylabel: str, band: str) -> None:
    """One panel per sitting against minutes: what `draw` puts in it, a +-3% band labelled `band`, the sitting."""
    figure, axes = plt.subplots(len(sittings), 1, figsize=(9, 3.2 * len(sittings)), squeeze=False)
    for axis, sitting in zip(axes[:, 0], sittings):
        draw(axis, sitting)
        axis.axhspan(0.97, 1.03, color="grey", alpha=0.15, label=band)
        axis.set_title(f"sitting {sitting['started']} (commit {sitting['commit']})", fontsize=9)
        axis.set_xlabel("minutes")
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(result: dict[str, Any]) -> str:
    sittings = result["sittings"]
    lines = ["# How repeatable a paired verdict is: one INT8 file beside dense FP32, block after block", "",
             f"{environment_line({**sittings[0]['runtime'], 'device': 'the CPU each sitting names'})}. Three files "
             "exported from the cached MiniLM MR teacher: "
             "dense FP32 and dense INT8 (the compound recipe's references) and the INT8 structure its table solves "
             f"for {TARGET:g}x over dense FP32, pruned one-shot (no fine-tuning; speed does not depend on the values). "
             "A cycle takes three paired blocks as the pipeline takes them (60 interleaved rounds each, more while the "
             "interval is wide): member / dense FP32, dense INT8 / dense FP32, member / dense INT8. A verdict is the "
             f"median of {VERDICT_BLOCKS} blocks of member / dense FP32: **consecutive** as the pipeline takes it "
             f"(about a minute), or **spread** evenly over the sitting. Deviations are from the sitting's median.", "",
             "| sitting (UTC) | commit | CPU | cycles | member / FP32 median | INT8 / FP32 median | one block: SD "
             "| consecutive verdicts: SD, max, within 1.5% / 3% | spread verdicts: SD, max, within 1.5% / 3% "
             "| last third / first third |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    analyses = [analyse(sitting) for sitting in sittings]
    for sitting, a in zip(sittings, analyses):
        lines.append(f"| {sitting['started']} | {sitting['commit']} | {sitting['runtime']['device']} | {a['cycles']} "
                     f"| {a['median']['member_over_fp32']:.3f}x | {a['median']['int8_over_fp32']:.3f}x "
                     f"| {a['block_sd']:.1%} | {summary_cell(a['consecutive'])} | {summary_cell(a['spread'])} "
                     f"| {a['first_to_last_third']:+.1%} |")
    lines += ["", "Where the movement comes from (correlations of log speedups over the cycles of a sitting):", "",
              "| sitting (UTC) | member/FP32 with INT8/FP32 | member/FP32 with member/INT8 "
              "| member/INT8 x INT8/FP32 against member/FP32: SD | mean steal | member/FP32 with steal |",
              "|---|---|---|---|---|---|"]
    for sitting, a in zip(sittings, analyses):
        lines.append(f"| {sitting['started']} | {a['corr_member_factor']} | {a['corr_member_cross']} "
                     f"| {a['product_vs_direct_sd']:.1%} | {a['steal_mean']:.2%} | {a['corr_member_steal']} |")
    probed = [(sitting, a["memory"]) for sitting, a in zip(sittings, analyses) if a["memory"]]
    if probed:
        lines += ["", f"Memory beside each block: what one core reads per second from a {MAIN_MEMORY_MB} MB array "
                  f"(main memory) and from a warm {CACHE_MB} MB one (the shared L3 cache), the mean of a reading just "
                  "before and one just after the block; median, SD relative to it, and correlations of log rates with "
                  "the log speedups of the blocks they bracket (sittings before the probes were added have none):", "",
                  "| sitting (UTC) | main memory: GB/s, SD | member/FP32 with it | INT8/FP32 with it "
                  "| cache: GB/s, SD | member/FP32 with it | INT8/FP32 with it |",
                  "|---|---|---|---|---|---|---|"]
        for sitting, memory in probed:
            cells = [f"{m['median']:.2f}, {m['sd']:.1%} | {m['corr_member']} | {m['corr_factor']}"
                     for m in (memory["main_gbps"], memory["cache_gbps"])]
            lines.append(f"| {sitting['started']} | " + " | ".join(cells) + " |")
    lines += ["", "Sittings recorded before commit 79a52f8 name the CPU by its model name alone (\"AMD EPYC\"): the "
              "one of 2026-11-23 ran on the AVX512-VNNI EPYC the earlier benchmarks were measured on (dense INT8 1.94x "
              "dense FP32 there; 1.43x on the AVX2 EPYC of 2026-12-01). Each sitting's member is the structure its "
              "own CPU's table solves for 4x, so members of different CPUs are different structures."]
    between = between_sittings(sittings)
    if between:
        lines += ["", "Between sittings of one CPU and member, the member / FP32 median against the earliest such "
                  "sitting's: " + ", ".join(between) + "."]
    return "\n".join(lines + ["", "![series](verdict_drift_series.png)", "", f"Reproduce: `{COMMAND}`.", ""])


def between_sittings(sittings: Sequence[dict[str, Any]]) -> list[str]:
    """Each sitting's member / FP32 median against the earliest sitting of the same CPU and member structure."""
    notes = []
    for index, later in enumerate(sittings):
        same = (s for s in sittings[:index] if s["runtime"]["device"] == later["runtime"]["device"]
                and s["member_structure"] == later["member_structure"])
        earlier = next(same, None)
        if earlier is not None:
            ratio = analyse(later)["median"]["member_over_fp32"] / analyse(earlier)["median"]["member_over_fp32"]
            notes.append(f"{later['started']} {ratio - 1:+.1%} (against {earlier['started']})")
    return notes


def summary_cell(summary: dict[str, Any]) -> str:
    sd = "-" if summary["sd"] is None else f"{summary['sd']:.1%}"
    return (f"{sd}, {summary['max_abs']:.1%}, {summary['within_1_5']} / {summary['within_3']} "
            f"of {summary['count']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--append", action="store_true", help="add the sitting to the stored ones")
    args = parser.parse_args()
    stored = RESULTS / "verdict_drift.json"
    sittings = json.loads(stored.read_text())["sittings"] if args.append and stored.exists() else []
    result = {"command": COMMAND, "sittings": sittings + [measure_sitting(args.minutes)]}
    RESULTS.mkdir(exist_ok=True)
    plot(result["sittings"], RESULTS / "verdict_drift_series.png")
    write_results("verdict_drift", result, markdown(result))


if __name__ == "__main__":
    main()
