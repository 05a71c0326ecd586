"""Target vs achieved speedup (the paper's Table 5) in ONNX Runtime CPU, for the bert-base shape and for MiniLM (and
the base-sized random shapes of the other encoder families).

bert-base: random weights serve for latency (ASSETS.md); calibration runs real MR sentences through MiniLM's
tokenizer (the same 30,522-token BERT vocabulary). MiniLM: the dense teacher fine-tuned on MR, as `ziplm run`
builds it. Each target goes through the closed loop; the first round is the open-loop result (the table alone),
the chosen round the closed-loop one. Every member is measured end to end against the dense model, interleaved.

    python -m benchmarks.speedup_guarantee [--models bert-base minilm] [--targets 1.5 2 3 4 6 8] [--name NAME]

writes benchmarks/results/speedup_guarantee.md and .json (NAME.md and .json: the random shapes of other families,
    --models roberta-base distilbert-base modernbert-base --targets 2 4 --name speedup_guarantee_families; GPT-2
    small's time to first token, --models gpt2-small --targets 1.5 2 3 4 --phase prefill --name
    speedup_guarantee_gpt2).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import MODELS, head_commit, load_subject, progress, write_results
from ziplm.cache import StageCache
from ziplm.pipeline.report import environment_line, runtime_json
from ziplm.pipeline.run import build_family
from ziplm.runtimes.policy import policy
from ziplm.stages.closed_loop import Member

COMMAND = "python -m benchmarks.speedup_guarantee"


def run(model: str, targets: list[float], phase: str = "sequence") -> dict[str, Any]:
    recipe, inputs = load_subject(model, targets, phase)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ziplm-guarantee-") as work:
        family = build_family(recipe, inputs, StageCache(Path(work), progress))  # measured afresh, not cached
    rows = [_row(member, recipe.verification.tolerance) for member in family.members]
    return {"model": MODELS[model], "commit": head_commit(), "runtime": runtime_json(inputs.table), "rows": rows,
            "tolerance": recipe.verification.tolerance, "max_rounds": recipe.verification.max_rounds,
            "round_repeats": policy(recipe.effort).round_repeats,
            "finished_repeats": policy(recipe.effort).verdict_repeats, "effort": recipe.effort,
            "table": inputs.table.fingerprint,
            "seconds": round(time.perf_counter() - start, 1)}


def _row(member: Member, tolerance: float) -> dict[str, Any]:
    open_loop, chosen = member.rounds[0], member.final
    return {
        "target_speedup": member.target,
        "measured_speedup": round(chosen.check.speedup.value, 4),
        "deviation": round(chosen.check.deviation(member.target), 4),
        "ci": [round(chosen.check.speedup.ci_low, 4), round(chosen.check.speedup.ci_high, 4)],
        "within_tolerance": abs(chosen.check.deviation(member.target)) <= tolerance,
        "rounds": len(member.rounds),
        "open_loop_measured_speedup": round(open_loop.check.speedup.value, 4),
        "open_loop_deviation": round(open_loop.check.deviation(member.target), 4),
        "predicted_speedup": round(chosen.predicted_speedup, 4),
        "structure": chosen.structure.to_json(),
    }


def markdown(results: list[dict[str, Any]], command: str = COMMAND) -> str:
    lines = [
        "# Speedup guarantee: target vs measured speedup",
        "",
        f"{environment_line(results[0]['runtime'])}. Speedup = dense time / member time, median of per-round ratios "
        "of the two timed interleaved in one run (95% interval). Open loop = the latency table alone (first round); "
        f"closed loop = re-solved until within {results[0]['tolerance']:.0%} (at most {results[0]['max_rounds']} "
        "rounds; re-aimed by the table's offset, measured / predicted, pooled over every reading so far, each weighted "
        "by its measurements). Each round's reading is the median of "
        f"{results[0]['round_repeats']} paired measurements; a reading within the tolerance is taken again as a "
        f"verdict (at least {results[0]['finished_repeats']} measurements, more while unsettled), which decides and "
        "is the figure shown. The paper's open-loop deviation was up to 5.28%.",
        "",
    ]
    for result in results:
        lines += [
            f"## {result['model']}",
            "",
            "| target | open-loop measured | open-loop deviation | closed-loop measured (95% CI) | deviation | rounds "
            "| within tolerance |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            lines.append(
                f"| {r['target_speedup']:g}x | {r['open_loop_measured_speedup']:.3f}x "
                f"| {r['open_loop_deviation']:+.1%} | {r['measured_speedup']:.3f}x ({r['ci'][0]:.3f}-{r['ci'][1]:.3f}) "
                f"| {r['deviation']:+.1%} | {r['rounds']} | {'yes' if r['within_tolerance'] else 'NO'} |")
        lines += ["", f"Family built and verified in {result['seconds']:.0f} s (table cached), at commit "
                  f"{result['commit']}.", ""]
    return "\n".join(lines + [f"Reproduce: `{command}`.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["bert-base", "minilm"])
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2, 3, 4, 6, 8])
    parser.add_argument("--name", default="speedup_guarantee", help="results file name (benchmarks/results/NAME.md)")
    parser.add_argument("--phase", choices=["sequence", "prefill"], default="sequence",
                        help="decoders: prefill times generation.onnx on a prompt (time to first token)")
    args = parser.parse_args()
    results = [run(model, args.targets, args.phase) for model in args.models]
    command = " ".join(["python -m benchmarks.speedup_guarantee", *sys.argv[1:]])
    write_results(args.name, {"models": results, "command": command}, markdown(results, command))


if __name__ == "__main__":
    main()
