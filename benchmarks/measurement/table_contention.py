"""What other work on the machine does to a latency table, and what the table's guard (timing chunks taken again while
other processes keep cores busy: `latency_table.max_other_load`, `retakes`) gives back.

The subject is the compound recipe's table: MiniLM's shape, INT8 (QDQ) blocks, ONNX Runtime CPU, 2 threads, batch
1, sequence 128. Tables are built in turn, turn after turn, so the machine's drift falls on all of them alike: on the
quiet machine (guarded), while a neighbour works on one core in bursts without the guard (no retakes), and in bursts
with it (the defaults). Each table predicts the speedup over dense INT8 of the same structures (uniform at half the
heads and FFN, and seeded random ones); a deviation is from the median of the quiet tables' predictions.

    python -m benchmarks.measurement.table_contention [--turns 3]

writes benchmarks/results/table_contention.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from typing import Any

import numpy as np

from benchmarks.common import head_commit, progress, write_results
from benchmarks.measurement.contention import BURSTS, running
from ziplm.families import ModelStructure, adapter_for
from ziplm.families.loading import load_config
from ziplm.pipeline.recipe import Recipe, load_recipe
from ziplm.pipeline.report import environment_line, runtime_json
from ziplm.runtimes.policy import policy
from ziplm.stages.latency_table import LatencyTable, TableSettings, build_table, ffn_levels, random_structure

COMMAND = "python -m benchmarks.measurement.table_contention"
RANDOM_STRUCTURES = 4
VARIANTS = {"quiet": (None, None), "bursts, no guard": (BURSTS, 0), "bursts, guard": (BURSTS, None)}


def probe_structures(table_settings: TableSettings) -> dict[str, ModelStructure]:
    """The structures every table predicts: uniform at half the heads and FFN, and seeded random ones."""
    config = load_config("minilm")
    shape = adapter_for(config).shape(config)
    widths = ffn_levels(shape.ffn_size, table_settings.group_size)
    rng = random.Random(1)
    half = min(widths, key=lambda w: abs(w - shape.ffn_size / 2))
    return {"uniform-50": ModelStructure.uniform(shape, shape.num_units // 2, half),
            **{f"random-{i}": random_structure(shape, widths, rng) for i in range(RANDOM_STRUCTURES)}}


def predicted_speedups(table: LatencyTable, structures: dict[str, ModelStructure]) -> dict[str, float]:
    return {name: round(table.dense_ms() / table.predict_ms(s), 5) for name, s in structures.items()}


def run(turns: int) -> dict[str, Any]:
    recipe = load_recipe("minilm_mr_compound")
    config, env = load_config("minilm"), recipe.environment
    structures = probe_structures(recipe.latency_table)
    tables, say, runtime = [], progress("tables"), None
    for turn in range(turns):
        for variant, (neighbour, retakes) in VARIANTS.items():
            measure = policy(recipe.effort) if retakes is None else dataclasses.replace(policy(recipe.effort),
                                                                                          retakes=retakes)
            start = time.monotonic()
            with running(neighbour):
                table = build_table(config, env, recipe.latency_table.group_size, measure, progress=lambda _: None)
            runtime = runtime_json(table)
            tables.append({"turn": turn, "variant": variant, "seconds": round(time.monotonic() - start, 1),
                           "predicted": predicted_speedups(table, structures), "machine_load": table.machine_load,
                           "correction": {"scale": table.correction.scale, "offset": table.correction.offset}})
            load = table.machine_load["blocks"]
            say(f"turn {turn + 1}/{turns}, {variant}: {tables[-1]['seconds']:.0f} s, block chunks retaken "
                f"{load['retaken']}, disturbed {load['disturbed']}; predicted "
                + ", ".join(f"{name} {value:.3f}x" for name, value in tables[-1]["predicted"].items()))
    return {"command": COMMAND, "commit": head_commit(), "runtime": runtime,
            "settings": table_settings(recipe), "structures": {n: s.to_json() for n, s in
                                                                          structures.items()}, "tables": tables}


def table_settings(recipe: Recipe) -> dict[str, Any]:
    """The table's settings as the stored runs record them: its group size and the effort's measurement counts."""
    measure = policy(recipe.effort)
    return {"group_size": recipe.latency_table.group_size, "block_rounds": measure.block_rounds,
            "calibration_rounds": measure.calibration_rounds, "max_other_load": measure.max_other_load,
            "retakes": measure.retakes, "effort": recipe.effort}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    names = list(result["structures"])
    quiet = {name: float(np.median([t["predicted"][name] for t in result["tables"] if t["variant"] == "quiet"]))
             for name in names}
    variants = {}
    for variant in VARIANTS:
        taken = [t for t in result["tables"] if t["variant"] == variant]
        deviations = np.array([[t["predicted"][name] / quiet[name] - 1.0 for name in names] for t in taken])
        variants[variant] = {
            "tables": len(taken), "max_abs_deviation": float(np.abs(deviations).max()),
            "median_abs_deviation": float(np.median(np.abs(deviations))),
            "per_table_max": [round(float(row[np.argmax(np.abs(row))]), 4) for row in deviations],
            "retaken": sum(t["machine_load"][timing]["retaken"] for t in taken for timing in t["machine_load"]),
            "disturbed": sum(t["machine_load"][timing]["disturbed"] for t in taken for timing in t["machine_load"]),
            "seconds": float(np.mean([t["seconds"] for t in taken]))}
    return {"quiet_median": quiet, "variants": variants}


def markdown(result: dict[str, Any]) -> str:
    s = summary(result)
    settings = result["settings"]
    lines = ["# A latency table built under other load on the machine, with and without the guard", "",
             f"{environment_line(result['runtime'])}; commit {result['commit']}. MiniLM's shape, INT8 (QDQ) blocks, "
             f"{settings['block_rounds']} rounds per block and {settings['calibration_rounds']} per calibration "
             "model, timed in chunks of about a second. The neighbour works on one core in bursts (1-4 s busy, "
             "2-6 s idle, at random). Guard: a chunk during which other work kept more than "
             f"{settings['max_other_load']} cores busy is timed again, up to {settings['retakes']} times, after a "
             "pause; without it, no chunk is. Deviations: each table's predicted speedup over dense INT8 against the "
             "median of the quiet tables' predictions, for the same structures.", "",
             "| tables | largest deviation of each table (its worst structure) | largest | median | chunks retaken "
             "| chunks left disturbed | seconds per table |", "|---|---|---|---|---|---|---|"]
    for variant, row in s["variants"].items():
        lines.append(f"| {variant} ({row['tables']}) | {', '.join(f'{d:+.1%}' for d in row['per_table_max'])} "
                     f"| {row['max_abs_deviation']:.1%} | {row['median_abs_deviation']:.1%} | {row['retaken']} "
                     f"| {row['disturbed']} | {row['seconds']:.0f} |")
    lines += ["", "Quiet tables' median predictions: "
              + ", ".join(f"{name} {value:.3f}x" for name, value in s["quiet_median"].items()) + "."]
    return "\n".join(lines + ["", f"Reproduce: `{COMMAND}`.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=3)
    result = run(parser.parse_args().turns)
    result["summary"] = summary(result)
    write_results("table_contention", result, markdown(result))


if __name__ == "__main__":
    main()
