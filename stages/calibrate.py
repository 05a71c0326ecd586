"""Calibration: accumulate H = (2/n) sum x x^T of the inputs of every prunable projection (ALGORITHMS.md s. 1).

Forward hooks on each layer's attention output projection and FFN down projection see their inputs while N
calibration sequences of the task (encoded as the task encodes) run through the model; padded positions are left
out, so n counts real tokens only. Sums are kept in float64.

Hooks on each layer also record the energy of the residual stream around it (the mean squared norm per token of the
hidden states entering and leaving it): a module's output error is added to that stream, and the norm that the next
module reads divides it by the stream's scale, so the search weighs each module's error relative to it (stages.ziplm).

    calibration: {samples: 512}

`whole_model_hessians` runs each batch through the whole model (the pipeline's calibration); for a model that does not
fit one worker, `layer_sequential_hessians` runs one layer at a time on the whole calibration set, reading each
layer's weights only while it runs (families.loading.load_skeleton), with the same Hessians.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ziplm.errors import BadInputError
from ziplm.families import FamilyAdapter, LayerStructure
from ziplm.families.base import weight_matrix
from ziplm.families.loading import CheckpointLayers
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
        self.sum: torch.Tensor | None = torch.zeros(width, width, dtype=torch.float64)
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
        """H = (2/n) sum x x^T, made in place of the sum (no second copy of a layer's largest tensor); once."""
        H, self.sum = self.sum.mul_(2.0 / max(self.tokens, 1)), None
        return H


def collect_hessians(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, adapter: FamilyAdapter, task: Task,
                     settings: CalibrationSettings = CalibrationSettings(),
                     progress: Callable[[str], None] = print) -> list[LayerHessians]:
    """Run up to `settings.samples` of the task's calibration examples through the model; every layer's Hessians."""
    return whole_model_hessians(model, adapter, calibration_batches(tokenizer, task, settings), progress)


def calibration_batches(tokenizer: PreTrainedTokenizerBase, task: Task,
                        settings: CalibrationSettings = CalibrationSettings()) -> list[dict[str, torch.Tensor]]:
    """Up to `settings.samples` of the task's calibration examples, encoded as the task encodes them, in batches."""
    examples = list(task.calibration)[: settings.samples]
    if not examples:
        raise BadInputError("no calibration examples: give the task a calibration_fraction above 0")
    return [task.encode(tokenizer, batch) for batch in batches(examples, task.batch_size)]


Batches = list[dict[str, torch.Tensor]]


def whole_model_hessians(model: PreTrainedModel, adapter: FamilyAdapter, encoded: Batches,
                         progress: Callable[[str], None] = print) -> list[LayerHessians]:
    """Every layer's Hessians, each batch run through the whole model."""
    watches = [_LayerWatch(adapter, layer, kept) for layer, kept in
               zip(adapter.layers(model), adapter.structure(model.config).layers)]
    handles = [handle for watch in watches for handle in watch.attach()]
    model.eval()
    try:
        with torch.no_grad():
            for batch in encoded:
                for watch in watches:
                    watch.token_mask(batch["attention_mask"])
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    progress(f"calibration: {sum(len(batch['input_ids']) for batch in encoded)} samples, "
             f"{max(watch.tokens for watch in watches)} tokens")
    return [watch.hessians() for watch in watches]


def layer_sequential_hessians(model: PreTrainedModel, adapter: FamilyAdapter, encoded: Batches,
                              progress: Callable[[str], None] = print,
                              weights: CheckpointLayers | None = None) -> Iterator[LayerHessians]:
    """Every layer's Hessians, one layer at a time (llm-compressor's sequential pipeline): the calibration set's hidden
    states entering layer 0 are held, each layer runs on all of them and hands its outputs to the next. Each layer's
    Hessians are yielded as soon as it ran (save_hessians writes them as they come).

    With `weights` (a skeleton from families.loading.load_skeleton) each layer's weights are in memory only while it
    runs, so the peak is the weights outside the layers, one layer, its Hessians, and the hidden states of the
    calibration set at one layer (docs/scale-out.md). The Hessians equal whole_model_hessians's: each layer sees the
    same inputs."""
    hidden, calls = _layer_calls(model, adapter, encoded)
    model.eval()
    for index, (layer, kept) in enumerate(zip(adapter.layers(model), adapter.structure(model.config).layers)):
        with (weights.loaded(layer) if weights else nullcontext()), torch.no_grad():
            watch = _LayerWatch(adapter, layer, kept)
            handles = watch.attach()
            try:
                for number, (batch, (args, kwargs)) in enumerate(zip(encoded, calls[index])):
                    watch.token_mask(batch["attention_mask"])
                    hidden[number] = _hidden(layer(hidden[number], *args, **kwargs))
            finally:
                for handle in handles:
                    handle.remove()
        progress(f"calibration: layer {index + 1}/{len(calls)} ({watch.tokens} tokens)")
        yield watch.hessians()


class _Stop(Exception):
    """Ends the pass that records the layers' calls, once the last layer was called."""


LayerCall = tuple[tuple, dict[str, Any]]  # the arguments of a layer's call after the hidden states


def _layer_calls(model: PreTrainedModel, adapter: FamilyAdapter,
                 encoded: Batches) -> tuple[list[torch.Tensor], list[list[LayerCall]]]:
    """The hidden states entering layer 0 for each batch, and how the model calls each layer for each batch (the
    other arguments per layer, per batch).

    One pass per batch with every layer's forward replaced by a recorder that hands its hidden states on unchanged, so
    no layer computes (a skeleton's layers have no weights); what the model gives each layer besides the hidden states
    (masks, position embeddings, per layer where layers differ) is built by the model itself, as in a real pass. Only
    layer 0's hidden states are real. The model's cache is off: it would keep every layer's keys and values."""
    layers = list(adapter.layers(model))
    entering: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = [[] for _ in layers]

    def recorder(index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not args:  # hidden states given by name: first, as the layer's own signature has them
                args = (kwargs.pop("hidden_states"),)
            if index == 0:
                entering.append(args[0])
            calls[index].append((args[1:], kwargs))
            if index == len(layers) - 1:
                raise _Stop
            return args[0]
        return forward

    use_cache = getattr(model.config, "use_cache", None)
    try:
        model.config.use_cache = False
        for index, layer in enumerate(layers):
            layer.forward = recorder(index)
        with torch.no_grad():
            for batch in encoded:
                try:
                    model(**batch)
                except _Stop:
                    pass
    finally:
        for layer in layers:
            del layer.forward
        model.config.use_cache = use_cache
    return entering, calls


def _hidden(output: object) -> torch.Tensor:
    """A layer's output hidden states (some layers return a tuple that starts with them)."""
    return output[0] if isinstance(output, tuple) else output


class _LayerWatch:
    """One layer's hooks: the inputs of its attention output projection and FFN down projection (None where the
    module was removed), and the energy of the residual stream around it."""

    def __init__(self, adapter: FamilyAdapter, layer: nn.Module, kept: LayerStructure) -> None:
        self.layer = layer
        self.projections = (adapter.attention_out_proj(layer) if kept.units else None,
                            adapter.ffn_out_proj(layer) if kept.ffn else None)
        self.accumulators = [_HessianAccumulator(weight_matrix(proj).shape[1]) if proj else None
                             for proj in self.projections]
        self.stream = _StreamEnergy()

    def attach(self) -> list[RemovableHandle]:
        handles = [proj.register_forward_pre_hook(acc.hook)
                   for proj, acc in zip(self.projections, self.accumulators) if proj]
        return handles + [self.layer.register_forward_hook(self.stream.hook, with_kwargs=True)]

    def token_mask(self, mask: torch.Tensor) -> None:
        for watcher in [acc for acc in self.accumulators if acc] + [self.stream]:
            watcher.token_mask = mask

    @property
    def tokens(self) -> int:
        """The real tokens the layer saw (counted by its stream hook, also where both modules were removed)."""
        return self.stream.tokens

    def hessians(self) -> LayerHessians:
        return LayerHessians(*(acc.hessian() if acc else None for acc in self.accumulators), self.tokens,
                             *self.stream.energy())


def hidden_states_around(args: tuple, kwargs: dict, output: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states entering and leaving a layer, as a forward hook (with_kwargs) sees its call."""
    entering = args[0] if args else kwargs["hidden_states"]
    return entering, _hidden(output)


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


def save_hessians(hessians: Iterable[LayerHessians], folder: Path) -> None:
    """folder/hessians-LAYER.safetensors (its modules still present), written as each layer comes (a large model's
    Hessians, float64 and d_ffn^2 per layer, outweigh its weights: layer_sequential_hessians never holds them all),
    and folder/hessians.json (the layout)."""
    tokens, streams = [], []
    for index, layer in enumerate(hessians):
        save_file({kind: H.contiguous() for kind, H in (("attention", layer.attention), ("ffn", layer.ffn))
                   if H is not None}, str(folder / f"hessians-{index}.safetensors"))
        tokens.append(layer.tokens)
        streams.append([layer.stream_in, layer.stream_out])
    (folder / "hessians.json").write_text(json.dumps({"tokens": tokens, "stream": streams}))


def load_hessians(folder: Path) -> list[LayerHessians]:
    layout = json.loads((folder / "hessians.json").read_text())
    layers = []
    for index, (tokens, stream) in enumerate(zip(layout["tokens"], layout["stream"])):
        tensors = load_file(str(folder / f"hessians-{index}.safetensors"))
        layers.append(LayerHessians(tensors.get("attention"), tensors.get("ffn"), tokens, *stream))
    return layers
