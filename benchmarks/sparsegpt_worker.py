"""llm-compressor's SparseGPT on a sequence classifier, as released: the worker that benchmarks/sparsegpt.py starts
in llm-compressor's own environment. It imports llmcompressor and its stack, never ziplm.

    python sparsegpt_worker.py --model DIR --calibration FILE.npz --sparsity 0.5 --out DIR [--pipeline NAME]

Loads the classifier in DIR (AutoModelForSequenceClassification), makes a `datasets.Dataset` of the calibration
examples (the npz's input_ids, attention_mask and token_type_ids where present, each row cut to its attention mask
so that every example is its own unpadded sequence), runs `llmcompressor.oneshot` with a SparseGPTModifier on the six
Linear layers of every encoder layer, and writes OUT/model.safetensors (the whole state dict, zeros where pruned) and
OUT/record.json (versions, settings, seconds, achieved sparsity, the pipeline that ran). Everything not named here
is llm-compressor's default: block size, dampening, unstructured mask "0:0", batch size 1, data collator.

The packages only the peer environment has (llmcompressor, compressed-tensors, datasets, loguru) are imported where
they are used, so that the core environment's test of every benchmark module can import this one and parse its
command line.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification

# The six Linear layers of every encoder layer (BERT's names; re.match, so anchored at the end by $)
TARGETS = [r"re:.*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
           r"|intermediate\.dense|output\.dense)$"]
IGNORE = [r"re:.*pooler", r"re:.*classifier"]
SEQUENTIAL_TARGETS = ["BertLayer"]
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
SEED = 0


def calibration_dataset(npz: Path) -> Any:
    """The calibration examples of `npz` (padded rows) as a `datasets.Dataset`, each cut to the tokens its attention
    mask covers."""
    from datasets import Dataset
    arrays = np.load(npz)
    lengths = arrays["attention_mask"].sum(axis=1)
    for row, length in zip(arrays["attention_mask"], lengths):
        if not row[:length].all():
            raise ValueError(f"{npz}: an attention mask that is not right-padded: {row.tolist()}")
    columns = {name: [row[:n].tolist() for row, n in zip(arrays[name], lengths)]
               for name in INPUT_NAMES if name in arrays.files}
    return Dataset.from_dict(columns)


def pruned_sparsity(model: torch.nn.Module, names: list[str]) -> tuple[float, int]:
    """The fraction of zeros over the weights of the named Linear layers, and their number of weights."""
    modules = dict(model.named_modules())
    zeros = sum(int((modules[name].weight == 0).sum()) for name in names)
    total = sum(modules[name].weight.numel() for name in names)
    return zeros / total, total


def target_names(model: torch.nn.Module) -> list[str]:
    """The names of the Linear layers TARGETS matches (as compressed-tensors matches them) and IGNORE does not."""
    from compressed_tensors.utils import match_named_modules
    return [name for name, _ in match_named_modules(model, TARGETS, IGNORE)]


def pipeline_log() -> list[str]:
    """A list that collects llm-compressor's log lines that name the calibration pipeline it runs."""
    from loguru import logger
    lines: list[str] = []
    logger.add(lambda message: lines.append(message.record["message"]),
               filter=lambda record: "Pipeline" in record["message"] or "pipeline" in record["message"])
    return lines


def prune(model: torch.nn.Module, dataset: Any, sparsity: float, pipeline: str | None) -> tuple[Any, list[str]]:
    """`llmcompressor.oneshot` with a SparseGPTModifier at `sparsity` on `model` (in place), calibrated on every
    example of `dataset`; the modifier and the log lines that name the pipeline that ran."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    modifier = SparseGPTModifier(sparsity=sparsity, targets=TARGETS, ignore=IGNORE)
    options: dict[str, Any] = {} if pipeline is None else {"pipeline": pipeline}
    log = pipeline_log()
    oneshot(model=model, dataset=dataset, recipe=modifier, num_calibration_samples=len(dataset),
            sequential_targets=SEQUENTIAL_TARGETS, **options)
    return modifier, log


def versions() -> dict[str, str]:
    """The installed versions of the packages that make the result."""
    return {package: version(package) for package in
            ("llmcompressor", "compressed-tensors", "transformers", "torch", "datasets")}


def run(model_dir: Path, npz: Path, sparsity: float, out: Path, pipeline: str | None) -> dict[str, Any]:
    """SparseGPT at `sparsity` on the classifier in `model_dir`, calibrated on `npz`; writes out/model.safetensors
    and returns the record."""
    torch.manual_seed(SEED)  # the calibration sampler's shuffle
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    dataset = calibration_dataset(npz)
    names = target_names(model)
    dense_sparsity, total = pruned_sparsity(model, names)
    start = time.perf_counter()
    modifier, log = prune(model, dataset, sparsity, pipeline)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, out / "model.safetensors")
    settings = modifier.model_dump(mode="json", include={"sparsity", "block_size", "dampening_frac", "mask_structure",
                                                         "targets", "ignore", "preserve_sparsity_mask",
                                                         "sparsity_profile"})
    return {"versions": versions(), "modifier": settings,
            "oneshot": {"num_calibration_samples": len(dataset), "sequential_targets": SEQUENTIAL_TARGETS,
                        "pipeline_requested": pipeline or "default (independent)", "seed": SEED},
            "pipeline_log": log, "calibration_tokens": int(sum(len(row) for row in dataset["input_ids"])),
            "seconds": round(seconds, 2), "pruned_layers": names, "pruned_weights": total,
            "sparsity_before": dense_sparsity, "achieved_sparsity": pruned_sparsity(model, names)[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--sparsity", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pipeline", default=None, help="llm-compressor's calibration pipeline (default: its own)")
    args = parser.parse_args()
    record = run(args.model, args.calibration, args.sparsity, args.out, args.pipeline)
    (args.out / "record.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
