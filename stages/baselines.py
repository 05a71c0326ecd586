"""Baselines ZipLM is measured against.

Uniform magnitude pruning: the same number of attention units and the same FFN width in every layer, the kept
structures chosen by weight magnitude, no weight update. Its structure for a speedup target comes from the same
latency table, and it goes through the same closed loop, so both are compared at measured speedups.

Layer dropping: keep the first k layers whole and drop the rest (the structured step of the paper's compound
baseline). Its speedups are whatever k layers give, so it is measured at each k instead of solved for a target.

Layer dropping by block influence (ShortGPT, Men et al. 2024): remove whole layers (attention and FFN), those whose
output changes the residual stream least on calibration data first (influence = 1 - cosine between a layer's input
and output hidden states, over real tokens). As a structure it is solved for a target from the same latency table
(the number of layers whose predicted speedup is closest) and goes through the same closed loop.

Global magnitude pruning: the unstructured baseline for oBERT (ziplm.stages.obert), at the same sparsity.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ziplm.families import FamilyAdapter, LayerStructure, ModelStructure
from ziplm.families.base import record_structure, weight_matrix
from ziplm.stages.calibrate import hidden_states_around
from ziplm.stages.latency_table import LatencyTable
from ziplm.stages.masks import Masks, magnitude_masks
from ziplm.tasks import Task, batches


def uniform_structure(table: LatencyTable, speedup: float) -> ModelStructure:
    """The uniform structure (kept fraction f of units and FFN width) whose predicted speedup is closest."""
    shape = table.model_shape
    dense_ms = table.dense_ms()
    candidates = []
    for fraction in np.linspace(0.0, 1.0, 401):
        units = round(shape.num_units * fraction)
        width = min(table.ffn_levels, key=lambda w: abs(w - shape.ffn_size * fraction))
        structure = ModelStructure.uniform(shape, units, width)
        candidates.append((abs(dense_ms / table.predict_ms(structure) - speedup), structure))
    return min(candidates, key=lambda c: c[0])[1]


def magnitude_prune(dense: PreTrainedModel, adapter: FamilyAdapter, structure: ModelStructure) -> PreTrainedModel:
    """Keep, per layer, the attention units and FFN neurons with the largest weight norms."""
    model = copy.deepcopy(dense)
    shape = adapter.shape(model.config)
    for layer, layer_structure in zip(adapter.layers(model), structure.layers):
        out_proj = adapter.attention_out_proj(layer).weight.detach()
        unit_norms = torch.stack([out_proj[:, adapter.unit_columns(shape, u)].norm()
                                  for u in range(shape.num_units)])
        neuron_norms = torch.stack([_neuron_norm(adapter, layer, n) for n in range(shape.ffn_size)])
        adapter.shrink_attention(layer, shape, _largest(unit_norms, layer_structure.units))
        adapter.shrink_ffn(layer, _largest(neuron_norms, layer_structure.ffn))
    record_structure(model.config, structure)
    return model.eval()


@torch.no_grad()
def block_influence(model: PreTrainedModel, adapter: FamilyAdapter, tokenizer: PreTrainedTokenizerBase,
                    task: Task, samples: int) -> list[float]:
    """Each layer's block influence on up to `samples` of the task's calibration examples: 1 - the mean cosine
    similarity between the hidden states entering and leaving it, over real tokens."""
    examples = list(task.calibration)[:samples]
    sums, count = torch.zeros(len(adapter.layers(model))), 0
    states: dict[int, torch.Tensor] = {}

    def record(index: int) -> Callable[..., None]:
        def hook(layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            entering, leaving = hidden_states_around(args, kwargs, output)
            states[index] = F.cosine_similarity(entering, leaving, dim=-1)  # [batch, sequence]
        return hook

    handles = [layer.register_forward_hook(record(index), with_kwargs=True)
               for index, layer in enumerate(adapter.layers(model))]
    try:
        for batch in batches(examples, task.batch_size):
            encoded = task.encode(tokenizer, batch)
            model.eval()(**encoded)
            real = encoded["attention_mask"].bool()
            sums += torch.stack([states[i][real].sum() for i in range(len(sums))])
            count += int(real.sum())
    finally:
        for handle in handles:
            handle.remove()
    return (1.0 - sums / count).tolist()


def influence_structure(table: LatencyTable, influence: Sequence[float], speedup: float) -> ModelStructure:
    """The layers of least influence removed whole, as many as give the predicted speedup closest to `speedup`."""
    shape = table.model_shape
    order = sorted(range(shape.num_layers), key=lambda i: influence[i])
    candidates = []
    for dropped in range(shape.num_layers):
        gone = set(order[:dropped])
        structure = ModelStructure(tuple(LayerStructure(0, 0) if i in gone else LayerStructure(shape.num_units,
                                                                                               shape.ffn_size)
                                         for i in range(shape.num_layers)))
        candidates.append((abs(table.dense_ms() / table.predict_ms(structure) - speedup), structure))
    return min(candidates, key=lambda c: c[0])[1]


def remove_modules(dense: PreTrainedModel, adapter: FamilyAdapter, structure: ModelStructure) -> PreTrainedModel:
    """A copy of `dense` whose layers lose the modules `structure` removes (a structure of whole modules, kept or
    removed, as `influence_structure` gives)."""
    model = copy.deepcopy(dense)
    adapter.apply_structure(model, structure)
    return model.eval()


def drop_layers(dense: PreTrainedModel, adapter: FamilyAdapter, keep: int) -> PreTrainedModel:
    """A copy of `dense` with only its first `keep` layers (the config's layer count follows)."""
    num_layers = adapter.shape(dense.config).num_layers
    if not 1 <= keep <= num_layers:
        raise ValueError(f"can keep 1..{num_layers} layers, not {keep}")
    model = copy.deepcopy(dense)
    del adapter.layers(model)[keep:]
    model.config.num_hidden_layers = keep
    return model.eval()


@torch.no_grad()
def _neuron_norm(adapter: FamilyAdapter, layer: nn.Module, neuron: int) -> torch.Tensor:
    """The norm of a neuron's rows of the up (and gate) projection times that of its column of the down projection."""
    parts = adapter.ffn_unit(layer, neuron)
    rows = [weight_matrix(p.module)[list(p.indices)] for p in parts if p.side == "out"]
    columns = [weight_matrix(p.module)[:, list(p.indices)] for p in parts if p.side == "in"]
    return torch.cat(rows).norm() * torch.cat(columns, dim=1).norm()


def _largest(scores: torch.Tensor, count: int) -> list[int]:
    return sorted(torch.topk(scores, count).indices.tolist()) if count else []


def global_magnitude_masks(model: nn.Module, adapter: FamilyAdapter, sparsity: float) -> Masks:
    """Unstructured baseline: prune the `sparsity` fraction of prunable weights with the smallest |w|, one threshold
    across all layers, no weight update. Returns the masks; the model is untouched (apply with `apply_masks`)."""
    return magnitude_masks(adapter.prunable_linears(model), sparsity)
