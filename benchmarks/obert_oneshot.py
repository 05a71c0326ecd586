"""oBERT one-shot against global magnitude pruning on the dense MiniLM MR teacher (issue 4: oBERT).

Both prune the same prunable weights (attention Q/K/V/O and FFN of every layer) to the same global sparsity with
no fine-tuning afterwards; accuracy is on the same validation examples (paired). oBERT runs with a single Fisher
(k=1) and with k recomputations along the cubic ramp. Accuracy only: nothing here is timed against the dense model.

    python -m benchmarks.obert_oneshot [--sparsities 0.5 0.7 0.8] [--recomputations 1 4] [--gradients 256]

writes benchmarks/results/obert_oneshot.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

from transformers import AutoTokenizer

from benchmarks.common import progress, stage_cache, write_results
from ziplm.families import adapter_for
from ziplm.families.loading import load_model
from ziplm.pipeline.recipe import load_recipe
from ziplm.stages.baselines import global_magnitude_masks
from ziplm.stages.finetune import finetune_teacher
from ziplm.tasks import load_task
from ziplm.stages.masks import apply_masks, masks_sparsity
from ziplm.stages.obert import OBertSettings, oneshot

COMMAND = "python -m benchmarks.obert_oneshot"
VALIDATION_SIZE = 500


def run(sparsities: list[float], recomputations: list[int], gradients: int) -> dict[str, Any]:
    recipe = load_recipe("minilm_mr")
    task = load_task(recipe.task)
    teacher = finetune_teacher(recipe.model, task, recipe.teacher, stages=stage_cache())
    dense = load_model(str(teacher.path))
    tokenizer = AutoTokenizer.from_pretrained(str(teacher.path))
    adapter = adapter_for(dense.config)
    validation = task.validation[:VALIDATION_SIZE]
    accuracy = lambda model: task.evaluate(model, tokenizer, validation).value  # noqa: E731
    dense_accuracy = accuracy(dense)
    rows = []
    for sparsity in sparsities:
        magnitude = copy.deepcopy(dense)
        apply_masks(magnitude, global_magnitude_masks(magnitude, adapter, sparsity))
        row: dict[str, Any] = {"sparsity": sparsity, "global_magnitude": {"accuracy": accuracy(magnitude)}}
        for k in recomputations:
            settings = OBertSettings(sparsity=sparsity, gradients=gradients)
            model, start = copy.deepcopy(dense), time.perf_counter()
            masks = oneshot(model, tokenizer, task, settings, progress(f"oBERT {sparsity:g} k={k}"), recomputations=k)
            row[f"obert_k{k}"] = {"accuracy": accuracy(model), "seconds": round(time.perf_counter() - start, 1),
                                  "achieved_sparsity": round(masks_sparsity(masks), 6)}
        rows.append(row)
        progress("result")(str(row))
    defaults = OBertSettings()
    return {"model": recipe.model, "task": task.name, "dense_accuracy": dense_accuracy,
            "validation_size": len(validation), "gradient_examples": len(task.train),
            "prunable_weights": sum(linear.weight.numel() for linear in adapter.prunable_linears(dense).values()),
            "settings": {"gradients": gradients, "gradient_batch_size": defaults.gradient_batch_size,
                         "block_size": defaults.block_size, "damping": defaults.damping, "chunk": defaults.chunk},
            "recomputations": recomputations, "rows": rows,
            "command": f"{COMMAND} --sparsities {' '.join(f'{s:g}' for s in sparsities)} --recomputations "
                       f"{' '.join(map(str, recomputations))} --gradients {gradients}"}


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    ks = result["recomputations"]
    lines = [
        "# oBERT one-shot vs global magnitude pruning (MiniLM fine-tuned on MR, no fine-tuning after pruning)",
        "",
        f"Dense accuracy {result['dense_accuracy']:.4f} on {result['validation_size']} validation examples (one "
        "figure carries about +-2 points of sampling noise at this size; every method is scored on the same "
        f"examples). Sparsity is over the {result['prunable_weights']:,} prunable weights (attention Q/K/V/O and "
        f"FFN). oBERT: m={s['gradients']} gradients of {s['gradient_batch_size']} training examples each, "
        f"B={s['block_size']}, lambda={s['damping']:g}; k = Fisher recomputations along the cubic ramp.",
        "",
        "| sparsity | global magnitude | " + " | ".join(f"oBERT k={k} | seconds" for k in ks) + " |",
        "|---|---|" + "---|---|" * len(ks),
    ]
    for r in result["rows"]:
        cells = [f"{r['sparsity']:.0%}", f"{r['global_magnitude']['accuracy']:.4f}"]
        for k in ks:
            cells += [f"{r[f'obert_k{k}']['accuracy']:.4f}", f"{r[f'obert_k{k}']['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Reproduce: `{result['command']}` (2 shared CPU cores; seconds include the gradients).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8])
    parser.add_argument("--recomputations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--gradients", type=int, default=OBertSettings().gradients)
    args = parser.parse_args()
    result = run(args.sparsities, args.recomputations, args.gradients)
    write_results("obert_oneshot", result, markdown(result))


if __name__ == "__main__":
    main()
