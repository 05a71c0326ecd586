"""A closed loop's round structures timed again side by side: do the loop's readings differ between rounds because the
structures differ, or because the host did between the minutes they were read at? (issue: the compound chain)

The latest compound run stored for this machine's CPU (benchmarks/results/compound.json) gives each member's
closed-loop structures and the speedups the loop read for them, each beside dense FP32 at its own minute. Here those
structures are built with random weights (speed does not depend on them) in the run's precision and timed all
interleaved in one run, `--sittings` times. Each is compared as its time over the first round's: the table's ratio
(from the predicted speedups the run recorded), each sitting's measured ratio, and the ratio the loop's readings
implied.

    python -m benchmarks.measurement.round_structures [--sittings 3] [--rounds 40]

writes benchmarks/results/round_structures.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from benchmarks.common import RESULTS, head_commit, write_results
from benchmarks.compound import by_device, this_device
from ziplm.families import ModelStructure
from ziplm.assets import resolve_model
from ziplm.pipeline.report import environment_line
from ziplm.runtimes import InferenceEnv, get_runtime
from ziplm.runtimes.policy import policy
from ziplm.stages.latency_table import measure_structures

COMMAND = "python -m benchmarks.measurement.round_structures"


def latest_run_here() -> dict[str, Any]:
    """The last compound run stored for this machine's CPU."""
    runs = by_device(json.loads((RESULTS / "compound.json").read_text())["compound_runs"]).get(this_device())
    if not runs:
        raise SystemExit(f"no compound run stored for {this_device()}: run `python -m benchmarks.compound` first")
    return runs[-1]


def time_rounds(run: dict[str, Any], member: dict[str, Any], sittings: int, rounds: int) -> dict[str, Any]:
    """Every closed-loop round of `member` timed interleaved, `sittings` times; ratios to its first round."""
    numbered = [(i + 1, r) for i, r in enumerate(member["rounds"]) if r["stage"] == "closed loop"]  # as compound.md
    loop = [r for _, r in numbered]
    structures = {f"round {n}": ModelStructure.from_json(r["structure"]) for n, r in numbered}
    config = AutoConfig.from_pretrained(resolve_model(run["recipe"]["model"]))
    env = InferenceEnv(**run["recipe"]["environment"])
    measured = []
    for sitting in range(sittings):
        with tempfile.TemporaryDirectory(prefix="ziplm-rounds-") as work:
            stats, _ = measure_structures(config, structures, env, get_runtime(env), rounds, 5, Path(work),
                                          policy().guard)  # a table's guard: these are timed as a table's are
        first = stats[next(iter(structures))].median_ms
        measured.append({name: stats[name].median_ms / first for name in structures})
        print(f"[{member['name']}] sitting {sitting + 1}: round 1 {first:.2f} ms, "
              + ", ".join(f"{name} {ratio:.3f}" for name, ratio in measured[-1].items()), flush=True)
    return {"target": member["target_speedup"], "rounds": [
        {"round": name, "table": loop[0]["predicted_speedup"] / r["predicted_speedup"],
         "loop": loop[0]["measured_speedup"] / r["measured_speedup"],
         "measured": [sitting[name] for sitting in measured]}
        for name, r in zip(structures, loop)]}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# A closed loop's rounds timed again side by side", "",
             f"{environment_line(result['runtime'])}. The structures of the compound run measured at commit "
             f"{result['run_commit']}, with random weights, each member's rounds timed interleaved in one run "
             f"({result['rounds']} rounds per model), {result['sittings']} sittings. Every figure is the time of a "
             "round's structure over the time of its member's round 1: the table's (from the run's predicted "
             "speedups), measured here in each sitting, and what the loop's readings implied (each read beside dense "
             "FP32 at its own minute, median of 3 paired measurements or a verdict). Rounds are numbered as in "
             "compound.md's rounds table; fine-tuned (finished) rounds are left out.", ""]
    for member in result["members"]:
        lines += [f"## {member['target']:g}x", "",
                  "| round | table | measured here (each sitting) | median | loop's readings | table error | "
                  "loop error |", "|---|---|---|---|---|---|---|"]
        for r in member["rounds"]:
            median = statistics.median(r["measured"])
            lines.append(f"| {r['round']} | {r['table']:.3f} | {' '.join(f'{m:.3f}' for m in r['measured'])} | "
                         f"{median:.3f} | {r['loop']:.3f} | {100 * (r['table'] / median - 1):+.1f}% | "
                         f"{100 * (r['loop'] / median - 1):+.1f}% |")
        lines.append("")
    lines.append(f"Reproduce: `{COMMAND}` (after `python -m benchmarks.compound` on the same CPU). Measured at commit "
                 f"{result['commit']}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sittings", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    run = latest_run_here()
    members = [time_rounds(run, member, args.sittings, args.rounds) for member in run["members"]]
    result = {"command": COMMAND, "runtime": run["runtime"], "run_commit": run["commit"], "sittings": args.sittings,
              "rounds": args.rounds, "members": members, "commit": head_commit()}
    write_results("round_structures", result, markdown(result))


if __name__ == "__main__":
    main()
