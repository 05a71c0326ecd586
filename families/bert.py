"""BERT-like post-LayerNorm encoders (BERT, MiniLM, ...). The RoBERTa and ELECTRA adapters are this one with their own
layer class, inputs and tiny config."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import BertConfig, PretrainedConfig
from transformers.models.bert.modeling_bert import BertLayer

from ziplm.families.base import FamilyAdapter, ModelShape, eager_config
from ziplm.families.registry import register_family


class ResidualNorm(nn.Module):
    """What a removed post-LN sub-block leaves behind: LayerNorm(x + b_out) (ALGORITHMS.md section 1)."""

    def __init__(self, bias: torch.Tensor, layer_norm: nn.LayerNorm) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())
        self.LayerNorm = layer_norm

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(x + self.bias)


class RemovedAttention(ResidualNorm):
    """Stands in for BertAttention: returns (output, attention weights) like the module it replaces."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, None]:
        return self.residual(hidden_states), None


class RemovedFFNOutput(ResidualNorm):
    """Stands in for BertOutput; the intermediate module becomes an identity, so `input_tensor` is the input."""

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.residual(input_tensor)


# The sizes every BERT-like tiny config shares: 3 layers, hidden 64, 4 heads of 16, FFN 128.
TINY_SIZES: dict[str, Any] = {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                              "intermediate_size": 128, "num_labels": 2}


@register_family
class BertAdapter(FamilyAdapter):
    name = "bert"
    model_types = ("bert",)
    layer_class: ClassVar[type[nn.Module]] = BertLayer
    token_types: ClassVar[bool] = True  # the model takes token_type_ids

    def shape(self, config: PretrainedConfig) -> ModelShape:
        return ModelShape.multi_head(self.name, config.num_hidden_layers, config.hidden_size,
                                     config.num_attention_heads, config.intermediate_size, config.vocab_size)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.encoder.layer

    def attention_in_projs(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        attention = layer.attention.self
        return attention.query, attention.key, attention.value

    def attention_out_proj(self, layer: nn.Module) -> nn.Linear:
        return layer.attention.output.dense

    def ffn_in_projs(self, layer: nn.Module) -> tuple[nn.Linear, ...]:
        return (layer.intermediate.dense,)

    def ffn_out_proj(self, layer: nn.Module) -> nn.Linear:
        return layer.output.dense

    def has_attention(self, layer: nn.Module) -> bool:
        return not isinstance(layer.attention, RemovedAttention)

    def has_ffn(self, layer: nn.Module) -> bool:
        return not isinstance(layer.output, RemovedFFNOutput)

    def set_attention_counts(self, layer: nn.Module, units: int) -> None:
        attention = layer.attention.self
        attention.num_attention_heads = units
        attention.all_head_size = units * attention.attention_head_size

    def remove_attention(self, layer: nn.Module) -> None:
        output = layer.attention.output
        layer.attention = RemovedAttention(output.dense.bias, output.LayerNorm)

    def remove_ffn(self, layer: nn.Module) -> None:
        output = layer.output
        layer.intermediate = nn.Identity()
        layer.output = RemovedFFNOutput(output.dense.bias, output.LayerNorm)

    def new_layer(self, config: PretrainedConfig) -> nn.Module:
        return self.layer_class(eager_config(config))

    def run_layer(self, layer: nn.Module, **block_inputs: torch.Tensor) -> torch.Tensor:
        return layer(block_inputs["hidden_states"], block_inputs["attention_mask"])

    def input_names(self, config: PretrainedConfig) -> tuple[str, ...]:
        names = super().input_names(config)
        return (*names, "token_type_ids") if self.token_types else names

    def tiny_config(self) -> PretrainedConfig:
        return BertConfig(**TINY_SIZES, max_position_embeddings=160)
