"""Calibration: accumulate H = (2/n) sum x x^T of the inputs of every prunable projection (ALGORITHMS.md s. 1).

Forward hooks on each layer's attention output projection and FFN down projection see their inputs while N
calibration sequences of the task (encoded as the task encodes) run through the model; padded positions are left
out, so n counts real tokens only. Sums are kept in float64.

Hooks on each layer also record the energy of the residual stream around it (the mean squared norm per token of the
hidden states entering and leaving it): a module's output error is added to that stream, and the norm that the next
module reads divides it by the stream's scale, so the search weighs each module's error relative to it (stages.ziplm).

    calibration: {samples: 512}
"""

from __future__ import annotations

from collections.abc import Callable
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ziplm.errors import BadInputError
from ziplm.families import FamilyAdapter
from ziplm.families.base import weight_matrix
from ziplm.tasks import Task, batches


class CalibrationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int = Field(512, ge=1, description="calibration sequences (capped at the calibration split's size)")


@dataclass
class LayerHessians:
    """H of the attention output projection's input and of the FFN down projection's input, for one layer.

    None where the module was already removed (a pruned model calibrated again, as gradual ZipLM does)."""

    attention: torch.Tensor | None
    ffn: torch.Tensor | None
    tokens: int
    stream_in: float = 1.0  # mean squared norm per token of the hidden states entering the layer
    stream_out: float = 1.0  # ... and leaving it


class _HessianAccumulator:
    def __init__(self, width: int) -> None:
        self.sum = torch.zeros(width, width, dtype=torch.float64)
        self.tokens = 0
        self.token_mask: torch.Tensor | None = None  # [batch, seq] of the batch being run

    def hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        if self.token_mask is not None:
            x = x[self.token_mask.bool()]
        x = x.reshape(-1, x.shape[-1]).double()
        self.sum += x.T @ x
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return 2.0 / max(self.tokens, 1) * self.sum  # H = (2/n) sum x x^T


def collect_hessians(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, adapter: FamilyAdapter, task: Task,
                     settings: CalibrationSettings = CalibrationSettings(),
                     progress: Callable[[str], None] = print) -> list[LayerHessians]:
    """Run up to `settings.samples` of the task's calibration examples through the model; every layer's Hessians."""
    examples = list(task.calibration)[: settings.samples]
    if not examples:
        raise BadInputError("no calibration examples: give the task a calibration_fraction above 0")
    projections = [(adapter.attention_out_proj(layer) if kept.units else None,
                    adapter.ffn_out_proj(layer) if kept.ffn else None)
                   for layer, kept in zip(adapter.layers(model), adapter.structure(model.config).layers)]
    accumulators = [tuple(_HessianAccumulator(weight_matrix(proj).shape[1]) if proj else None for proj in pair)
                    for pair in projections]
    live = [(proj, acc) for pairs in zip(projections, accumulators) for proj, acc in zip(*pairs) if proj]
    streams = [_StreamEnergy() for _ in projections]
    handles = [proj.register_forward_pre_hook(acc.hook) for proj, acc in live]
    handles += [layer.register_forward_hook(stream.hook, with_kwargs=True)
                for layer, stream in zip(adapter.layers(model), streams)]
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches(examples, task.batch_size):
                encoded = task.encode(tokenizer, batch)
                for watcher in [acc for _, acc in live] + streams:
                    watcher.token_mask = encoded["attention_mask"]
                model(**encoded)
        tokens = max((acc.tokens for _, acc in live), default=0)
        progress(f"calibration: {len(examples)} samples, {tokens} tokens")
    finally:
        for handle in handles:
            handle.remove()
    return [LayerHessians(*(acc.hessian() if acc else None for acc in pair), tokens, *stream.energy())
            for pair, stream in zip(accumulators, streams)]


def hidden_states_around(args: tuple, kwargs: dict, output: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states entering and leaving a layer, as a forward hook (with_kwargs) sees its call."""
    entering = args[0] if args else kwargs["hidden_states"]
    return entering, output[0] if isinstance(output, tuple) else output


class _StreamEnergy:
    """Sums the squared norms of a layer's input and output hidden states over real tokens."""

    def __init__(self) -> None:
        self.sums, self.tokens = [0.0, 0.0], 0
        self.token_mask: torch.Tensor | None = None

    def hook(self, layer: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        entering, leaving = hidden_states_around(args, kwargs, output)
        real = self.token_mask.bool() if self.token_mask is not None else torch.ones(entering.shape[:2], dtype=bool)
        for index, hidden in enumerate((entering, leaving)):
            self.sums[index] += float(hidden[real].double().pow(2).sum())
        self.tokens += int(real.sum())

    def energy(self) -> tuple[float, float]:
        return self.sums[0] / max(self.tokens, 1), self.sums[1] / max(self.tokens, 1)


def save_hessians(hessians: list[LayerHessians], folder: Path) -> None:
    """folder/hessians.safetensors (one tensor per module still present) and folder/hessians.json (the layout)."""
    tensors = {f"{i}.{kind}": H.contiguous() for i, layer in enumerate(hessians)
               for kind, H in (("attention", layer.attention), ("ffn", layer.ffn)) if H is not None}
    save_file(tensors, str(folder / "hessians.safetensors"))
    (folder / "hessians.json").write_text(json.dumps({"tokens": [layer.tokens for layer in hessians],
                                                      "stream": [[layer.stream_in, layer.stream_out]
                                                                 for layer in hessians]}))


def load_hessians(folder: Path) -> list[LayerHessians]:
    tensors = load_file(str(folder / "hessians.safetensors"))
    layout = json.loads((folder / "hessians.json").read_text())
    return [LayerHessians(tensors.get(f"{i}.attention"), tensors.get(f"{i}.ffn"), n, *stream)
            for i, (n, stream) in enumerate(zip(layout["tokens"], layout["stream"]))]
