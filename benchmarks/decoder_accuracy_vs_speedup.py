"""Perplexity against MEASURED prefill speedup on SmolLM2-135M (Shakespeare), ZipLM beside its baselines in one run.

Every model is timed against the dense model, paired and interleaved (the recipe smollm2_shakespeare: ONNX Runtime
CPU, 2 threads, batch 1, sequence 256), and scored on the same validation blocks:
- ZipLM one-shot: the pipeline's family (database, search on the measured table, closed loop).
- gradual ZipLM with distillation: each target pruned from the previous member, then distilled from the dense model
  (next-token loss, logit KL and token-level hidden-state MSE) for `--distill-blocks` train blocks (the CPU budget).
- uniform magnitude: the same KV units and FFN width in every layer, largest norms kept, same closed loop.
- layer dropping by block influence (ShortGPT): the layers that change the residual stream least removed whole,
  as many as the table predicts for the target, same closed loop.
- ZipLM without the OBS update: ZipLM's structures with the dense model's own weights of the kept columns.

    python -m benchmarks.decoder_accuracy_vs_speedup [--targets 1.25 1.5 2] [--methods ...] [--render]

writes benchmarks/results/decoder_accuracy_vs_speedup.md, .json and .png. `--methods` runs ZipLM one-shot and the
methods named, and keeps the stored points of the others.
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

from benchmarks.accuracy_vs_speedup import measure
from benchmarks.common import RESULTS, head_commit, progress, stage_cache, write_results
from ziplm.cache import StageCache
from ziplm.families import adapter_for
from ziplm.pipeline import plots
from ziplm.pipeline.recipe import Recipe, load_recipe
from ziplm.pipeline.report import environment_line, runtime_json
from ziplm.pipeline.run import Inputs, build_family, prepare_inputs
from ziplm.stages import ziplm as zipl
from ziplm.stages.baselines import (block_influence, influence_structure, magnitude_prune, remove_modules,
                                    uniform_structure)
from ziplm.stages.chain import Distill
from ziplm.stages.closed_loop import Member, closed_loop
from ziplm.stages.export import export_checked
from ziplm.stages.ziplm import ZipLMSettings

COMMAND = "python -m benchmarks.decoder_accuracy_vs_speedup"
RECIPE = "smollm2_shakespeare"
ZIPLM, GRADUAL = "ZipLM one-shot", "gradual ZipLM + distillation"
UNIFORM, INFLUENCE, NO_OBS = "uniform magnitude", "layer dropping (block influence)", "ZipLM w/o OBS update"
METHODS = [ZIPLM, UNIFORM, INFLUENCE, NO_OBS, GRADUAL]  # the slowest last
DISTILL_LEARNING_RATE = 1e-4  # one short pass: 5e-5 moved a member too little in 50 steps
Perplexity = Callable[[PreTrainedModel], float]


def run(targets: list[float], methods: list[str], distill_blocks: int) -> dict[str, Any]:
    recipe = load_recipe(RECIPE).model_copy(update={"targets": targets})
    inputs = prepare_inputs(recipe, stage_cache())
    perplexity: Perplexity = lambda model: inputs.task.evaluate(model, inputs.tokenizer).value  # noqa: E731
    points: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ziplm-decoder-tradeoff-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        family = build_family(recipe, inputs, StageCache(work / "stages", progress))  # measured afresh
        seconds[ZIPLM] = time.perf_counter() - start
        points[ZIPLM] = [closed_loop_point(member, perplexity) for member in family.members]
        for method in [m for m in methods if m != ZIPLM]:
            start = time.perf_counter()
            points[method] = METHOD_RUNS[method](recipe, inputs, family, perplexity, work, distill_blocks)
            seconds[method] = time.perf_counter() - start
    return {"recipe": recipe.name, "runtime": runtime_json(inputs.table), "targets": targets,
            "dense_perplexity": perplexity(inputs.dense), "validation_blocks": len(inputs.task.validation),
            "block_tokens": recipe.task.max_length, "max_reachable_speedup": round(inputs.table.max_speedup(), 3),
            "distill_blocks": distill_blocks, "distill_learning_rate": DISTILL_LEARNING_RATE, "methods": points,
            "seconds": {k: round(v) for k, v in seconds.items()},
            "commit": head_commit()}


def gradual(recipe: Recipe, inputs: Inputs, family: Any, perplexity: Perplexity, work: Path,
            distill_blocks: int) -> list[dict[str, Any]]:
    """Gradual ZipLM whose chain distils each member for one pass over `distill_blocks` train blocks: the recipe's
    task cut to that many train blocks, its fractions chosen so that validation and calibration stay the same
    blocks (the first ones of the same seeded order)."""
    kept = len(inputs.task.validation)
    if len(inputs.task.calibration) != kept:
        raise ValueError("the budgeted split keeps validation and calibration only when they are the same size")
    total = 2 * kept + distill_blocks
    task = recipe.task.model_copy(update={"max_examples": total, "validation_fraction": kept / total,
                                          "calibration_fraction": kept / total})
    chain = [Distill(epochs=1, task_weight=1.0, logit_weight=1.0, token_weight=0.1,
                     learning_rate=DISTILL_LEARNING_RATE)]
    variant = recipe.model_copy(update={"name": f"{recipe.name}-gradual", "task": task, "chain": chain,
                                        "ziplm": ZipLMSettings(gradual=True)})
    budget = prepare_inputs(variant, stage_cache())
    if budget.task.validation != inputs.task.validation or len(budget.task.train) != distill_blocks:
        raise AssertionError("the budgeted split changed the validation blocks")
    members = build_family(variant, budget, StageCache(work / "gradual-stages", progress)).members
    return [closed_loop_point(member, perplexity) for member in members]


def uniform(recipe: Recipe, inputs: Inputs, family: Any, perplexity: Perplexity, work: Path,
            _: int) -> list[dict[str, Any]]:
    adapter = adapter_for(inputs.dense.config)
    return _closed_loops(recipe, inputs, family, perplexity, work, UNIFORM,
                         lambda s: uniform_structure(inputs.table, s),
                         lambda structure: magnitude_prune(inputs.dense, adapter, structure))


def layer_dropping(recipe: Recipe, inputs: Inputs, family: Any, perplexity: Perplexity, work: Path,
                   _: int) -> list[dict[str, Any]]:
    adapter = adapter_for(inputs.dense.config)
    influence = block_influence(inputs.dense, adapter, inputs.tokenizer, inputs.task, recipe.calibration.samples)
    progress(INFLUENCE)("block influence by layer: " + ", ".join(f"{value:.3f}" for value in influence))
    return _closed_loops(recipe, inputs, family, perplexity, work, INFLUENCE,
                         lambda s: influence_structure(inputs.table, influence, s),
                         lambda structure: remove_modules(inputs.dense, adapter, structure))


def no_obs(recipe: Recipe, inputs: Inputs, family: Any, perplexity: Perplexity, work: Path,
           _: int) -> list[dict[str, Any]]:
    adapter, verifier = adapter_for(inputs.dense.config), family.refs.verifier
    points = []
    for member in family.members:
        model = zipl.stitch(inputs.dense, adapter, family.database, member.final.structure, obs_update=False)
        check = measure(model, verifier, work / f"no-obs-{member.target:g}x.onnx")
        points.append(point(member.target, check, perplexity(model)))
    return points


def _closed_loops(recipe: Recipe, inputs: Inputs, family: Any, perplexity: Perplexity, work: Path, method: str,
                  solve: Callable[[float], Any], build: Callable[[Any], PreTrainedModel]) -> list[dict[str, Any]]:
    verifier = family.refs.verifier
    members = [closed_loop(target, solve, build, lambda model, path: export_checked(model, path, verifier.env),
                           inputs.table, verifier, recipe.verification, work / f"{method}-{target:g}x",
                           progress(f"{method} {target:g}x")) for target in recipe.targets]
    return [closed_loop_point(member, perplexity) for member in members]


METHOD_RUNS = {GRADUAL: gradual, UNIFORM: uniform, INFLUENCE: layer_dropping, NO_OBS: no_obs}


def closed_loop_point(member: Member, perplexity: Perplexity) -> dict[str, Any]:
    return {**point(member.target, member.final.check, perplexity(member.model)), "rounds": len(member.rounds),
            "structure": member.final.structure.to_json()}


def point(target: float | None, check: Any, value: float) -> dict[str, Any]:
    return {"target_speedup": target, "measured_speedup": round(check.speedup.value, 4),
            "ci": [round(check.speedup.ci_low, 4), round(check.speedup.ci_high, 4)], "perplexity": value}


def ziplm_ahead(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every other method's point against ZipLM one-shot's perplexity at the same measured speedup (linear between
    ZipLM's points, the dense model at 1x being the first); ahead = lower perplexity."""
    ziplm = sorted([(1.0, result["dense_perplexity"])]
                   + [(p["measured_speedup"], p["perplexity"]) for p in result["methods"][ZIPLM]])
    speedups, values = np.array([s for s, _ in ziplm]), np.array([v for _, v in ziplm])
    verdicts = []
    for method, points in result["methods"].items():
        if method in (ZIPLM, GRADUAL):
            continue
        for p in points:
            inside = speedups[0] <= p["measured_speedup"] <= speedups[-1]
            at = float(np.interp(p["measured_speedup"], speedups, values)) if inside else None
            verdicts.append({"method": method, "measured_speedup": p["measured_speedup"],
                             "perplexity": p["perplexity"], "ziplm_perplexity": at,
                             "ziplm_ahead": None if at is None else at < p["perplexity"]})
    return verdicts


def markdown(result: dict[str, Any]) -> str:
    methods, dense = result["methods"], result["dense_perplexity"]
    lines = ["# Perplexity vs measured prefill speedup: SmolLM2-135M on Shakespeare", "",
             f"{environment_line(result['runtime'])}. Every speedup is measured end to end against the dense "
             "model, paired and interleaved (median of per-round ratios). Perplexity on the same "
             f"{result['validation_blocks']} validation blocks of {result['block_tokens']} tokens for every model. "
             f"Dense perplexity {dense:.2f}; the largest reachable speedup is {result['max_reachable_speedup']:.2f}x "
             "(the embeddings and the language-model head stay). Reproduce: "
             f"`{COMMAND}`, measured at commit {result['commit']}.", "",
             "![perplexity vs speedup](decoder_accuracy_vs_speedup.png)", "",
             "| target | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for index, target in enumerate(result["targets"]):
        cells = [_cell(points[index]) if index < len(points) else "" for points in methods.values()]
        lines.append(f"| {target:g}x | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: measured speedup: perplexity (lower is better)."]
    if GRADUAL in methods:
        lines.append(f"Gradual ZipLM distils each member for one pass over {result['distill_blocks']} train blocks "
                     "(next-token loss, logit KL, and 0.1 x hidden-state MSE; learning rate "
                     f"{result['distill_learning_rate']:g}): the CPU budget.")
    return "\n".join(lines + [""] + _verdict(ziplm_ahead(result), result) + [""])


def _cell(p: dict[str, Any]) -> str:
    return f"{p['measured_speedup']:.2f}x: {p['perplexity']:.2f}"


def _verdict(ahead: list[dict[str, Any]], result: dict[str, Any]) -> list[str]:
    compared = [v for v in ahead if v["ziplm_ahead"] is not None]
    behind = [v for v in compared if not v["ziplm_ahead"]]
    lines = [f"ZipLM one-shot is ahead at {len(compared) - len(behind)} of {len(compared)} baseline points inside its "
             "measured speedup range (its perplexity interpolated at the baseline's measured speedup)."]
    lines += [f"- not ahead: {v['method']} at {v['measured_speedup']:.2f}x, {v['perplexity']:.2f} vs ZipLM "
              f"{v['ziplm_perplexity']:.2f}" for v in behind]
    outside = [v for v in ahead if v["ziplm_ahead"] is None]
    if outside:
        lines.append("Outside ZipLM's measured range (not compared): " + ", ".join(
            f"{v['method']} {v['measured_speedup']:.2f}x ({v['perplexity']:.2f})" for v in outside) + ".")
    gradual_points = result["methods"].get(GRADUAL, [])
    at_one_and_half = [p for p in gradual_points if p["target_speedup"] == 1.5]
    if at_one_and_half:
        rise = at_one_and_half[0]["perplexity"] / result["dense_perplexity"] - 1
        lines.append(f"Gradual ZipLM at 1.5x: perplexity {at_one_and_half[0]['perplexity']:.2f}, {rise:+.1%} over "
                     "dense (goal: within +10%).")
    return lines


def plot(result: dict[str, Any]) -> Path:
    series = {method: [(1.0, result["dense_perplexity"])] + [(p["measured_speedup"], p["perplexity"]) for p in points]
              for method, points in result["methods"].items()}
    return plots.metric_vs_speedup(RESULTS / "decoder_accuracy_vs_speedup.png", series, result["dense_perplexity"],
                                   "perplexity", "SmolLM2-135M on Shakespeare: prefill, sequence 256")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.25, 1.5, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS,
                        help="ZipLM one-shot always runs (the others are measured beside its dense session)")
    parser.add_argument("--distill-blocks", type=int, default=200, help="train blocks gradual ZipLM distils on")
    parser.add_argument("--render", action="store_true", help="redraw markdown and plot from the saved JSON only")
    args = parser.parse_args()
    stored = RESULTS / "decoder_accuracy_vs_speedup.json"
    if args.render:
        result = json.loads(stored.read_text())
    else:
        result = run(sorted(args.targets), args.methods, args.distill_blocks)
        if stored.exists() and set(args.methods) != set(METHODS):  # keep the stored points of methods not rerun
            result["methods"] = {**json.loads(stored.read_text())["methods"], **result["methods"]}
    plot(result)
    write_results("decoder_accuracy_vs_speedup", {**result, "command": COMMAND}, markdown(result))


if __name__ == "__main__":
    main()
