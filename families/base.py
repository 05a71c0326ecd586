"""The model-family adapter: the one place that knows where a family keeps its prunable structures.

A *structure* of a layer is what ZipLM removes as one unit (ALGORITHMS.md section 1):
- an attention unit: one KV group, i.e. `heads_per_unit` query heads of `head_dim` columns of the attention output
  projection, with the matching rows of Q, K and V (for plain multi-head attention a unit is one head);
- an FFN neuron: one column of the FFN down projection with the matching rows of the up (and gate) projections.

A structure is a *coupled group* (`Slice`s): every (module, side, indices) that must shrink together, so that a
fused Q/K/V projection or GPT-2's Conv1D (weights stored [in, out]) fits the same generic shrinking.

An adapter is mostly declarative (where these modules are, which inputs the model takes, how one layer is called);
the generic shrinking lives here. What differs per family is how a removed module (level 0) keeps the residual path
correct, and which counters a shrunken attention module must be told about. docs/extending.md shows how to add one.
"""

from __future__ import annotations

import copy
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

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

    @classmethod
    def multi_head(cls, family: str, num_layers: int, hidden_size: int, num_heads: int, ffn_size: int,
                   vocab_size: int) -> ModelShape:
        """The shape of plain multi-head attention: every head its own KV head, heads of hidden_size / num_heads."""
        return cls(family, num_layers, hidden_size, num_heads, num_heads, hidden_size // num_heads, ffn_size,
                   vocab_size)

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


Side = Literal["out", "in"]  # a module's output features (rows of nn.Linear) or input features (its columns)


@dataclass(frozen=True)
class Slice:
    """One module's part of a pruning unit: the output or input features `indices` of a linear (or Conv1D). A fused
    projection (Q, K and V in one; up and gate in one) gives each of its parts a `part` number: the features kept of
    one part stay together, in part order, as the module's forward splits them."""

    module: nn.Module
    side: Side
    indices: tuple[int, ...]
    part: int = 0


class FamilyAdapter(ABC):
    """Where a family keeps its layers and projections, and how a module is removed (level 0)."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values this adapter serves
    default_head: ClassVar[str] = "sequence-classification"  # the head a model is built with when none is named

    # --- declarative part: a subclass names its modules -------------------------------------------------------
    @abstractmethod
    def shape(self, config: PretrainedConfig) -> ModelShape: ...

    @abstractmethod
    def layers(self, model: nn.Module) -> nn.ModuleList: ...

    @abstractmethod
    def attention_in_projs(self, layer: nn.Module) -> tuple[nn.Linear, ...]:
        """(query, key, value) projections of a layer, or the one fused projection that computes all three."""

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
    def run_layer(self, layer: nn.Module, **block_inputs: torch.Tensor) -> torch.Tensor:
        """Call one layer on `block_inputs` (see `block_inputs`) and return its output hidden states."""

    @abstractmethod
    def tiny_config(self) -> PretrainedConfig:
        """A tiny randomly initialisable config of this family for tests: several layers, more than one attention
        unit and an FFN width of at least 64, so that layers can be shrunk unevenly."""

    def tiny_config_of(self, model_type: str) -> PretrainedConfig:
        """The tiny config under another model type this adapter serves (the types one adapter serves share their
        settings' names; a type with settings of its own overrides this)."""
        tiny = self.tiny_config()
        if tiny.model_type == model_type:
            return tiny
        settings = {key: value for key, value in tiny.to_dict().items()
                    if key not in ("model_type", "architectures", "transformers_version")}
        return AutoConfig.for_model(model_type, **settings)

    # --- the model contract: what export, timing and the latency table feed a model or one of its layers ----------
    def input_names(self, config: PretrainedConfig) -> tuple[str, ...]:
        """The model's inputs, in export order (all int64 [batch, sequence])."""
        return ("input_ids", "attention_mask")

    def max_sequence_length(self, config: PretrainedConfig) -> int:
        """The longest sequence the model's position embeddings take."""
        return config.max_position_embeddings

    def example_inputs(self, config: PretrainedConfig, batch_size: int, sequence_length: int,
                       seed: int = 0) -> dict[str, np.ndarray]:
        """Random token ids, a full attention mask and zeros for any other input (token types)."""
        rng = np.random.default_rng(seed)
        shape = (batch_size, sequence_length)
        inputs = {"input_ids": rng.integers(0, config.vocab_size, size=shape, dtype=np.int64),
                  "attention_mask": np.ones(shape, dtype=np.int64)}
        return {name: inputs.get(name, np.zeros(shape, dtype=np.int64)) for name in self.input_names(config)}

    def block_inputs(self, config: PretrainedConfig, batch_size: int, sequence_length: int,
                     seed: int = 0) -> dict[str, np.ndarray]:
        """What one layer is called with (`run_layer`): hidden states [b, s, hidden] and an additive float attention
        mask [b, 1, 1, s] (zeros: every position attends)."""
        rng = np.random.default_rng(seed)
        return {"hidden_states": rng.standard_normal((batch_size, sequence_length, config.hidden_size), np.float32),
                "attention_mask": np.zeros((batch_size, 1, 1, sequence_length), np.float32)}

    def block_axes(self) -> dict[str, dict[int, str]]:
        """The dynamic axes of `block_inputs` (batch and sequence) for export."""
        return {"hidden_states": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 3: "sequence"}}

    # --- pruning units as coupled groups -----------------------------------------------------------------------------
    def attention_unit(self, layer: nn.Module, shape: ModelShape, unit: int) -> list[Slice]:
        """Everything one attention unit (a KV group and its query heads) owns: rows of Q, K and V, columns of the
        output projection. Families with a fused Q/K/V projection override this."""
        q, k, v = self.attention_in_projs(layer)
        q_rows, kv_rows = tuple(self.unit_columns(shape, unit)), tuple(self.kv_rows(shape, unit))
        return [Slice(q, "out", q_rows), Slice(k, "out", kv_rows), Slice(v, "out", kv_rows),
                Slice(self.attention_out_proj(layer), "in", q_rows)]

    def ffn_unit(self, layer: nn.Module, neuron: int) -> list[Slice]:
        """Everything one FFN neuron owns: a row of the up (and gate) projection, a column of the down projection."""
        return [*(Slice(proj, "out", (neuron,)) for proj in self.ffn_in_projs(layer)),
                Slice(self.ffn_out_proj(layer), "in", (neuron,))]

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
        keep_slices([self.attention_unit(layer, shape, unit) for unit in keep_units])
        self.set_attention_counts(layer, len(keep_units))

    def shrink_ffn(self, layer: nn.Module, keep_neurons: Sequence[int]) -> None:
        """Keep only the given FFN neurons of one layer (in that order); none kept removes the module."""
        if len(keep_neurons) == 0:
            self.remove_ffn(layer)
            return
        keep_slices([self.ffn_unit(layer, neuron) for neuron in keep_neurons])

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

    def kv_cache_bytes_per_token(self, config: PretrainedConfig, bytes_per_value: int = 4) -> int | None:
        """What one more token of context adds to the key/value cache; None for a family that serves none (encoders
        see the whole sequence at once)."""
        return None

    def config_record(self, config: PretrainedConfig) -> dict[str, object]:
        """What config.json records beyond the structure so that other tools read the model right (none by default)."""
        return {}

    def validate_structure(self, config: PretrainedConfig, structure: ModelStructure) -> None:
        shape = self.shape(config)
        if len(structure.layers) != shape.num_layers:
            raise BadInputError(f"structure lists {len(structure.layers)} layers; the model has {shape.num_layers}")
        for index, layer in enumerate(structure.layers):
            if not (0 <= layer.units <= shape.num_units and 0 <= layer.ffn <= shape.ffn_size):
                raise BadInputError(
                    f"layer {index}: {layer} is outside 0..{shape.num_units} units and 0..{shape.ffn_size} neurons"
                )


def fused_attention_unit(qkv: nn.Module, out_proj: nn.Module, shape: ModelShape, unit: int) -> list[Slice]:
    """One head of multi-head attention whose Q, K and V are one fused projection (outputs [Q | K | V], each head by
    head): its rows of each of the three parts, and its columns of the output projection."""
    part_width = weight_matrix(qkv).shape[0] // 3  # the heads the layer has now, times head_dim
    rows = range(shape.head_dim * unit, shape.head_dim * (unit + 1))
    return [*(Slice(qkv, "out", tuple(part * part_width + row for row in rows), part) for part in range(3)),
            Slice(out_proj, "in", tuple(rows))]


def eager_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of `config` that selects eager attention (the attention that single layers are built with for export)."""
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    return config


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


def keep_slices(units: Sequence[list[Slice]]) -> None:
    """Shrink every module the units touch to the features the units keep, in the units' order (within each part of
    a fused module, the parts in order)."""
    kept: dict[tuple[int, Side], tuple[nn.Module, dict[int, list[int]]]] = {}
    for unit in units:
        for piece in unit:
            parts = kept.setdefault((id(piece.module), piece.side), (piece.module, {}))[1]
            parts.setdefault(piece.part, []).extend(piece.indices)
    for (_, side), (module, parts) in kept.items():
        keep_features(module, side, [index for part in sorted(parts) for index in parts[part]])


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features], whether an nn.Linear or a transformers Conv1D ([in, out])."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


@torch.no_grad()
def set_weight_matrix(module: nn.Module, W: torch.Tensor) -> None:
    """Copy W ([out, in]) into the module's weight, in its own layout and dtype."""
    module.weight.copy_((W.T if isinstance(module, Conv1D) else W).to(module.weight.dtype))


@torch.no_grad()
def keep_features(module: nn.Module, side: Side, indices: list[int]) -> None:
    """Keep output (`out`: weight rows of nn.Linear and the bias) or input (`in`) features of a linear or Conv1D."""
    index = torch.tensor(indices, dtype=torch.long)
    conv = isinstance(module, Conv1D)
    if not (conv or isinstance(module, nn.Linear)):
        raise TypeError(f"cannot shrink a {type(module).__name__}: pruning units slice nn.Linear or Conv1D modules")
    dim = (1 if conv else 0) if side == "out" else (0 if conv else 1)
    module.weight = nn.Parameter(module.weight.index_select(dim, index).clone())
    if side == "out" and module.bias is not None:
        module.bias = nn.Parameter(module.bias.index_select(0, index).clone())
    if conv:
        module.nx, module.nf = module.weight.shape
    else:
        module.in_features, module.out_features = module.weight.shape[1], module.weight.shape[0]
