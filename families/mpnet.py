"""MPNet: BERT's post-LN layers under other names (`attention.attn.q/k/v/o`, the attention's LayerNorm beside it),
no token types, positions counted from the padding index, and a relative position bias [b, heads, s, s] that the
encoder computes once, from one table shared by every layer, and adds to each layer's attention scores.

A layer that loses heads keeps its own heads' rows of that bias: its attention module becomes a KeptHeadsAttention
holding the indices of the heads it kept (a buffer, so they are saved with the weights and come back on reload)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers import MPNetConfig, PretrainedConfig
from transformers.models.mpnet.modeling_mpnet import MPNetLayer, MPNetSelfAttention

from ziplm.families.base import ModelShape
from ziplm.families.bert import TINY_SIZES, BertAdapter, RemovedAttention
from ziplm.families.registry import register_family
from ziplm.families.roberta import RobertaAdapter


class KeptHeadsAttention(MPNetSelfAttention):
    """MPNet self-attention with some heads removed: it reads only its kept heads' rows of the shared position bias."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None, *args: object, **kwargs: object) -> tuple[torch.Tensor, ...]:
        if position_bias is not None:
            position_bias = position_bias.index_select(1, self.kept_heads)
        return super().forward(hidden_states, attention_mask, position_bias, *args, **kwargs)


@register_family
class MPNetAdapter(BertAdapter):
    name = "mpnet"
    model_types = ("mpnet",)
    layer_class = MPNetLayer
    token_types = False
    max_sequence_length = RobertaAdapter.max_sequence_length

    def attention_in_projs(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        attention = layer.attention.attn
        return attention.q, attention.k, attention.v

    def attention_out_proj(self, layer: nn.Module) -> nn.Linear:
        return layer.attention.attn.o

    def set_attention_counts(self, layer: nn.Module, units: int) -> None:
        attention = layer.attention.attn
        attention.num_attention_heads = units
        attention.all_head_size = units * attention.attention_head_size

    def remove_attention(self, layer: nn.Module) -> None:
        layer.attention = RemovedAttention(layer.attention.attn.o.bias, layer.attention.LayerNorm)

    def shrink_attention(self, layer: nn.Module, shape: ModelShape, keep_units: Sequence[int]) -> None:
        """Shrink as BERT does, and remember which of the model's heads the layer kept (in the order kept)."""
        attention = layer.attention.attn if self.has_attention(layer) else None
        heads = getattr(attention, "kept_heads", torch.arange(shape.num_heads))
        super().shrink_attention(layer, shape, keep_units)
        if self.has_attention(layer):
            attention.__class__ = KeptHeadsAttention
            attention.register_buffer("kept_heads", heads[torch.tensor(list(keep_units), dtype=torch.long)])

    def run_layer(self, layer: nn.Module, **block_inputs: torch.Tensor) -> torch.Tensor:
        return layer(block_inputs["hidden_states"], block_inputs["attention_mask"],
                     position_bias=block_inputs["position_bias"])[0]

    def block_inputs(self, config: PretrainedConfig, batch_size: int, sequence_length: int,
                     seed: int = 0) -> dict[str, np.ndarray]:
        """BERT's block inputs and a random relative position bias of every head [b, heads, s, s]."""
        rng = np.random.default_rng(seed + 1)
        bias = rng.standard_normal((batch_size, config.num_attention_heads, sequence_length, sequence_length))
        return {**super().block_inputs(config, batch_size, sequence_length, seed),
                "position_bias": bias.astype(np.float32)}

    def block_axes(self) -> dict[str, dict[int, str]]:
        return {**super().block_axes(), "position_bias": {0: "batch", 2: "sequence", 3: "sequence"}}

    def tiny_config(self) -> PretrainedConfig:
        return MPNetConfig(**TINY_SIZES, max_position_embeddings=66, relative_attention_num_buckets=32)
