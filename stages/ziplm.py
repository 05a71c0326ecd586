"""ZipLM one-shot structured pruning: the per-module OBS database, the search, and stitching a member.

Orchestration around the pure math in obs.py and search.py:
1. `build_database`: for every layer's attention output projection (units of head_dim columns) and FFN down
   projection (neurons in groups of G), the greedy OBS path: which structure goes at each step, the error after
   each step, and the updated weights at every level of the latency table.
2. `solve`: the DP over all modules for one speedup target, with the time budget from the corrected table.
3. `stitch`: the teacher with each module shrunk to its chosen level, with that level's OBS-updated weights.

    ziplm: {damping_frac: 0.01, gradual: false}

The search minimises the summed layer-output reconstruction errors measured along each greedy path (ALGORITHMS.md
section 1: the better of the two errors a path records), each relative to the energy of the residual stream the
module's output is added to (attention: the stream entering its layer; FFN: the stream leaving it). The norm the next
module reads divides an error by that stream's scale, which differs by orders of magnitude between the layers of a
decoder with massive activations (SmolLM2: a mean squared norm of 8 entering layer 0, 2e6 from layer 12 on); the
absolute errors would cut the first layers, whose errors look small and are not.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from ziplm.errors import BadInputError
from ziplm.families import FamilyAdapter, LayerStructure, ModelStructure
from ziplm.families.base import record_structure, set_weight_matrix, weight_matrix
from ziplm.stages import obs
from ziplm.stages.calibrate import LayerHessians
from ziplm.stages.latency_table import LatencyTable
from ziplm.stages.search import dp_solve

Progress = Callable[[str], None]


class ZipLMSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    damping_frac: float = Field(0.01, gt=0.0, description="lambda = damping_frac * mean(diag H)")
    gradual: bool = Field(False, description="targets in increasing order, each pruned from the previous member "
                                             "(after its chain's fine-tuning), calibrated and searched again")


@dataclass
class ModuleDatabase:
    """One module's greedy OBS path. Level index i of the table = i structures kept."""

    layer: int
    kind: Literal["attention", "ffn"]
    groups: torch.Tensor  # [structures, columns per structure]; no rows when the module is already removed
    path: obs.ObsPath | None  # None when the module is already removed
    stream: float = 1.0  # energy of the residual stream the module's output is added to (the module docstring)

    @property
    def size(self) -> int:
        return len(self.groups)

    def error(self) -> np.ndarray:
        """The reconstruction error at every level index 0..size (index = structures kept), relative to the energy of
        the residual stream it is added to."""
        if self.path is None:
            return np.zeros(1)
        return np.asarray(self.path.reconstruction[::-1]) / self.stream

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
        """Each module's cost at its level indices 0..size (a pruned model's modules reach only their current size;
        FFN level i is width i * G, which holds because G divides the FFN width)."""
        return [np.asarray((table.attention_ms if m.kind == "attention" else table.ffn_ms)[: m.size + 1])
                for m in self.modules]

    def errors(self) -> list[np.ndarray]:
        return [m.error() for m in self.modules]

    def level(self, module: ModuleDatabase, layer: LayerStructure) -> int:
        """A module's level index (structures kept) in a layer structure."""
        return layer.units if module.kind == "attention" else layer.ffn // self.group_size


DATABASE_TENSORS, DATABASE_LAYOUT = "database.safetensors", "database.json"
PATH_TENSORS = ("W0", "A", "R")


def save_database(database: Database, folder: Path) -> None:
    """folder/database.safetensors (every module's groups and OBS path tensors) and folder/database.json (the rest)."""
    tensors, modules = {}, []
    for index, module in enumerate(database.modules):
        tensors[f"{index}.groups"] = module.groups.contiguous()
        path = module.path
        if path is not None:
            tensors |= {f"{index}.{name}": getattr(path, name).contiguous() for name in PATH_TENSORS}
        modules.append({"layer": module.layer, "kind": module.kind, "stream": module.stream,
                        "path": None if path is None else {
                            "order": path.order, "saliency": path.saliency, "reconstruction": path.reconstruction,
                            "dead_columns": path.dead_columns, "damping": path.damping}})
    save_file(tensors, str(folder / DATABASE_TENSORS))
    layout = {"modules": modules, "settings": database.settings.model_dump(), "group_size": database.group_size}
    (folder / DATABASE_LAYOUT).write_text(json.dumps(layout))


def load_database(folder: Path) -> Database:
    tensors = load_file(str(folder / DATABASE_TENSORS))
    layout = json.loads((folder / DATABASE_LAYOUT).read_text())
    modules = []
    for index, module in enumerate(layout["modules"]):
        path = module["path"]
        obs_path = None if path is None else obs.ObsPath(
            path["order"], path["saliency"], path["reconstruction"], path["dead_columns"], path["damping"],
            *(tensors[f"{index}.{name}"] for name in PATH_TENSORS))
        modules.append(ModuleDatabase(module["layer"], module["kind"], tensors[f"{index}.groups"], obs_path,
                                      module["stream"]))
    return Database(modules, ZipLMSettings(**layout["settings"]), layout["group_size"])


@dataclass
class ModuleJob:
    """Everything one module's OBS pass reads (W, H, its structures' columns): passes are independent of each other,
    so they can run anywhere (`build_database`'s `run_passes`)."""

    layer: int
    kind: Literal["attention", "ffn"]
    W: torch.Tensor | None  # None when the module is already removed
    H: torch.Tensor | None
    groups: torch.Tensor
    damping_frac: float
    stream: float


RunPasses = Callable[[Callable[[ModuleJob], ModuleDatabase], list[ModuleJob]], list[ModuleDatabase]]


def build_database(model: PreTrainedModel, adapter: FamilyAdapter, hessians: list[LayerHessians],
                   group_size: int, settings: ZipLMSettings = ZipLMSettings(),
                   progress: Progress = print, run_passes: RunPasses | None = None) -> Database:
    """The greedy OBS path of every prunable module (ALGORITHMS.md section 1), each module's pass run by
    `run_passes` (default: here, one after another; runtimes.fleet.run_passes: as Ray tasks, with the same result).

    A pruned model (gradual ZipLM) starts each path from what it keeps now; a removed module gets an empty one."""
    jobs = module_jobs(model, adapter, hessians, group_size, settings)
    if run_passes is not None:
        return Database(run_passes(module_database, jobs), settings, group_size)
    modules = []
    for job in jobs:
        modules.append(module_database(job))
        if job.kind == "ffn":
            dead = sum(m.path.dead_columns for m in modules[-2:] if m.path)
            progress(f"database: layer {job.layer + 1}/{len(hessians)} ({dead} dead columns)")
    return Database(modules, settings, group_size)


def module_jobs(model: PreTrainedModel, adapter: FamilyAdapter, hessians: list[LayerHessians], group_size: int,
                settings: ZipLMSettings) -> list[ModuleJob]:
    """The attention and FFN pass of every layer, in order."""
    shape = adapter.shape(model.config)
    unit_width = shape.heads_per_unit * shape.head_dim
    jobs = []
    current = adapter.structure(model.config).layers
    for index, (layer, H, kept) in enumerate(zip(adapter.layers(model), hessians, current)):
        W_attention = weight_matrix(adapter.attention_out_proj(layer)).detach() if kept.units else None
        jobs.append(ModuleJob(index, "attention", W_attention, H.attention, obs.column_groups(kept.units, unit_width),
                              settings.damping_frac, H.stream_in))
        W_ffn = weight_matrix(adapter.ffn_out_proj(layer)).detach() if kept.ffn else None
        ffn_groups = (obs.saliency_groups(W_ffn, H.ffn, group_size, settings.damping_frac) if kept.ffn
                      else torch.zeros(0, group_size, dtype=torch.long))
        jobs.append(ModuleJob(index, "ffn", W_ffn, H.ffn, ffn_groups, settings.damping_frac, H.stream_out))
    return jobs


def module_database(job: ModuleJob) -> ModuleDatabase:
    """One module's greedy OBS path."""
    if job.W is None:
        return ModuleDatabase(job.layer, job.kind, job.groups, None, job.stream)
    try:
        path = obs.greedy_path(job.W, job.H, job.groups, job.damping_frac)
    except obs.HessianNotPositiveDefinite as error:
        raise BadInputError(f"layer {job.layer} {job.kind}: {error}") from error
    return ModuleDatabase(job.layer, job.kind, job.groups, path, job.stream)


def solve(database: Database, table: LatencyTable, speedup: float) -> ModelStructure:
    """Levels of every module for one speedup target (raises UnreachableTargetError beyond the table's reach)."""
    levels = dp_solve(database.times(table), database.errors(), table.module_budget(speedup))
    return structure_from_levels(database, levels)


def structure_from_levels(database: Database, levels: list[int]) -> ModelStructure:
    pairs = zip(levels[0::2], levels[1::2])  # modules alternate attention, FFN per layer
    return ModelStructure(tuple(LayerStructure(units, ffn_groups * database.group_size) for units, ffn_groups in pairs))


def predicted_error(database: Database, structure: ModelStructure) -> float:
    """The summed module errors the search minimised, for a structure."""
    return sum(float(m.error()[database.level(m, structure.layers[m.layer])])
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
            attention = module.kind == "attention"
            projection = adapter.attention_out_proj(layer) if attention else adapter.ffn_out_proj(layer)
            set_weight_matrix(projection, module.weights(level)[:, columns])
    record_structure(model.config, structure)
    return model.eval()
