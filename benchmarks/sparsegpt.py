"""llm-compressor's SparseGPT, run as released, on the dense MiniLM MR teacher: the peer that oBERT's unstructured
pruning is compared with.

llmcompressor 0.14.0.1 pins transformers<=5.17.0, compressed-tensors==0.19.0 and torch<=2.14.0,>=2.10.0, which the
core environment (transformers 5.23.0) cannot hold, so it runs in an environment of its own (`LLMCOMPRESSOR`, under
the engines root beside DeepSparse's) as a subprocess: benchmarks/sparsegpt_worker.py, which imports nothing of
ziplm. This module imports nothing of llmcompressor: it hands the worker the teacher's folder and the calibration
examples (an .npz of the task's own tokenization), and reads back the pruned weights (plain dense tensors, zeros where
pruned) and the worker's JSON record.

`python -m benchmarks.peers --setup` installs the peer environment (about a minute, 1.5 GB); benchmarks.peers runs
SparseGPT beside oBERT.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from ziplm.errors import ZipLMError
from ziplm.runtimes.worker import EngineEnvironment
from ziplm.tasks.base import Example, Task

# torch==2.13.0 is named so that pip takes the CPU build on this machine's disk, not a CUDA build from the index
LLMCOMPRESSOR = EngineEnvironment("llmcompressor", ("torch==2.13.0", "llmcompressor==0.14.0.1"), ("3.11",),
                                  install_hint="`python -m benchmarks.peers --setup`")
WORKER_SCRIPT = Path(__file__).with_name("sparsegpt_worker.py")
LOG_TAIL = 3000


class SparseGPTError(ZipLMError):
    """The SparseGPT worker failed, or its weights do not fit the teacher; the message carries the details."""


def install(progress: Callable[[str], None] = print) -> Path:
    """Create llm-compressor's environment (engines root/llmcompressor) unless it is installed; its path."""
    return LLMCOMPRESSOR.install(progress)


def calibration_arrays(task: Task, tokenizer: PreTrainedTokenizerBase,
                       examples: Sequence[Example]) -> dict[str, np.ndarray]:
    """The examples tokenized as the task tokenizes them (truncated to its max_length, padded to the longest),
    as int64 arrays by input name."""
    return {name: tensor.numpy().astype(np.int64) for name, tensor in task.encode(tokenizer, examples).items()}


def sparsegpt(model_dir: Path, calibration: dict[str, np.ndarray], sparsity: float, out: Path,
              pipeline: str | None = None, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """SparseGPT (llm-compressor, in its own environment) at `sparsity` on the classifier in `model_dir`, calibrated
    on `calibration` (written to out/calibration.npz). Leaves out/model.safetensors and out/record.json and returns
    the record, with `wall_seconds` (the whole subprocess) added; SparseGPTError with the tail of its log on failure."""
    python = LLMCOMPRESSOR.require()
    out.mkdir(parents=True, exist_ok=True)
    npz, log = out / "calibration.npz", out / "worker.log"
    np.savez(npz, **calibration)
    command = [str(python), str(WORKER_SCRIPT), "--model", str(model_dir), "--calibration", str(npz),
               "--sparsity", str(sparsity), "--out", str(out)] + (["--pipeline", pipeline] if pipeline else [])
    progress(f"sparsity {sparsity:g}: running the worker in {LLMCOMPRESSOR.path}, log {log}")
    start = time.perf_counter()
    with log.open("w") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SparseGPTError(f"the SparseGPT worker failed (exit {done.returncode}); its log ({log}) ends:\n"
                             f"{log.read_text(errors='replace')[-LOG_TAIL:]}")
    record = json.loads((out / "record.json").read_text())
    return record | {"wall_seconds": round(time.perf_counter() - start, 2)}


def load_pruned(model: torch.nn.Module, out: Path) -> tuple[torch.nn.Module, dict[str, list[str]]]:
    """A copy of `model` with the pruned weights of out/model.safetensors (the layers out/record.json names) loaded,
    and which other keys of the file differ from the model's (`missing`, `extra`, `changed`: values that differ, which
    are not loaded). SparseGPTError if a pruned weight is absent or of another shape."""
    pruned = {f"{name}.weight" for name in json.loads((out / "record.json").read_text())["pruned_layers"]}
    weights, own = load_file(str(out / "model.safetensors")), model.state_dict()
    bad = sorted(key for key in pruned if key not in weights or key not in own or weights[key].shape != own[key].shape)
    if bad or not pruned:
        raise SparseGPTError(f"{out / 'model.safetensors'} does not fit the model: pruned weights missing or of "
                             f"another shape: {', '.join(bad) or 'none named in record.json'}")
    copied = copy.deepcopy(model)
    copied.load_state_dict({key: weights[key] for key in pruned}, strict=False)
    differences = {"missing": sorted(set(own) - set(weights)), "extra": sorted(set(weights) - set(own)),
                   "changed": sorted(key for key in set(own) & set(weights) - pruned
                                     if not torch.equal(own[key], weights[key].to(own[key].dtype)))}
    return copied, differences
