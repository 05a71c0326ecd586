"""What pre-norm families share (ModernBERT, GPT-2, Llama-style decoders): a removed attention or FFN module adds only
its output projection's bias to the residual stream, so the module and its input norm vanish; and the rotary cosines
and sines that their layers are called with (`RotaryLayers`)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DummyLayer, DynamicCache, DynamicLayer

from ziplm.families.base import FamilyAdapter
from ziplm.families.decoder import block_cache


class RemovedModule(nn.Module):
    """What a removed pre-norm module adds to the residual stream: its output projection's bias, where it had one (a
    constant, so OBS keeps it), else nothing."""

    def __init__(self, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def added(self, hidden_states: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros_like(hidden_states)
        return zeros if self.bias is None else zeros + self.bias


class RemovedAttention(RemovedModule):
    """Stands in for a pre-norm attention module, returning (output, attention weights) as transformers' do.

    Called with a key/value cache (a decoder generating), it turns its own layer's entry into a DummyLayer: the entry
    keeps nothing, and transformers then reads sequence lengths and masks from the first layer that attends, as it
    must (an empty entry at layer 0 would otherwise say the cache is empty and mis-mask a padded batch)."""

    def __init__(self, bias: torch.Tensor | None, layer_idx: int | None = None) -> None:
        super().__init__(bias)
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args: object, past_key_values: Cache | None = None,
                **kwargs: object) -> tuple[torch.Tensor, None]:
        if isinstance(past_key_values, DynamicCache) and self.layer_idx is not None:
            layers = past_key_values.layers
            layers.extend(DynamicLayer() for _ in range(len(layers), self.layer_idx + 1))
            layers[self.layer_idx] = DummyLayer()
        return self.added(hidden_states), None


class RemovedMLP(RemovedModule):
    """Stands in for a pre-norm FFN."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.added(hidden_states)


class PreNormModules(FamilyAdapter):
    """The part of an adapter of a pre-norm family (listed before its base class) that removes modules: it names, in
    `attention_modules` and `ffn_modules`, a layer's attribute of the module and of its input norm; a removed module
    is replaced by a stand-in that adds only its output projection's bias, and its norm by the identity."""

    attention_modules: ClassVar[tuple[str, str]]  # (attention module, its input norm)
    ffn_modules: ClassVar[tuple[str, str]]  # (FFN module, its input norm)

    def has_attention(self, layer: nn.Module) -> bool:
        return not isinstance(getattr(layer, self.attention_modules[0]), RemovedAttention)

    def has_ffn(self, layer: nn.Module) -> bool:
        return not isinstance(getattr(layer, self.ffn_modules[0]), RemovedMLP)

    def remove_attention(self, layer: nn.Module) -> None:
        module, norm = self.attention_modules
        index = getattr(getattr(layer, module), "layer_idx", None)  # where a decoder's cache keeps this layer
        setattr(layer, module, RemovedAttention(self.attention_out_proj(layer).bias, index))
        setattr(layer, norm, nn.Identity())

    def remove_ffn(self, layer: nn.Module) -> None:
        module, norm = self.ffn_modules
        setattr(layer, module, RemovedMLP(self.ffn_out_proj(layer).bias))
        setattr(layer, norm, nn.Identity())


def rotary_inputs(head_dim: int, batch_size: int, sequence_length: int, base: float = 10000.0
                  ) -> dict[str, np.ndarray]:
    """The rotary cosines and sines of each position [b, s, head_dim] that a layer is called with (each frequency
    twice, as transformers' rotary embeddings lay them out)."""
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.arange(sequence_length)[:, None] * inv_freq[None, :]
    angles = np.broadcast_to(np.concatenate([angles, angles], axis=-1), (batch_size, sequence_length, head_dim))
    return {"cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32)}


ROTARY_AXES = {"cos": {0: "batch", 1: "sequence"}, "sin": {0: "batch", 1: "sequence"}}


class RotaryLayers(FamilyAdapter):
    """The part of an adapter whose layers take rotary positions (listed before its other base class): its block
    inputs add the cosines and sines of each position, and its layers are called with them as `position_embeddings`."""

    def run_layer(self, layer: nn.Module, **block_inputs: torch.Tensor) -> torch.Tensor:
        return layer(block_inputs["hidden_states"], attention_mask=block_inputs["attention_mask"],
                     position_embeddings=(block_inputs["cos"], block_inputs["sin"]),
                     past_key_values=block_cache(block_inputs))

    def block_inputs(self, config: PretrainedConfig, batch_size: int, sequence_length: int,
                     seed: int = 0) -> dict[str, np.ndarray]:
        return {**super().block_inputs(config, batch_size, sequence_length, seed),
                **rotary_inputs(self.shape(config).head_dim, batch_size, sequence_length)}

    def block_axes(self) -> dict[str, dict[int, str]]:
        return {**super().block_axes(), **ROTARY_AXES}
