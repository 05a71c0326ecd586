"""ELECTRA (the discriminator, or any ELECTRA encoder): BERT's post-LN layers behind embeddings of their own width
(`embedding_size`, projected to `hidden_size` before the first layer)."""

from __future__ import annotations

from transformers import ElectraConfig, PretrainedConfig
from transformers.models.electra.modeling_electra import ElectraLayer

from ziplm.families.bert import TINY_SIZES, BertAdapter
from ziplm.families.registry import register_family


@register_family
class ElectraAdapter(BertAdapter):
    name = "electra"
    model_types = ("electra",)
    layer_class = ElectraLayer

    def tiny_config(self) -> PretrainedConfig:
        return ElectraConfig(**TINY_SIZES, embedding_size=32, max_position_embeddings=160)
