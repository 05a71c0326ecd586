"""Accuracy against MEASURED speedup on MiniLM, for ZipLM and its baselines and ablations, side by side in one run.

Per task (MR and rotten tomatoes, each split 3000 / 500 / 500), against one dense ONNX session, same runtime settings:
- ZipLM one-shot: the pipeline's family (database, search on the measured table, closed loop).
- uniform magnitude: the same units and FFN width in every layer, largest norms kept, same closed loop.
- layer dropping: the first k layers kept whole (k = L-1 .. 1), measured at whatever speedup k gives.
- ZipLM without the OBS update: ZipLM's structures, the teacher's own weights of the kept columns.
- ZipLM with a FLOPs table: the same search, but the costs are multiply-adds instead of measured times; the closed
  loop still corrects the speedup, so this isolates how well FLOPs rank the structures.
No method is fine-tuned after pruning (one-shot, post-training): the chain with distillation is benchmarks.compound.

    python -m benchmarks.accuracy_vs_speedup [--tasks mr rotten_tomatoes] [--targets 1.5 2 2.5 3 4]

writes benchmarks/results/accuracy_vs_speedup.md, .json and accuracy_vs_speedup_<task>.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedModel

from benchmarks.common import RESULTS, progress, stage_cache, write_results
from ziplm.families import adapter_for
from ziplm.pipeline import plots
from ziplm.cache import StageCache
from ziplm.pipeline.recipe import load_recipe
from ziplm.pipeline.report import environment_line, runtime_json
from ziplm.pipeline.run import build_family, prepare_inputs
from ziplm.stages.flops_table import flops_table
from ziplm.stages import ziplm as zipl
from ziplm.stages.baselines import drop_layers, magnitude_prune, uniform_structure
from ziplm.stages.export import export_checked
from ziplm.runtimes.paired import LatencyCheck, PairedVerifier
from ziplm.stages.closed_loop import Member, closed_loop

COMMAND = "python -m benchmarks.accuracy_vs_speedup"
RECIPES = {"mr": "minilm_mr", "rotten_tomatoes": "minilm_rotten_tomatoes"}
ZIPLM = "ZipLM one-shot"
BASELINES = ["uniform magnitude", "layer dropping", "ZipLM w/o OBS update", "ZipLM w/ FLOPs table"]


def run_task(task: str, targets: list[float]) -> dict[str, Any]:
    recipe = load_recipe(RECIPES[task]).model_copy(update={"targets": targets})
    inputs = prepare_inputs(recipe, stage_cache())
    dense, tokenizer, table, validation = inputs.dense, inputs.tokenizer, inputs.table, inputs.task.validation
    adapter = adapter_for(dense.config)
    accuracy = lambda model: inputs.task.evaluate(model, tokenizer).value  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="ziplm-tradeoff-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        family = build_family(recipe, inputs, StageCache(work / "stages", progress))  # measured afresh
        database, verifier = family.database, family.refs.verifier
        seconds = {"ziplm_family": time.perf_counter() - start}
        flops = flops_table(table)
        loops = {
            "uniform magnitude": (table, lambda s: uniform_structure(table, s),
                                  lambda structure: magnitude_prune(dense, adapter, structure)),
            "ZipLM w/ FLOPs table": (flops, lambda s: zipl.solve(database, flops, s),
                                     lambda structure: zipl.stitch(dense, adapter, database, structure)),
        }
        points: dict[str, list[dict[str, Any]]] = {ZIPLM: [_closed_loop_point(m, accuracy) for m in family.members]}
        for method, (method_table, solve, build) in loops.items():
            members = [closed_loop(target, solve, build, lambda model, path: export_checked(model, path, verifier.env),
                                   method_table, verifier, recipe.verification, work / f"{method}-{target:g}x",
                                   progress(f"{method} {target:g}x")) for target in targets]
            points[method] = [_closed_loop_point(m, accuracy) for m in members]
        points["ZipLM w/o OBS update"] = [
            _measured_point(zipl.stitch(dense, adapter, database, m.final.structure, obs_update=False), verifier,
                            work / f"no-obs-{m.target:g}x.onnx", accuracy, m.target) for m in family.members]
        num_layers = adapter.shape(dense.config).num_layers
        points["layer dropping"] = [
            {**_measured_point(drop_layers(dense, adapter, k), verifier, work / f"layers-{k}.onnx", accuracy),
             "layers_kept": k} for k in range(num_layers - 1, 0, -1)]
    dense_accuracy = accuracy(dense)
    return {"task": task, "recipe": recipe.name, "runtime": runtime_json(table), "dense_accuracy": dense_accuracy,
            "validation_size": len(validation), "targets": targets, "methods": points,
            "ahead": ziplm_ahead(points, dense_accuracy), "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def measure(model: PreTrainedModel, verifier: PairedVerifier, path: Path, repeats: int = 1) -> LatencyCheck:
    """Export, check parity, and time against the dense session (paired, interleaved; the median of `repeats`)."""
    export_checked(model, path, verifier.env)
    return verifier.measure(path, repeats)


def _closed_loop_point(member: Member, accuracy: Callable[[PreTrainedModel], float]) -> dict[str, Any]:
    return {**_point(member.target, member.final.check, accuracy(member.model)), "rounds": len(member.rounds),
            "open_loop_deviation": round(member.rounds[0].check.deviation(member.target), 4),
            "structure": member.final.structure.to_json()}


def _measured_point(model: PreTrainedModel, verifier: PairedVerifier, path: Path,
                    accuracy: Callable[[PreTrainedModel], float], target: float | None = None) -> dict[str, Any]:
    return _point(target, measure(model, verifier, path), accuracy(model))


def _point(target: float | None, check: LatencyCheck, accuracy: float) -> dict[str, Any]:
    return {"target_speedup": target, "measured_speedup": round(check.speedup.value, 4),
            "ci": [round(check.speedup.ci_low, 4), round(check.speedup.ci_high, 4)], "accuracy": accuracy}


def ziplm_ahead(points: dict[str, list[dict[str, Any]]], dense_accuracy: float,
                methods: list[str] = BASELINES) -> list[dict[str, Any]]:
    """Every point of `methods` against ZipLM's accuracy at the same measured speedup (linear between ZipLM's points,
    the dense model at 1x being the first); points without a measurement (a method that failed) are left out."""
    ziplm = sorted([(1.0, dense_accuracy)] + [(p["measured_speedup"], p["accuracy"]) for p in points[ZIPLM]])
    speedups, accuracies = np.array([s for s, _ in ziplm]), np.array([a for _, a in ziplm])
    verdicts = []
    for method in methods:
        for p in (p for p in points[method] if "measured_speedup" in p):
            inside = speedups[0] <= p["measured_speedup"] <= speedups[-1]
            ziplm_at = float(np.interp(p["measured_speedup"], speedups, accuracies)) if inside else None
            verdicts.append({"method": method, "measured_speedup": p["measured_speedup"], "accuracy": p["accuracy"],
                             "ziplm_accuracy": ziplm_at,
                             "ziplm_ahead": None if ziplm_at is None else ziplm_at > p["accuracy"]})
    return verdicts


def markdown(results: list[dict[str, Any]]) -> str:
    env = results[0]["runtime"]
    lines = ["# Accuracy vs measured speedup: ZipLM, baselines and ablations (MiniLM, one-shot, no fine-tuning)", "",
             f"{environment_line(env)}. Every speedup is measured end to end against the same dense session, "
             "interleaved (median of per-round ratios). Accuracy on 500 validation examples per task (a single "
             "figure carries about +-2 points of sampling noise; all methods are scored on the same examples). "
             "Closed-loop methods were re-solved until within 3% of the target. Reproduce: "
             f"`{COMMAND}`.", ""]
    for result in results:
        lines += _task_markdown(result)
    return "\n".join(lines)


def _task_markdown(result: dict[str, Any]) -> list[str]:
    methods = result["methods"]
    lines = [f"## {result['task']} (dense accuracy {result['dense_accuracy']:.4f})", "",
             f"![accuracy vs speedup](accuracy_vs_speedup_{result['task']}.png)", "",
             "| target | " + " | ".join(m for m in methods if m != "layer dropping") + " |",
             "|---|" + "---|" * (len(methods) - 1)]
    for index, target in enumerate(result["targets"]):
        cells = [f"{methods[m][index]['measured_speedup']:.2f}x: {methods[m][index]['accuracy']:.3f}"
                 for m in methods if m != "layer dropping"]
        lines.append(f"| {target:g}x | " + " | ".join(cells) + " |")
    lines += ["", "Layer dropping: " + ", ".join(f"{p['layers_kept']} layers {p['measured_speedup']:.2f}x: "
                                                 f"{p['accuracy']:.3f}" for p in methods["layer dropping"]) + ".", ""]
    return lines + verdict_lines(result["ahead"]) + [""] + _why(result) + [""]


def verdict_lines(ahead: list[dict[str, Any]]) -> list[str]:
    compared = [v for v in ahead if v["ziplm_ahead"] is not None]
    behind = [v for v in compared if not v["ziplm_ahead"]]
    outside = [v for v in ahead if v["ziplm_ahead"] is None]
    lines = [f"ZipLM is ahead at {len(compared) - len(behind)} of {len(compared)} baseline points inside its measured "
             "speedup range (its accuracy interpolated at the baseline's measured speedup)."]
    lines += [f"- not ahead: {v['method']} at {v['measured_speedup']:.2f}x, {v['accuracy']:.3f} vs ZipLM "
              f"{v['ziplm_accuracy']:.3f}" for v in behind]
    if outside:
        lines.append("Outside ZipLM's measured range (not compared): " + ", ".join(
            f"{v['method']} {v['measured_speedup']:.2f}x ({v['accuracy']:.3f})" for v in outside) + ".")
    return lines


def _why(result: dict[str, Any]) -> list[str]:
    """What the ablations and the layer-dropping baseline show, from the numbers of this run."""
    methods = result["methods"]
    flops, table = methods["ZipLM w/ FLOPs table"], methods[ZIPLM]
    missed = [f"{p['target_speedup']:g}x (reached {p['measured_speedup']:.2f}x)" for p in flops
              if abs(p["measured_speedup"] / p["target_speedup"] - 1) > 0.03]
    margins = [100 * (v["accuracy"] - v["ziplm_accuracy"]) for v in result["ahead"]
               if v["method"] == "ZipLM w/ FLOPs table" and v["ziplm_accuracy"] is not None]
    no_obs_gap = min(t["accuracy"] - n["accuracy"] for t, n in zip(table, methods["ZipLM w/o OBS update"]))
    return [
        "Why:",
        f"- FLOPs table: open loop it missed its targets by up to "
        f"{max(abs(p['open_loop_deviation']) for p in flops):.1%} (the measured table by up to "
        f"{max(abs(p['open_loop_deviation']) for p in table):.1%}) and needed "
        f"{sum(p['rounds'] for p in flops)} closed-loop rounds against {sum(p['rounds'] for p in table)}"
        + (f"; it never came within 3% at {', '.join(missed)}" if missed else "") + ". Once the closed loop has "
        f"corrected its speed, its members differ from ZipLM's by {min(margins):+.1f} to {max(margins):+.1f} accuracy "
        "points at the same measured speedup (one figure's sampling noise is about +-2 points): both minimise the same "
        "OBS error, and on ONNX Runtime CPU at batch 1 the time of attention and FFN tracks their FLOPs closely "
        "enough that ranking by FLOPs costs no accuracy here. What measuring buys is the guarantee (members within "
        "tolerance in the first rounds, where FLOPs needed more rounds or missed), not accuracy.",
        f"- The OBS weight update is worth at least {no_obs_gap * 100:.1f} points at every target (same structures "
        "without it).",
        "- Layer dropping is one-shot here like every method in this table: the classifier then reads a representation "
        "it was never trained on, so below the full depth it falls to about chance (or the majority class). The "
        "paper's layer-dropping baseline is fine-tuned after dropping; the chain with distillation is in "
        "benchmarks/results/compound.md.",
    ]


def plot(result: dict[str, Any]) -> Path:
    series = {method: [(1.0, result["dense_accuracy"])] + [(p["measured_speedup"], p["accuracy"]) for p in points]
              for method, points in result["methods"].items()}
    return plots.metric_vs_speedup(RESULTS / f"accuracy_vs_speedup_{result['task']}.png", series,
                                   result["dense_accuracy"], "accuracy",
                                   f"MiniLM on {result['task']}: one-shot, no fine-tuning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=sorted(RECIPES), default=["mr", "rotten_tomatoes"])
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2, 2.5, 3, 4])
    parser.add_argument("--render", action="store_true", help="redraw markdown and plots from the saved JSON only")
    args = parser.parse_args()
    if args.render:
        results = json.loads((RESULTS / "accuracy_vs_speedup.json").read_text())["tasks"]
        for result in results:
            result["ahead"] = ziplm_ahead(result["methods"], result["dense_accuracy"])
    else:
        results = [run_task(task, sorted(args.targets)) for task in args.tasks]
    for result in results:
        plot(result)
    write_results("accuracy_vs_speedup", {"tasks": results, "command": COMMAND}, markdown(results))


if __name__ == "__main__":
    main()
