"""What decoder families share: a causal language-model head by default, layers called with a causal mask, and the
shape of their key/value cache once pruned (each layer caches its own KV-head count; a layer whose attention was
removed caches nothing)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import DummyLayer, DynamicCache, DynamicLayer

from ziplm.families.base import FamilyAdapter

MASKED = np.float32(np.finfo(np.float32).min)  # the additive mask value of a position that may not be attended
PAST_KEY, PAST_VALUE = "past_key", "past_value"  # a decode block's cached keys and values (block inputs)
KV_HEADS_KEY = "num_key_value_heads_per_layer"  # config.json: KV heads each layer caches, 0: attention removed


class DecoderAdapter(FamilyAdapter):
    """A family of causal decoders: built with a language-model head, its layers called with a causal mask."""

    default_head = "causal-lm"

    def block_inputs(self, config: PretrainedConfig, batch_size: int, sequence_length: int,
                     seed: int = 0) -> dict[str, np.ndarray]:
        """Hidden states [b, s, hidden] and an additive causal mask [b, 1, s, s]: each position attends to itself and
        the positions before it."""
        rng = np.random.default_rng(seed)
        future = np.triu(np.ones((sequence_length, sequence_length), dtype=bool), k=1)
        mask = np.where(future, MASKED, np.float32(0.0))
        return {"hidden_states": rng.standard_normal((batch_size, sequence_length, config.hidden_size), np.float32),
                "attention_mask": np.broadcast_to(mask, (batch_size, 1, *mask.shape)).copy()}

    def block_axes(self) -> dict[str, dict[int, str]]:
        return {"hidden_states": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 2: "sequence", 3: "sequence"}}

    def decode_block_inputs(self, config: PretrainedConfig, batch_size: int, context_length: int, units: int,
                            seed: int = 0) -> dict[str, np.ndarray]:
        """What one layer is called with to decode one token on a cache of `context_length` tokens: the block inputs
        of one position (hidden states [b, 1, hidden] and the family's own), an additive mask [b, 1, 1, context + 1]
        of zeros (the token attends to every cached position and to itself) and, where the block attends (`units`
        KV heads), the cached keys and values [b, units, context, head_dim]."""
        inputs = self.block_inputs(config, batch_size, 1, seed)
        inputs["attention_mask"] = np.zeros((batch_size, 1, 1, context_length + 1), np.float32)
        if units:
            rng = np.random.default_rng(seed + 1)
            shape = (batch_size, units, context_length, self.shape(config).head_dim)
            inputs[PAST_KEY], inputs[PAST_VALUE] = (rng.standard_normal(shape, np.float32) for _ in range(2))
        return inputs

    # --- the KV cache ------------------------------------------------------------------------------------------
    def kv_heads(self, config: PretrainedConfig) -> list[int]:
        """The KV heads each layer caches: its attention units (one unit is one KV head with its query heads), 0 where
        the attention was removed."""
        return [layer.units for layer in self.structure(config).layers]

    def kv_cache_bytes_per_token(self, config: PretrainedConfig, bytes_per_value: int = 4) -> int:
        """A key and a value of head_dim per KV head per layer."""
        return 2 * sum(self.kv_heads(config)) * self.shape(config).head_dim * bytes_per_value

    def generation_cache(self, model: nn.Module) -> DynamicCache | None:
        """An empty cache for `model`: a layer whose attention was removed holds a DummyLayer, which keeps nothing and
        which transformers' sequence lengths and masks skip (they read the first layer that attends). None for a
        model without attention: nothing to cache."""
        attends = [self.has_attention(layer) for layer in self.layers(model)]
        if not any(attends):
            return None
        cache = DynamicCache()
        cache.layers = [DynamicLayer() if attending else DummyLayer() for attending in attends]
        return cache

    def config_record(self, config: PretrainedConfig) -> dict[str, object]:
        """`head_dim` written out (tools that derive it as hidden_size / num_attention_heads go wrong once heads are
        pruned) and the KV heads of each layer, so that a runtime can size the cache from config.json alone."""
        return {"head_dim": self.shape(config).head_dim, KV_HEADS_KEY: self.kv_heads(config)}


def block_cache(block_inputs: dict[str, torch.Tensor]) -> DynamicCache | None:
    """A decode block's cache (its past keys and values, as layer 0's entry: the index a single layer is built with),
    or None for block inputs without one."""
    if PAST_KEY not in block_inputs:
        return None
    cache = DynamicCache()
    cache.update(block_inputs[PAST_KEY], block_inputs[PAST_VALUE], 0)
    return cache
