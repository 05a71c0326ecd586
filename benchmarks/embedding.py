"""MiniLM as a sentence encoder (the built-in recipe minilm_embedding): ZipLM one-shot against uniform magnitude
pruning, each at its MEASURED speedup, scored by cosine similarity to the dense embeddings and by probe accuracy.

Both methods run the same closed loop against one dense ONNX session (the embedding files, pooling included), on
the same 500 held-out MR sentences; no fine-tuning after pruning. ZipLM is compared with uniform at the uniform
member's measured speedup (ZipLM's points interpolated linearly, the dense model at 1x being the first).

    python -m benchmarks.embedding [--targets 1.5 2 3]

writes benchmarks/results/embedding.md, .json, embedding_cosine_to_dense.png and embedding_probe_accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS, head_commit, progress, stage_cache, write_results
from ziplm.cache import StageCache
from ziplm.families import adapter_for
from ziplm.pipeline import plots
from ziplm.pipeline.recipe import load_recipe
from ziplm.pipeline.report import environment_line, runtime_json
from ziplm.pipeline.run import build_family, prepare_inputs
from ziplm.stages.baselines import magnitude_prune, uniform_structure
from ziplm.stages.closed_loop import Member, closed_loop
from ziplm.stages.export import export_checked
from ziplm.tasks import Metric

COMMAND = "python -m benchmarks.embedding"
RECIPE = "minilm_embedding"
ZIPLM, UNIFORM = "ZipLM one-shot", "uniform magnitude"
SCORES = ("cosine_to_dense", "probe_accuracy")


def run(targets: list[float]) -> dict[str, Any]:
    recipe = load_recipe(RECIPE).model_copy(update={"targets": targets})
    inputs = prepare_inputs(recipe, stage_cache())
    dense, tokenizer, table, task = inputs.dense, inputs.tokenizer, inputs.table, inputs.task
    adapter = adapter_for(dense.config)
    with tempfile.TemporaryDirectory(prefix="ziplm-embedding-") as tmp:
        work = Path(tmp)
        family = build_family(recipe, inputs, StageCache(work / "stages", progress))  # measured afresh
        verifier = family.refs.verifier
        uniform = [closed_loop(target, lambda s: uniform_structure(table, s),
                               lambda structure: magnitude_prune(dense, adapter, structure),
                               lambda model, path: export_checked(task.served(model), path, verifier.env), table,
                               verifier, recipe.verification, work / f"uniform-{target:g}x",
                               progress(f"{UNIFORM} {target:g}x")) for target in targets]
        points = {ZIPLM: [point(m, task.evaluate(m.model, tokenizer)) for m in family.members],
                  UNIFORM: [point(m, task.evaluate(m.model, tokenizer)) for m in uniform]}
    dense_metric = task.evaluate(dense, tokenizer)
    return {"recipe": recipe.name, "runtime": runtime_json(table), "validation_size": dense_metric.size,
            "targets": targets, "dense": scores(dense_metric), "methods": points, "command": COMMAND,
            "commit": head_commit()}


def scores(metric: Metric) -> dict[str, float]:
    return {"cosine_to_dense": metric.value, **metric.extra}


def point(member: Member, metric: Metric) -> dict[str, Any]:
    check = member.final.check
    return {"target_speedup": member.target, "measured_speedup": round(check.speedup.value, 4),
            "ci": [round(check.speedup.ci_low, 4), round(check.speedup.ci_high, 4)], "rounds": len(member.rounds),
            "structure": member.final.structure.to_json(), **scores(metric)}


def ziplm_at(result: dict[str, Any], speedup: float, score: str) -> float | None:
    """ZipLM's score at a measured speedup, linear between its points (the dense model at 1x); None outside them."""
    known = sorted([(1.0, result["dense"][score])] + [(p["measured_speedup"], p[score])
                                                       for p in result["methods"][ZIPLM]])
    speedups = [s for s, _ in known]
    if not speedups[0] <= speedup <= speedups[-1]:
        return None
    return float(np.interp(speedup, speedups, [v for _, v in known]))


def markdown(result: dict[str, Any]) -> str:
    dense, methods = result["dense"], result["methods"]
    lines = ["# MiniLM as a sentence encoder: ZipLM one-shot vs uniform pruning at measured speedups", "",
             f"{environment_line(result['runtime'])}. all-MiniLM-L6-v2 used as it is (mean pooling, normalised), "
             f"recipe `{result['recipe']}`; scored on {result['validation_size']} held-out MR sentences: "
             "cosine similarity of each member's embedding to the dense model's (mean), and the accuracy of a "
             "logistic-regression probe on the frozen embeddings (5-fold cross-validated; the dense model's is "
             f"{dense['probe_accuracy']:.4f}, and one such figure carries about +-2 points of sampling noise). Every "
             "speedup is measured end to end against the same dense session, interleaved; no fine-tuning after "
             "pruning.", "",
             "![cosine to dense vs speedup](embedding_cosine_to_dense.png)",
             "![probe accuracy vs speedup](embedding_probe_accuracy.png)", "",
             "| method | target | measured speedup | rounds | cosine to dense | probe accuracy | vs dense |",
             "|---|---|---|---|---|---|---|"]
    for method, points in methods.items():
        lines += [f"| {method} | {p['target_speedup']:g}x | {p['measured_speedup']:.3f}x [{p['ci'][0]:.3f}, "
                  f"{p['ci'][1]:.3f}] | {p['rounds']} | {p['cosine_to_dense']:.4f} | {p['probe_accuracy']:.4f} | "
                  f"{100 * (p['probe_accuracy'] - dense['probe_accuracy']):+.1f} points |" for p in points]
    lines += ["", *verdict(result), "", f"Reproduce: `{result['command']}`. Measured at commit {result['commit']}.",
              ""]
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> list[str]:
    """The issue's goals, from this run's numbers: cosine >= 0.95 and probe within 1 point of dense at the lowest
    target; ZipLM ahead of uniform at every uniform point inside ZipLM's measured range."""
    first, dense = result["methods"][ZIPLM][0], result["dense"]
    lines = [f"At {first['target_speedup']:g}x ZipLM keeps cosine {first['cosine_to_dense']:.4f} (goal >= 0.95) and "
             f"probe accuracy {100 * (first['probe_accuracy'] - dense['probe_accuracy']):+.1f} points from dense "
             "(goal: within 1 point)."]
    for p in result["methods"][UNIFORM]:
        at = {score: ziplm_at(result, p["measured_speedup"], score) for score in SCORES}
        if at["cosine_to_dense"] is None:
            lines.append(f"- uniform at {p['measured_speedup']:.2f}x lies outside ZipLM's measured range: not "
                         "compared")
            continue
        lines.append(f"- uniform at {p['measured_speedup']:.2f}x: cosine {p['cosine_to_dense']:.4f} vs ZipLM "
                     f"{at['cosine_to_dense']:.4f}, probe {p['probe_accuracy']:.4f} vs ZipLM "
                     f"{at['probe_accuracy']:.4f}: ZipLM "
                     + ("ahead on both" if all(at[s] > p[s] for s in SCORES) else
                        "ahead on " + (", ".join(s for s in SCORES if at[s] > p[s]) or "neither")))
    return lines


def plot(result: dict[str, Any]) -> None:
    for score in SCORES:
        series = {method: [(1.0, result["dense"][score])] + [(p["measured_speedup"], p[score]) for p in points]
                  for method, points in result["methods"].items()}
        plots.metric_vs_speedup(RESULTS / f"embedding_{score}.png", series, result["dense"][score], score,
                                f"MiniLM sentence encoder on MR: {score}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2, 3])
    parser.add_argument("--render", action="store_true", help="redraw markdown and plots from the saved JSON only")
    args = parser.parse_args()
    result = json.loads((RESULTS / "embedding.json").read_text()) if args.render else run(sorted(args.targets))
    plot(result)
    write_results("embedding", result, markdown(result))


if __name__ == "__main__":
    main()
