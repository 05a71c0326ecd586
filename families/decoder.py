"""What decoder families share: a causal language-model head by default, and layers called with a causal mask."""

from __future__ import annotations

import numpy as np
from transformers import PretrainedConfig

from ziplm.families.base import FamilyAdapter

MASKED = np.float32(np.finfo(np.float32).min)  # the additive mask value of a position that may not be attended


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
