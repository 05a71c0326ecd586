"""One-shot ZipLM against uniform magnitude pruning on MiniLM + MR, at measured speedups (issue: one-shot ZipLM).

Both methods go through the same closed loop against the same dense session, so each is measured within the
tolerance of the same targets; accuracy is on the same validation examples (paired).

    python -m benchmarks.oneshot_accuracy [--targets 1.5 2 2.5 3]

writes benchmarks/results/oneshot_accuracy.md and .json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import progress, write_results
from ziplm.families import adapter_for
from ziplm.pipeline.cache import StageCache
from ziplm.pipeline.recipe import load_recipe
from ziplm.pipeline.report import environment_line, runtime_json
from ziplm.pipeline.run import build_family, prepare_inputs
from ziplm.stages.baselines import magnitude_prune, uniform_structure
from ziplm.stages.finetune import evaluate_accuracy
from ziplm.stages.verify import Member, closed_loop

COMMAND = "python -m benchmarks.oneshot_accuracy"


def run(targets: list[float]) -> dict[str, Any]:
    recipe = load_recipe("minilm_mr").model_copy(update={"targets": targets})
    inputs = prepare_inputs(recipe, progress)
    dense, tokenizer, table, validation = inputs.dense, inputs.tokenizer, inputs.table, inputs.task.validation
    adapter = adapter_for(dense.config)
    accuracy = lambda model: evaluate_accuracy(model, tokenizer, validation, recipe.teacher.max_length)  # noqa: E731
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ziplm-oneshot-") as work:
        family = build_family(recipe, inputs, StageCache(Path(work) / "stages", progress))  # measured afresh
        ziplm_seconds = time.perf_counter() - start
        uniform = [closed_loop(target, lambda s: uniform_structure(table, s),
                               lambda structure: magnitude_prune(dense, adapter, structure), table, family.verifier,
                               Path(work) / f"uniform-{target:g}x", progress(f"uniform {target:g}x"))
                   for target in recipe.targets]
    dense_accuracy = accuracy(dense)
    rows = [_row(z, u, accuracy, dense_accuracy) for z, u in zip(family.members, uniform)]
    return {"runtime": runtime_json(table), "dense_accuracy": dense_accuracy, "validation_size": len(validation),
            "calibration_samples": min(recipe.calibration.samples, len(inputs.task.calibration)),
            "ziplm_family_seconds": round(ziplm_seconds, 1), "rows": rows, "command": COMMAND}


def _row(ziplm: Member, uniform: Member, accuracy, dense_accuracy: float) -> dict[str, Any]:
    z_acc, u_acc = accuracy(ziplm.model), accuracy(uniform.model)
    return {
        "target_speedup": ziplm.target,
        "ziplm": {"measured_speedup": round(ziplm.final.check.speedup.value, 4), "accuracy": z_acc,
                  "recovery": round(z_acc / dense_accuracy, 4), "structure": ziplm.final.structure.to_json()},
        "uniform_magnitude": {"measured_speedup": round(uniform.final.check.speedup.value, 4), "accuracy": u_acc,
                              "recovery": round(u_acc / dense_accuracy, 4),
                              "structure": uniform.final.structure.to_json()},
    }


def markdown(result: dict[str, Any]) -> str:
    env = result["runtime"]
    lines = [
        "# One-shot ZipLM vs uniform magnitude pruning (MiniLM fine-tuned on MR)",
        "",
        f"{environment_line(env)}. Dense accuracy {result['dense_accuracy']:.4f} on "
        f"{result['validation_size']} validation examples (one figure carries about +-2 points of sampling noise at "
        f"this size; both methods are scored on the same examples). {result['calibration_samples']} calibration "
        "samples. Speedups measured end to end against the dense model, interleaved, after the closed loop.",
        "",
        "| target | ZipLM speedup | ZipLM accuracy | recovery | uniform speedup | uniform accuracy | recovery |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        z, u = r["ziplm"], r["uniform_magnitude"]
        lines.append(f"| {r['target_speedup']:g}x | {z['measured_speedup']:.3f}x | {z['accuracy']:.4f} "
                     f"| {z['recovery']:.1%} | {u['measured_speedup']:.3f}x | {u['accuracy']:.4f} "
                     f"| {u['recovery']:.1%} |")
    lines += ["", f"The ZipLM family (calibration, database, every member's closed loop) took "
              f"{result['ziplm_family_seconds']:.0f} s with the teacher and table cached. Reproduce: "
              f"`{result['command']}`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2, 2.5, 3])
    result = run(parser.parse_args().targets)
    write_results("oneshot_accuracy", result, markdown(result))


if __name__ == "__main__":
    main()
