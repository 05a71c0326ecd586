"""The chain with fine-tuning on MiniLM + MR (issue: the compound chain), each variant a real `ziplm run`.

1. gradual vs one-shot: ZipLM at 2x and 3x, one-shot (post-training) against gradual (each target pruned from the
   previous member, distilled from the teacher after each step).
2. compound: the built-in recipe minilm_mr_compound (ZipLM on INT8 blocks for 4x over the dense FP32 model,
   distillation, gradual oBERT to 80%, INT8 QAT), its INT8 file measured against the dense FP32 model (the target)
   and the dense INT8 model, paired.

    python -m benchmarks.compound [--skip-gradual] [--skip-compound]

writes benchmarks/results/compound.md and .json; a skipped part keeps the figures of the run that last measured it
(each part records the commit it was measured at). The stages are cached like any `ziplm run` (a second run reuses
them); the numbers are those of the run that built them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, progress, write_results
from ziplm.pipeline.chain import ChainSettings
from ziplm.pipeline.recipe import Recipe, load_recipe
from ziplm.pipeline.report import environment_line
from ziplm.pipeline.run import run_recipe
from ziplm.stages.distill import DistillSettings

COMMAND = "python -m benchmarks.compound"
RESULT_KEYS = ("name", "target_speedup", "measured_speedup", "speedup_ci", "speedup_reference", "speedup_vs_dense_fp32",
               "speedup_vs_dense_int8", "metric", "structure", "sparsity", "passed", "stages", "file_bytes", "rounds")


def run_variant(recipe: Recipe) -> dict[str, Any]:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ziplm-compound-") as out:
        report = run_recipe(recipe, Path(out), progress)
    return {"commit": _commit(), "recipe": recipe.model_dump(mode="json"), "runtime": report["runtime"],
            "dense": report["dense"],
            "table_scale": report["table_scale"],
            "members": [{key: member[key] for key in RESULT_KEYS} for member in report["members"]],
            "seconds": round(time.perf_counter() - start, 1)}


def _commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return head.stdout.strip() or "unknown"


def gradual_vs_oneshot() -> dict[str, Any]:
    oneshot = load_recipe("minilm_mr").model_copy(update={"targets": [2.0, 3.0]})
    gradual = oneshot.model_copy(update={"name": "minilm-mr-gradual",
                                         "chain": ChainSettings(gradual=True, distillation=DistillSettings())})
    return {"oneshot": run_variant(oneshot), "gradual": run_variant(gradual)}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# The chain with fine-tuning: gradual ZipLM, and the compound INT8 artifact (MiniLM + MR)", ""]
    if "gradual_vs_oneshot" in result:
        lines += _gradual_markdown(result["gradual_vs_oneshot"])
    if "compound" in result:
        lines += _compound_markdown(result["compound"])
    return "\n".join(lines + [f"Reproduce: `{COMMAND}`.", ""])


def _gradual_markdown(result: dict[str, Any]) -> list[str]:
    oneshot, gradual = result["oneshot"], result["gradual"]
    dense = oneshot["dense"]["metric"]["value"]
    epochs = gradual["recipe"]["chain"]["distillation"]["epochs"]
    lines = ["## Gradual ZipLM with distillation vs one-shot ZipLM", "",
             f"{environment_line(oneshot['runtime'])}. Dense teacher accuracy {dense:.4f} on 500 validation examples. "
             f"Gradual: each target pruned from the previous member, then distilled ({epochs} epochs, l2 = l3 = 0.5, "
             "T = 2); one-shot: pruned from the teacher, no fine-tuning.", "",
             "| target | one-shot speedup | one-shot accuracy | gradual speedup | gradual accuracy "
             "| gradual rounds (closed loop / fine-tuned) | gradual within 3% |",
             "|---|---|---|---|---|---|---|"]
    for o, g in zip(oneshot["members"], gradual["members"]):
        finished = sum(r["stage"] == "finished" for r in g["rounds"])
        lines.append(f"| {o['target_speedup']:g}x | {o['measured_speedup']:.3f}x | {o['metric']['value']:.4f} "
                     f"| {g['measured_speedup']:.3f}x | {g['metric']['value']:.4f} "
                     f"| {len(g['rounds']) - finished} / {finished} | {'yes' if g['passed'] else 'NO'} |")
    return lines + ["", f"Wall-clock with the teacher and table cached: one-shot {oneshot['seconds']:.0f} s, gradual "
                    f"{gradual['seconds']:.0f} s. Measured at commit {gradual['commit']}.", ""]


def _compound_markdown(result: dict[str, Any]) -> list[str]:
    dense = result["dense"]["metric"]["value"]
    lines = ["## Compound: ZipLM (INT8 table) + distillation + gradual oBERT 80% + INT8 QAT, 4x over dense FP32", "",
             f"{environment_line(result['runtime'])}. The target is the speedup over the dense FP32 model; the INT8 "
             f"table was solved for the target divided by {result['table_scale']:.3f} (the dense INT8 model's "
             "measured speedup over the dense FP32 one), and the closed loop measured every round against dense "
             "FP32. The speedup over the dense INT8 model is the same file measured against it, paired, in the same "
             "run: that is the part the structure gives.", "",
             "| target | vs dense FP32 (95% CI) | vs dense INT8 (95% CI) | accuracy: torch fake-quant / ONNX INT8 "
             "| teacher | sparsity | closed-loop rounds | passed |",
             "|---|---|---|---|---|---|---|---|"]
    for m in result["members"]:
        fp32, int8 = m["speedup_vs_dense_fp32"], m["speedup_vs_dense_int8"]
        lines.append(f"| {m['target_speedup']:g}x | {_speedup(fp32)} | {_speedup(int8)} | {m['metric']['value']:.4f}"
                     f" / {m['metric']['onnx_value']:.4f} | {dense:.4f} | {m['sparsity']:.1%} "
                     f"| {sum(r['stage'] == 'closed loop' for r in m['rounds'])} | {'yes' if m['passed'] else 'NO'} |")
    lines += ["", "Rounds (speedups over dense FP32):", "", "| stage | solved for | predicted | measured | heads | FFN |",
              "|---|---|---|---|---|---|"]
    for m in result["members"]:
        for r in m["rounds"]:
            heads = " ".join(str(u) for u in r["structure"]["units"])
            lines.append(f"| {r['stage']} | {r['solved_for']:.3f}x | {r['predicted_speedup']:.3f}x "
                         f"| {r['measured_speedup']:.3f}x | {heads} | {' '.join(map(str, r['structure']['ffn']))} |")
    return lines + ["", f"Stages: {' -> '.join(result['members'][0]['stages'])}. Wall-clock with the teacher cached: "
                    f"{result['seconds']:.0f} s. Measured at commit {result['commit']}.", ""]


def _speedup(check: dict[str, Any]) -> str:
    ci = check["speedup_ci"]
    return f"{check['measured_speedup']:.3f}x ({ci['ci_low']:.3f}-{ci['ci_high']:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-gradual", action="store_true")
    parser.add_argument("--skip-compound", action="store_true")
    args = parser.parse_args()
    previous = RESULTS / "compound.json"  # a skipped part keeps its figures from the last run, marked as such
    result: dict[str, Any] = json.loads(previous.read_text()) if previous.exists() else {}
    result["command"] = COMMAND
    if not args.skip_compound:
        result["compound"] = run_variant(load_recipe("minilm_mr_compound"))
    if not args.skip_gradual:
        result["gradual_vs_oneshot"] = gradual_vs_oneshot()
    RESULTS.mkdir(exist_ok=True)
    write_results("compound", result, markdown(result))


if __name__ == "__main__":
    main()
