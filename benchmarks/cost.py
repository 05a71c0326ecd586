"""What a family costs: wall-clock of every stage, for MiniLM (fine-tuned on MR) and for the bert-base shape.

Stages: teacher fine-tune (MiniLM: the seconds recorded when the cached teacher was built; the bert-base shape has
random weights, no teacher), latency table (built fresh here, the cache is left alone), dense export, calibration
(Hessians), database, and per target every closed-loop round's search, stitch, export, paired verification and the
verdict that confirms a round read within the tolerance.

    python -m benchmarks.cost [--models minilm bert-base] [--targets ...] [--effort standard]

Default targets: MiniLM 1.5, 2, 2.5, 3 (the demo's); the bert-base shape 1.5, 2, 2.5, 3, 3.5, 4.

writes benchmarks/results/cost.md and .json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import MODELS, head_commit, load_subject, progress, write_results
from ziplm.families import adapter_for
from ziplm.pipeline.report import environment_line, runtime_json
from ziplm.runtimes import get_runtime
from ziplm.runtimes.paired import PairedVerifier
from ziplm.runtimes.policy import policy
from ziplm.stages import ziplm as zipl
from ziplm.stages.calibrate import collect_hessians
from ziplm.stages.closed_loop import Stopwatch, closed_loop
from ziplm.stages.export import export_checked, export_model
from ziplm.stages.latency_table import build_table

COMMAND = "python -m benchmarks.cost"
TARGETS = {"minilm": [1.5, 2.0, 2.5, 3.0], "bert-base": [1.5, 2.0, 2.5, 3.0, 3.5, 4.0]}
CACHED = ("latency table",)  # stages `ziplm run` reuses from the cache once built (with the teacher)
STEPS = ("solve", "build", "export", "verify", "confirm")  # a closed-loop round's steps, as `ziplm run` takes them


def run(model: str, targets: list[float], effort: str) -> dict[str, Any]:
    recipe, inputs = load_subject(model, targets)
    recipe = recipe.model_copy(update={"effort": effort})
    dense, tokenizer, calibration, teacher = inputs.dense, inputs.tokenizer, inputs.task.calibration, inputs.teacher
    env, clock, measure = recipe.environment, Stopwatch(), policy(recipe.effort)
    adapter = adapter_for(dense.config)
    table = clock.time("latency table", build_table, dense.config, env, recipe.latency_table.group_size, measure,
                       progress("table"))
    with tempfile.TemporaryDirectory(prefix="ziplm-cost-") as tmp:
        work = Path(tmp)
        dense_onnx = clock.time("dense export", export_model, dense, work / "dense.onnx", env.batch_size,
                                env.sequence_length)
        hessians = clock.time("calibration", collect_hessians, dense, tokenizer, adapter, inputs.task,
                              recipe.calibration, progress("calibrate"))
        database = clock.time("database", zipl.build_database, dense, adapter, hessians, table.group_size,
                              recipe.ziplm, progress("database"))
        example = adapter.example_inputs(dense.config, env.batch_size, env.sequence_length)
        verifier = PairedVerifier(get_runtime(env), env, dense_onnx, example, measure, recipe.verification.tolerance)
        members = [closed_loop(target, lambda s: zipl.solve(database, table, s),
                               lambda structure: zipl.stitch(dense, adapter, database, structure),
                               lambda member, path: export_checked(member, path, env), table, verifier,
                               recipe.verification, work / f"{target:g}x", progress(f"{target:g}x"), confirm=True)
                   for target in targets]
    stages = {"teacher fine-tune": teacher.seconds if teacher else None, **clock.seconds}
    per_member = [{"target": m.target, "rounds": len(m.rounds),
                   "deviation": round(m.final.check.deviation(m.target), 4),
                   "seconds": {step: round(sum(r.seconds.get(step, 0.0) for r in m.rounds), 2)
                               for step in STEPS}} for m in members]
    return {"model": MODELS[model], "runtime": runtime_json(table),
            "calibration_samples": min(len(calibration), recipe.calibration.samples),  # as collect_hessians takes
            "round_repeats": measure.round_repeats, "effort": recipe.effort,
            "stages": {k: None if v is None else round(v, 2) for k, v in stages.items()}, "members": per_member}


def markdown(results: list[dict[str, Any]], commit: str | None = None) -> str:
    lines = ["# Cost: wall-clock of every stage", "",
             f"{environment_line(results[0]['runtime'])}, on the 2-core build machine. Teacher: the time recorded "
             "when the cached teacher was built (MiniLM, 3 epochs on 3000 examples; that build shared the machine "
             "with other jobs, so it is an upper bound); the bert-base shape has random weights and no teacher. "
             "Member rows sum every closed-loop round: a round's reading (median of "
             f"{results[0]['round_repeats']} paired measurements) and, for a round read within the tolerance, "
             "the verdict that confirms it, as `ziplm run` takes them.", ""]
    for result in results:
        lines += [f"## {result['model']} ({result['calibration_samples']} calibration samples)", "",
                  "| stage | seconds |", "|---|---|"]
        lines += [f"| {stage} | {'n/a' if s is None else f'{s:.1f}'} |" for stage, s in result["stages"].items()]
        for member in result["members"]:
            seconds = member["seconds"]
            lines.append(f"| {member['target']:g}x member ({member['rounds']} rounds): search "
                         f"{seconds['solve']:.2f}, stitch {seconds['build']:.2f}, export {seconds['export']:.1f}, "
                         f"verify {seconds['verify']:.1f}, confirming verdict {seconds.get('confirm', 0.0):.1f}"
                         f"{deviation_note(member)} | {sum(seconds.values()):.1f} |")
        lines += [*cached_total(result), ""]
    measured = f" Measured at commit {commit}." if commit else ""
    return "\n".join(lines + [f"Reproduce: `{COMMAND}`.{measured}", ""])


def cached_total(result: dict[str, Any]) -> list[str]:
    """The family's wall-clock with the teacher and the latency table cached, and how far its members landed (runs
    that recorded deviations)."""
    members = result["members"]
    if not all("deviation" in m for m in members):
        return []
    stages = sum(s for name, s in result["stages"].items() if s is not None and name not in ("teacher fine-tune",
                                                                                               *CACHED))
    total = stages + sum(sum(m["seconds"].values()) for m in members)
    worst = max(abs(m["deviation"]) for m in members)
    return ["", f"With the teacher and the latency table cached: {total:.0f} s ({total / 60:.1f} min) for "
                f"{len(members)} targets ({result.get('effort', 'standard')} effort); every member within "
                f"{worst:.1%} of its target."]


def deviation_note(member: dict[str, Any]) -> str:
    """The member's measured deviation from its target, where the run recorded it."""
    return f"; measured {member['deviation']:+.1%} from the target" if "deviation" in member else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["minilm", "bert-base"])
    parser.add_argument("--targets", type=float, nargs="+", help="every model's targets (default: TARGETS)")
    parser.add_argument("--effort", choices=["quick", "standard", "thorough"], default="standard")
    args = parser.parse_args()
    results = [run(model, args.targets or TARGETS[model], args.effort) for model in args.models]
    commit = head_commit()
    write_results("cost", {"models": results, "command": COMMAND, "commit": commit}, markdown(results, commit))


if __name__ == "__main__":
    main()
