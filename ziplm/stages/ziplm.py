"""ZipLM one-shot structured pruning: the per-module OBS database, the search, and stitching a member.

Orchestration around the pure math in obs.py and search.py:
1. `build_database`: for every layer's attention output projection (units of head_dim columns) and FFN down
   projection (neurons in groups of G), the greedy OBS path: which structure goes at each step, the error after
   each step, and the updated weights at every level of the latency table.
2. `solve`: the DP over all modules for one speedup target, with the time budget from the corrected table.
3. `stitch`: the teacher with each module shrunk to its chosen level, with that level's OBS-updated weights.

    ziplm: {damping_frac: 0.01, error: reconstruction, buckets: 10000}
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel

from ziplm.families import FamilyAdapter, LayerStructure, ModelStructure
from ziplm.families.base import record_structure
from ziplm.runtimes.latency_table import LatencyTable
from ziplm.stages import obs
from ziplm.stages.calibrate import LayerHessians
from ziplm.stages.search import dp_solve, module_budget

Progress = Callable[[str], None]


class ZipLMSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    damping_frac: float = Field(0.01, gt=0.0, description="lambda = damping_frac * mean(diag H)")
    error: Literal["reconstruction", "saliency"] = Field(
        "reconstruction", description="layer error the search minimises: measured output error, or summed rho")
    buckets: int = Field(10_000, ge=100, description="time buckets of the dynamic program")


@dataclass
class ModuleDatabase:
    """One module's greedy OBS path. Level index i of the table = i structures kept."""

    layer: int
    kind: Literal["attention", "ffn"]
    groups: torch.Tensor  # [structures, columns per structure]
    path: obs.ObsPath

    @property
    def size(self) -> int:
        return len(self.groups)

    def error(self, measure: str) -> np.ndarray:
        """Error at every level index 0..size (index = structures kept)."""
        along_path = self.path.reconstruction if measure == "reconstruction" else self.path.saliency
        return np.asarray(along_path[::-1])

    def kept(self, level: int) -> list[int]:
        """Indices of the structures kept at a level, in their original order."""
        return sorted(set(range(self.size)) - set(self.path.order[: self.size - level]))

    def weights(self, level: int) -> torch.Tensor:
        """The OBS-updated weights at a level (all columns; the removed ones zero)."""
        return obs.weights_after(self.path, self.size - level)


@dataclass
class Database:
    modules: list[ModuleDatabase]  # attention and FFN of layer 0, then of layer 1, ...
    settings: ZipLMSettings
    group_size: int

    def times(self, table: LatencyTable) -> list[np.ndarray]:
        return [np.asarray(table.attention_ms if m.kind == "attention" else table.ffn_ms) for m in self.modules]

    def errors(self) -> list[np.ndarray]:
        return [m.error(self.settings.error) for m in self.modules]

    def level(self, module: ModuleDatabase, layer: LayerStructure) -> int:
        """A module's level index (structures kept) in a layer structure."""
        return layer.units if module.kind == "attention" else layer.ffn // self.group_size


def build_database(model: PreTrainedModel, adapter: FamilyAdapter, hessians: list[LayerHessians],
                   group_size: int, settings: ZipLMSettings = ZipLMSettings(),
                   progress: Progress = print) -> Database:
    """The greedy OBS path of every prunable module (ALGORITHMS.md section 1)."""
    shape = adapter.shape(model.config)
    modules = []
    for index, (layer, layer_hessians) in enumerate(zip(adapter.layers(model), hessians)):
        W_attention = adapter.attention_out_proj(layer).weight.detach()
        W_ffn = adapter.ffn_out_proj(layer).weight.detach()
        attention_groups = obs.column_groups(shape.num_units, shape.heads_per_unit * shape.head_dim)
        ffn_groups = obs.saliency_groups(W_ffn, layer_hessians.ffn, group_size, settings.damping_frac)
        for kind, W, H, groups in (("attention", W_attention, layer_hessians.attention, attention_groups),
                                   ("ffn", W_ffn, layer_hessians.ffn, ffn_groups)):
            modules.append(ModuleDatabase(index, kind, groups, obs.greedy_path(W, H, groups, settings.damping_frac)))
        progress(f"database: layer {index + 1}/{shape.num_layers} "
                 f"({modules[-2].path.dead_columns + modules[-1].path.dead_columns} dead columns)")
    return Database(modules, settings, group_size)


def solve(database: Database, table: LatencyTable, speedup: float) -> ModelStructure:
    """Levels of every module for one speedup target (raises UnreachableTargetError beyond the table's reach)."""
    levels = dp_solve(database.times(table), database.errors(), module_budget(table, speedup),
                      database.settings.buckets)
    return structure_from_levels(database, levels)


def structure_from_levels(database: Database, levels: list[int]) -> ModelStructure:
    pairs = zip(levels[0::2], levels[1::2])  # modules alternate attention, FFN per layer
    return ModelStructure(tuple(LayerStructure(units, ffn_groups * database.group_size) for units, ffn_groups in pairs))


def predicted_error(database: Database, structure: ModelStructure) -> float:
    """The summed module errors the search minimised, for a structure."""
    return sum(float(m.error(database.settings.error)[database.level(m, structure.layers[m.layer])])
               for m in database.modules)


def stitch(teacher: PreTrainedModel, adapter: FamilyAdapter, database: Database, structure: ModelStructure,
           obs_update: bool = True) -> PreTrainedModel:
    """A copy of the teacher shrunk to `structure`, with the OBS-updated weights of the kept columns.

    `obs_update=False` keeps the teacher's own weights of the kept columns (the ablation without the update).
    """
    model = copy.deepcopy(teacher)
    shape = adapter.shape(model.config)
    layers = adapter.layers(model)
    for module in database.modules:
        level = database.level(module, structure.layers[module.layer])
        if level == module.size:
            continue
        layer, kept = layers[module.layer], module.kept(level)
        if module.kind == "attention":
            columns = module.groups[kept].flatten()  # the kept units' columns, in the order the units are kept
            adapter.shrink_attention(layer, shape, kept)
        else:
            columns = module.groups[kept].flatten().sort().values
            adapter.shrink_ffn(layer, columns.tolist())
        if kept and obs_update:  # a removed module has no projection left to update
            projection = adapter.attention_out_proj(layer) if module.kind == "attention" else adapter.ffn_out_proj(layer)
            with torch.no_grad():
                projection.weight.copy_(module.weights(level)[:, columns].to(projection.weight.dtype))
    record_structure(model.config, structure)
    return model.eval()
