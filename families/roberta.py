"""RoBERTa, XLM-RoBERTa and CamemBERT: BERT's post-LN layers with one token type (no token_type_ids input) and
position ids counted from the padding index."""

from __future__ import annotations

from transformers import PretrainedConfig, RobertaConfig
from transformers.models.roberta.modeling_roberta import RobertaLayer

from ziplm.families.bert import TINY_SIZES, BertAdapter
from ziplm.families.registry import register_family


@register_family
class RobertaAdapter(BertAdapter):
    """XLM-RoBERTa's and CamemBERT's layers are RoBERTa's layer; latency-table layers are built as RobertaLayer."""

    name = "roberta"
    model_types = ("roberta", "xlm-roberta", "camembert")
    layer_class = RobertaLayer
    token_types = False

    def max_sequence_length(self, config: PretrainedConfig) -> int:
        """Positions run from pad_token_id + 1, so the table holds pad_token_id + 1 fewer tokens than its rows."""
        return config.max_position_embeddings - config.pad_token_id - 1

    def tiny_config(self) -> PretrainedConfig:
        return RobertaConfig(**TINY_SIZES, type_vocab_size=1, max_position_embeddings=66)
