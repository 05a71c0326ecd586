"""The model-family adapter: the one place that knows where a family keeps its prunable structures.

A *structure* of a layer is what ZipLM removes as one unit (ALGORITHMS.md section 1):
- an attention unit: one KV group, i.e. `heads_per_unit` query heads of `head_dim` columns of the attention output
  projection, with the matching rows of Q, K and V (for plain multi-head attention a unit is one head);
- an FFN neuron: one column of the FFN down projection with the matching rows of the up (and gate) projections.

An adapter is mostly declarative (where these modules are); the generic shrinking lives here. What differs per
family is how a removed module (level 0) keeps the residual path correct, and which counters a shrunken attention
module must be told about.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ziplm.errors import BadInputError

STRUCTURE_KEY = "ziplm_structure"


@dataclass(frozen=True)
class ModelShape:
    """The shape that latency depends on; it is part of every latency-table fingerprint."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int

    @property
    def num_units(self) -> int:
        """Prunable attention units per layer (KV groups; one per head without grouped-query attention)."""
        return self.num_kv_heads

    @property
    def heads_per_unit(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class LayerStructure:
    """What one layer keeps: attention units (0 = attention removed) and FFN neurons (0 = FFN removed)."""

    units: int
    ffn: int


@dataclass(frozen=True)
class ModelStructure:
    layers: tuple[LayerStructure, ...]

    @classmethod
    def dense(cls, shape: ModelShape) -> ModelStructure:
        return cls.uniform(shape, shape.num_units, shape.ffn_size)

    @classmethod
    def uniform(cls, shape: ModelShape, units: int, ffn: int) -> ModelStructure:
        return cls(tuple(LayerStructure(units, ffn) for _ in range(shape.num_layers)))

    def to_json(self) -> dict[str, list[int]]:
        return {"units": [layer.units for layer in self.layers], "ffn": [layer.ffn for layer in self.layers]}

    @classmethod
    def from_json(cls, payload: dict[str, list[int]]) -> ModelStructure:
        if len(payload["units"]) != len(payload["ffn"]):
            raise BadInputError(f"structure has {len(payload['units'])} attention and {len(payload['ffn'])} FFN "
                                "entries")
        return cls(tuple(LayerStructure(int(u), int(f)) for u, f in zip(payload["units"], payload["ffn"])))


class FamilyAdapter(ABC):
    """Where a family keeps its layers and projections, and how a module is removed (level 0)."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values this adapter serves

    # --- declarative part: a subclass names its modules -------------------------------------------------------
    @abstractmethod
    def shape(self, config: PretrainedConfig) -> ModelShape: ...

    @abstractmethod
    def layers(self, model: nn.Module) -> nn.ModuleList: ...

    @abstractmethod
    def attention_in_projs(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """(query, key, value) projections of a layer."""

    @abstractmethod
    def attention_out_proj(self, layer: nn.Module) -> nn.Linear: ...

    @abstractmethod
    def ffn_in_projs(self, layer: nn.Module) -> tuple[nn.Linear, ...]:
        """Up projection (and gate, where the family has one)."""

    @abstractmethod
    def ffn_out_proj(self, layer: nn.Module) -> nn.Linear: ...

    # --- family-specific behaviour -----------------------------------------------------------------------------
    @abstractmethod
    def remove_attention(self, layer: nn.Module) -> None:
        """Level 0: replace the attention module so the residual path (and any norm) stays correct."""

    @abstractmethod
    def remove_ffn(self, layer: nn.Module) -> None: ...

    @abstractmethod
    def has_attention(self, layer: nn.Module) -> bool:
        """False once the attention module was removed (level 0)."""

    @abstractmethod
    def has_ffn(self, layer: nn.Module) -> bool: ...

    def set_attention_counts(self, layer: nn.Module, units: int) -> None:
        """Tell the attention module how many heads it has now (families whose forward reads counters)."""

    @abstractmethod
    def new_layer(self, config: PretrainedConfig) -> nn.Module:
        """A freshly initialised dense layer of this family (latency tables time single layers)."""

    @abstractmethod
    def run_layer(self, layer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Call one layer on hidden states [b, s, hidden] with an additive float mask [b, 1, 1, s]."""

    # --- generic part --------------------------------------------------------------------------------------------
    def layer_linears(self, layer: nn.Module) -> list[nn.Linear]:
        """The matmul projections one layer still has: attention Q, K, V, output, then FFN in (up, gate), out."""
        linears: list[nn.Linear] = []
        if self.has_attention(layer):
            linears += [*self.attention_in_projs(layer), self.attention_out_proj(layer)]
        if self.has_ffn(layer):
            linears += [*self.ffn_in_projs(layer), self.ffn_out_proj(layer)]
        return linears

    def prunable_linears(self, model: nn.Module, layers: Sequence[nn.Module] | None = None) -> dict[str, nn.Linear]:
        """Attention Q/K/V/O and FFN in/out of every layer that still has them, by qualified module name in `model`.

        No embeddings, pooler or classifier: these are the encoder's matmuls that sparsity and INT8 apply to.
        `layers` (default: the model's own) names the layers when `model` only wraps some, as a latency-table block.
        """
        names = {id(module): name for name, module in model.named_modules()}
        layers = self.layers(model) if layers is None else layers
        return {names[id(linear)]: linear for layer in layers for linear in self.layer_linears(layer)}

    def unit_columns(self, shape: ModelShape, unit: int) -> range:
        """Columns of the attention output projection (= rows of Q) that belong to one attention unit."""
        width = shape.heads_per_unit * shape.head_dim
        return range(unit * width, (unit + 1) * width)

    def kv_rows(self, shape: ModelShape, unit: int) -> range:
        return range(unit * shape.head_dim, (unit + 1) * shape.head_dim)

    def shrink_attention(self, layer: nn.Module, shape: ModelShape, keep_units: Sequence[int]) -> None:
        """Keep only the given attention units of one layer (in that order); none kept removes the module."""
        if len(keep_units) == 0:
            self.remove_attention(layer)
            return
        q_rows = [c for u in keep_units for c in self.unit_columns(shape, u)]
        kv_rows = [r for u in keep_units for r in self.kv_rows(shape, u)]
        q, k, v = self.attention_in_projs(layer)
        _keep_rows(q, q_rows)
        _keep_rows(k, kv_rows)
        _keep_rows(v, kv_rows)
        _keep_columns(self.attention_out_proj(layer), q_rows)
        self.set_attention_counts(layer, len(keep_units))

    def shrink_ffn(self, layer: nn.Module, keep_neurons: Sequence[int]) -> None:
        """Keep only the given FFN neurons of one layer; none kept removes the module."""
        if len(keep_neurons) == 0:
            self.remove_ffn(layer)
            return
        for proj in self.ffn_in_projs(layer):
            _keep_rows(proj, list(keep_neurons))
        _keep_columns(self.ffn_out_proj(layer), list(keep_neurons))

    def apply_structure(self, model: PreTrainedModel, structure: ModelStructure) -> None:
        """Shrink every layer to the structure, keeping the first units/neurons, and record it in the config.

        Used to rebuild a pruned model's skeleton before its weights are loaded, and for latency work where
        weight values do not matter. Pruning itself calls shrink_* with the units the solver chose.
        """
        self.validate_structure(model.config, structure)
        shape = self.shape(model.config)
        for layer, layer_structure in zip(self.layers(model), structure.layers):
            self.shrink_layer(layer, shape, layer_structure)
        record_structure(model.config, structure)

    def shrink_layer(self, layer: nn.Module, shape: ModelShape, structure: LayerStructure) -> None:
        """Shrink one layer to `structure`, keeping the first units and neurons."""
        if structure.units < shape.num_units:
            self.shrink_attention(layer, shape, range(structure.units))
        if structure.ffn < shape.ffn_size:
            self.shrink_ffn(layer, range(structure.ffn))

    def structure(self, config: PretrainedConfig) -> ModelStructure:
        """What a model keeps now: its recorded structure once pruned, else the dense one."""
        return recorded_structure(config) or ModelStructure.dense(self.shape(config))

    def validate_structure(self, config: PretrainedConfig, structure: ModelStructure) -> None:
        shape = self.shape(config)
        if len(structure.layers) != shape.num_layers:
            raise BadInputError(f"structure lists {len(structure.layers)} layers; the model has {shape.num_layers}")
        for index, layer in enumerate(structure.layers):
            if not (0 <= layer.units <= shape.num_units and 0 <= layer.ffn <= shape.ffn_size):
                raise BadInputError(
                    f"layer {index}: {layer} is outside 0..{shape.num_units} units and 0..{shape.ffn_size} neurons"
                )


def record_structure(config: PretrainedConfig, structure: ModelStructure) -> None:
    setattr(config, STRUCTURE_KEY, structure.to_json())


def recorded_structure(config: PretrainedConfig) -> ModelStructure | None:
    payload = getattr(config, STRUCTURE_KEY, None)
    return None if payload is None else ModelStructure.from_json(payload)


def structure_from_config_file(model_dir: Path) -> ModelStructure | None:
    payload = json.loads((Path(model_dir) / "config.json").read_text()).get(STRUCTURE_KEY)
    return None if payload is None else ModelStructure.from_json(payload)


def shape_as_dict(shape: ModelShape) -> dict[str, int | str]:
    return asdict(shape)


@torch.no_grad()
def _keep_rows(linear: nn.Linear, rows: list[int]) -> None:
    """Keep output features `rows` of a linear layer, in place."""
    index = torch.tensor(rows, dtype=torch.long)
    linear.weight = nn.Parameter(linear.weight.index_select(0, index).clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.index_select(0, index).clone())
    linear.out_features = len(rows)


@torch.no_grad()
def _keep_columns(linear: nn.Linear, columns: list[int]) -> None:
    """Keep input features `columns` of a linear layer, in place (the bias is untouched)."""
    index = torch.tensor(columns, dtype=torch.long)
    linear.weight = nn.Parameter(linear.weight.index_select(1, index).clone())
    linear.in_features = len(columns)
