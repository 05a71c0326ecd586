"""One database, several runtimes: the same MiniLM + MR target solved in each runtime from its own latency table.

The recipe minilm_mr with `--targets` (default 2x), built once per runtime (ONNX Runtime, OpenVINO and DeepSparse on
the CPU, 2 threads, batch 1, sequence 128, FP32 dense weights): the teacher, calibration and OBS database are shared,
each runtime gets its own table, search and closed loop, and each member is verified beside that runtime's dense
model. Each member is also timed in the other runtimes beside their dense models (the median of `round_repeats`
paired measurements): what a structure chosen for one runtime does in another (PyTorch times the member's
torch.export program, exported for it where the member was built for an ONNX runtime).

    python -m benchmarks.runtimes [--runtimes onnxruntime openvino deepsparse] [--targets 2]

A runtime is NAME or NAME:KEY=VALUE,... (its options, each value read as YAML): `pytorch:device=cpu` adds PyTorch on
the CPU (not in the stored results yet).

writes benchmarks/results/runtimes.md and .json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import head_commit, progress, stage_cache, write_results
from ziplm.cache import StageCache
from ziplm.pipeline.cli import runtime_options
from ziplm.pipeline.recipe import load_recipe
from ziplm.pipeline.report import environment_line, runtime_json
from ziplm.pipeline.run import Family, build_family, prepare_inputs
from ziplm.runtimes.policy import policy
from ziplm.runtimes.pytorch import program_path
from ziplm.stages.closed_loop import Member
from ziplm.stages.export import export_model, writes_program
from ziplm.tasks import Task

COMMAND = "python -m benchmarks.runtimes"


def run(runtimes: list[str], targets: list[float]) -> dict[str, Any]:
    recipe = load_recipe("minilm_mr").model_copy(update={"targets": targets})
    repeats = policy(recipe.effort).round_repeats
    commit, families, results = head_commit(), {}, {}
    with tempfile.TemporaryDirectory(prefix="ziplm-runtimes-") as work:
        stages = StageCache(Path(work), progress)  # members measured afresh; one database for every runtime
        for spec in runtimes:
            runtime, options = runtime_spec(spec)
            variant = recipe.model_copy(update={"environment": recipe.environment.model_copy(
                update={"runtime": runtime, "options": options})})
            start = time.perf_counter()
            inputs = prepare_inputs(variant, stage_cache())  # teacher and tables: the product's cache
            families[runtime] = build_family(variant, inputs, stages)
            results[runtime] = {"runtime": runtime_json(inputs.table), "table": inputs.table.fingerprint,
                                "max_reachable_speedup": round(families[runtime].refs.reachable(inputs.table), 3),
                                "dense_metric": families[runtime].refs.dense.value.value,
                                "seconds": round(time.perf_counter() - start)}
        for runtime, family in families.items():
            results[runtime]["members"] = [member_row(member, runtime, families, repeats, inputs.task, Path(work))
                                           for member in family.members]
    return {"recipe": recipe.name, "targets": targets, "runtimes": results, "tolerance": recipe.verification.tolerance,
            "round_repeats": repeats, "commit": commit}


def runtime_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """NAME[:KEY=VALUE,...] as the runtime's name and options."""
    name, _, settings = spec.partition(":")
    return name, runtime_options([pair for pair in settings.split(",") if pair])


def member_row(member: Member, runtime: str, families: dict[str, Family], repeats: int, task: Task,
               work: Path) -> dict[str, Any]:
    check = member.final.check
    assert member.metric is not None  # scored by build_family
    elsewhere = {other: round(family.refs.verifier.measure(file_for(member, family, task, work),
                                                           repeats).speedup.value, 4)
                 for other, family in families.items() if other != runtime}
    return {"target_speedup": member.target, "measured_speedup": round(check.speedup.value, 4),
            "ci": [round(check.speedup.ci_low, 4), round(check.speedup.ci_high, 4)],
            "deviation": round(check.deviation(member.target), 4), "rounds": len(member.rounds),
            "accuracy": member.metric.value, "latency_ms": round(check.member.median_ms, 4),
            "dense_latency_ms": round(check.dense.median_ms, 4), "in_other_runtimes": elsewhere,
            "structure": member.final.structure.to_json()}


def file_for(member: Member, family: Family, task: Task, work: Path) -> Path:
    """The member's file as `family`'s runtime runs it: its own, or, for a runtime of programs where the member has
    none, the member exported again with its program."""
    env = family.refs.verifier.env
    if not writes_program(env) or program_path(member.onnx_path).is_file():
        return member.onnx_path
    return export_model(task.served(member.model), work / f"{member.onnx_path.parent.name}-{member.target:g}x.onnx",
                        env.batch_size, env.sequence_length, program=True)


def markdown(result: dict[str, Any]) -> str:
    runtimes = result["runtimes"]
    lines = [f"# One database, several runtimes: {result['recipe']}", "",
             "Each runtime solves the same targets from its own latency table; teacher, calibration and OBS database "
             "are shared. Speedup: the member timed paired and interleaved beside that runtime's dense model (median of"
             " per-round ratios, 95% interval), closed loop within "
             f"{result['tolerance']:.0%}. In the other runtimes: the same file beside their dense model, median of "
             f"{result['round_repeats']} paired measurements.", ""]
    lines += [f"- {name}: {environment_line(r['runtime'])}; dense accuracy {r['dense_metric']:.4f}, largest reachable "
              f"speedup {r['max_reachable_speedup']:.2f}x." for name, r in runtimes.items()]
    for index, target in enumerate(result["targets"]):
        rows = {name: r["members"][index] for name, r in runtimes.items()}
        lines += ["", f"## {target:g}x", "", "| runtime | measured (95% CI) | deviation | rounds | accuracy | dense ms "
                  "| member ms | the same file in " + " / ".join(runtimes) + " |", "|---|---|---|---|---|---|---|---|"]
        outside = [name for name, r in rows.items() if abs(r["deviation"]) > result["tolerance"]]
        for name, r in rows.items():
            others = " / ".join("-" if other == name else f"{r['in_other_runtimes'][other]:.2f}x" for other in runtimes)
            lines.append(f"| {name} | {r['measured_speedup']:.3f}x ({r['ci'][0]:.3f}-{r['ci'][1]:.3f}) "
                         f"| {r['deviation']:+.1%}{' (outside)' if name in outside else ''} | {r['rounds']} "
                         f"| {r['accuracy']:.4f} | {r['dense_latency_ms']:.2f} | {r['latency_ms']:.2f} | {others} |")
        lines += [""] + [f"{name}: no round within {result['tolerance']:.0%} in {rows[name]['rounds']} rounds; the "
                         "closest is shown (its family marks it not passed)." for name in outside]
        lines += ["", *_structure_lines(rows)]
    return "\n".join(lines + ["", f"Reproduce: `{result['command']}`, measured at commit {result['commit']}.", ""])


def _structure_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The chosen structures side by side, layer by layer (KV units kept, FFN neurons kept)."""
    names = list(rows)
    layers = len(rows[names[0]]["structure"]["units"])
    lines = ["| layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for layer in range(layers):
        cells = [f"{rows[n]['structure']['units'][layer]} heads, {rows[n]['structure']['ffn'][layer]} FFN"
                 for n in names]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    differing = sum(len({(rows[n]["structure"]["units"][i], rows[n]["structure"]["ffn"][i]) for n in names}) > 1
                    for i in range(layers))
    totals = "; ".join(f"{n} keeps {sum(rows[n]['structure']['units'])} heads and {sum(rows[n]['structure']['ffn'])} "
                       "FFN neurons" for n in names)
    return lines + ["", f"{differing} of {layers} layers are shaped differently; {totals}."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtimes", nargs="+", default=["onnxruntime", "openvino", "deepsparse"])
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0])
    args = parser.parse_args()
    result = run(args.runtimes, sorted(args.targets))
    result["command"] = " ".join([COMMAND, *sys.argv[1:]])
    write_results("runtimes", result, markdown(result))


if __name__ == "__main__":
    main()
