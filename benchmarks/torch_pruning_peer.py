"""Torch-Pruning (the `peers` extra: `pip install -e ".[peers]"`) as a user would run it on one of our models:
its dependency-graph pruner (`MetaPruner`) with head pruning, one importance criterion, global or uniform ranking.

What is ours here is only the harness around the released library: which modules it may touch (the attention heads
and FFN neurons of every layer, as ZipLM; the residual width, the embeddings and the head stay whole), the
calibration examples its data-driven criteria read, and the search for the pruning ratio that lands at a speedup.
Torch-Pruning takes a ratio, not a latency: the ratio is found by bisection on our latency table's prediction for the
structure the pruner would leave (it prunes nothing while asked), then the model is pruned once at that ratio and
its speedup measured like every other file.
"""

from __future__ import annotations

import copy
from importlib import metadata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ziplm.families import FamilyAdapter, LayerStructure, ModelStructure, adapter_for
from ziplm.families.base import record_structure
from ziplm.stages.latency_table import LatencyTable
from ziplm.tasks import Task, batches
from ziplm.tasks.base import Example

VERSION = metadata.version("torch-pruning")  # its __version__ string lags the release
IMPORTANCES = ("magnitude", "taylor", "hessian")
SCOPES = ("global", "uniform")
BISECTION_STEPS = 14


@dataclass(frozen=True)
class PeerConfig:
    importance: str  # one of IMPORTANCES
    scope: str  # "global": heads and neurons ranked across layers; "uniform": the same fraction in every layer

    @property
    def name(self) -> str:
        return f"Torch-Pruning {self.importance} {self.scope}"


@dataclass
class Pruned:
    model: PreTrainedModel
    structure: ModelStructure
    ratio: float
    predicted_speedup: float


def configs() -> list[PeerConfig]:
    return [PeerConfig(importance, scope) for importance in IMPORTANCES for scope in SCOPES]


def prune_to_speedup(dense: PreTrainedModel, config: PeerConfig, target: float, table: LatencyTable, task: Task,
                     tokenizer: PreTrainedTokenizerBase, calibration: Sequence[Example],
                     example: dict[str, torch.Tensor]) -> Pruned:
    """A copy of `dense` pruned by Torch-Pruning at the ratio whose structure the table predicts closest to
    `target` (heads and FFN neurons pruned at the same ratio)."""
    model = copy.deepcopy(dense).eval()
    adapter = adapter_for(model.config)
    importance = _importance(config.importance, model, task, tokenizer, calibration)
    pruner = _pruner(model, adapter, importance, config.scope == "global", example)
    ratio = _bisect(lambda r: predicted_speedup(table, _planned_structure(pruner, model, adapter, r)), target)
    structure = _planned_structure(pruner, model, adapter, ratio)
    _set_ratio(pruner, ratio)
    pruner.step()
    for layer, kept in zip(adapter.layers(model), structure.layers):
        adapter.set_attention_counts(layer, kept.units)  # for families whose forward reads its head count
    record_structure(model.config, structure)
    return Pruned(model.eval(), structure, ratio, predicted_speedup(table, structure))


def predicted_speedup(table: LatencyTable, structure: ModelStructure) -> float:
    """The table's speedup for any FFN width (the table has steps of its group size: linear between them)."""
    ffn_ms = lambda width: float(np.interp(width, table.ffn_levels, table.ffn_ms))  # noqa: E731
    raw = table.base_ms + sum(table.attention_cost(layer.units) + ffn_ms(layer.ffn) for layer in structure.layers)
    return table.dense_ms() / table.correction.apply(raw)


def _importance(name: str, model: PreTrainedModel, task: Task, tokenizer: PreTrainedTokenizerBase,
                calibration: Sequence[Example]) -> tp.importance.Importance:
    """The criterion, with the gradients it reads taken on the calibration examples (the task's loss)."""
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":  # first order: |w * dL/dw| from the gradient summed over the calibration batches
        model.zero_grad()
        for batch in batches(calibration, task.batch_size):
            _loss(model, task, tokenizer, batch).backward()
        return tp.importance.GroupTaylorImportance()
    if name == "hessian":  # Optimal Brain Damage: per-example squared gradients, as its documentation calls it
        importance = tp.importance.GroupHessianImportance()
        for example in calibration:
            model.zero_grad()
            _loss(model, task, tokenizer, [example]).backward()
            importance.accumulate_grad(model)
        return importance
    raise ValueError(f"unknown Torch-Pruning importance {name!r}: one of {', '.join(IMPORTANCES)}")


def _loss(model: PreTrainedModel, task: Task, tokenizer: PreTrainedTokenizerBase,
          batch: Sequence[Example]) -> torch.Tensor:
    return task.batch_loss(model, task.encode(tokenizer, batch), task.targets(batch, torch.device("cpu")))


def _pruner(model: PreTrainedModel, adapter: FamilyAdapter, importance: tp.importance.Importance,
            global_pruning: bool, example: dict[str, torch.Tensor]) -> tp.pruner.MetaPruner:
    """Heads (whole, by head_pruning_ratio) and FFN neurons (by pruning_ratio) of every layer; nothing else."""
    shape = adapter.shape(model.config)
    layers = list(adapter.layers(model))
    num_heads = {}
    for layer in layers:
        query, *kv = adapter.attention_in_projs(layer)
        num_heads[query] = shape.num_heads
        num_heads.update({proj: shape.num_kv_heads for proj in kv})
    inside = {id(linear) for layer in layers for linear in adapter.layer_linears(layer)}
    ignored = [m for m in model.modules() if isinstance(m, nn.Embedding)
               or (isinstance(m, nn.Linear) and id(m) not in inside)]
    return tp.pruner.MetaPruner(model, example, importance=importance, global_pruning=global_pruning,
                                pruning_ratio=0.0, head_pruning_ratio=0.0, num_heads=num_heads, prune_num_heads=True,
                                prune_head_dims=False, ignored_layers=ignored, out_channel_groups={},
                                in_channel_groups={}, output_transform=lambda output: output.logits.sum())


def _set_ratio(pruner: tp.pruner.MetaPruner, ratio: float) -> None:
    """One pruning step at `ratio` for heads and neurons alike (the pruner's schedule for one step)."""
    pruner.per_step_pruning_ratio = pruner.iterative_pruning_ratio_scheduler(ratio, 1)
    pruner.per_step_head_pruning_ratio = pruner.iterative_pruning_ratio_scheduler(ratio, 1)
    pruner.reset()


def _planned_structure(pruner: tp.pruner.MetaPruner, model: PreTrainedModel, adapter: FamilyAdapter,
                       ratio: float) -> ModelStructure:
    """What the pruner would keep at `ratio`: its groups asked for, not pruned (asking counts the heads as removed
    in the pruner's books, which are put back)."""
    _set_ratio(pruner, ratio)
    books = dict(pruner.num_heads), dict(pruner.out_channel_groups)
    removed: dict[int, set[int]] = {}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            if pruner.DG.is_out_channel_pruning_fn(dep.handler):
                removed.setdefault(id(dep.target.module), set()).update(int(i) for i in idxs)
    for book, saved in zip((pruner.num_heads, pruner.out_channel_groups), books):
        book.clear()
        book.update(saved)
    pruner.reset()
    shape = adapter.shape(model.config)
    kept = lambda linear: linear.out_features - len(removed.get(id(linear), ()))  # noqa: E731
    return ModelStructure(tuple(
        LayerStructure(kept(adapter.attention_in_projs(layer)[-1]) // shape.head_dim,
                       kept(adapter.ffn_in_projs(layer)[0]))
        for layer in adapter.layers(model)))


def _bisect(speedup: Callable[[float], float], target: float) -> float:
    """The ratio in [0, 1) whose speedup is closest to `target` (speedup grows with the ratio)."""
    low, high = 0.0, 0.99
    tried = {}
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        tried[middle] = speedup(middle)
        low, high = (middle, high) if tried[middle] < target else (low, middle)
    return min(tried, key=lambda ratio: abs(tried[ratio] - target))
