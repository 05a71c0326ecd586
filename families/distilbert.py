"""DistilBERT: post-LN layers (`TransformerBlock`) whose attention and FFN return their output projection's result and
leave the residual sum and its LayerNorm (`sa_layer_norm`, `output_layer_norm`) to the block; no token types."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DistilBertConfig, PretrainedConfig
from transformers.models.distilbert.modeling_distilbert import TransformerBlock

from ziplm.families.base import FamilyAdapter, ModelShape, eager_config
from ziplm.families.registry import register_family


class OutputBias(nn.Module):
    """What a removed sub-module leaves: its output projection's bias, which the block adds to the residual and
    normalises, so the block computes LayerNorm(x + b_out) (ALGORITHMS.md section 1)."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand_as(x)


class RemovedSelfAttention(OutputBias):
    """Stands in for DistilBertSelfAttention: returns (output, attention weights) like the module it replaces."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, None]:
        return self.output(hidden_states), None


class RemovedFFN(OutputBias):
    """Stands in for the FFN module."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.output(input)


@register_family
class DistilBertAdapter(FamilyAdapter):
    name = "distilbert"
    model_types = ("distilbert",)

    def shape(self, config: PretrainedConfig) -> ModelShape:
        return ModelShape.multi_head(self.name, config.n_layers, config.dim, config.n_heads, config.hidden_dim,
                                     config.vocab_size)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.transformer.layer

    def attention_in_projs(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return layer.attention.q_lin, layer.attention.k_lin, layer.attention.v_lin

    def attention_out_proj(self, layer: nn.Module) -> nn.Linear:
        return layer.attention.out_lin

    def ffn_in_projs(self, layer: nn.Module) -> tuple[nn.Linear, ...]:
        return (layer.ffn.lin1,)

    def ffn_out_proj(self, layer: nn.Module) -> nn.Linear:
        return layer.ffn.lin2

    def has_attention(self, layer: nn.Module) -> bool:
        return not isinstance(layer.attention, RemovedSelfAttention)

    def has_ffn(self, layer: nn.Module) -> bool:
        return not isinstance(layer.ffn, RemovedFFN)

    def set_attention_counts(self, layer: nn.Module, units: int) -> None:
        """The head count and the width of Q, K and V (`dim`, the model width while the attention is dense)."""
        attention = layer.attention
        attention.n_heads = units
        attention.dim = units * attention.attention_head_size

    def remove_attention(self, layer: nn.Module) -> None:
        layer.attention = RemovedSelfAttention(layer.attention.out_lin.bias)

    def remove_ffn(self, layer: nn.Module) -> None:
        layer.ffn = RemovedFFN(layer.ffn.lin2.bias)

    def new_layer(self, config: PretrainedConfig) -> nn.Module:
        return TransformerBlock(eager_config(config))

    def run_layer(self, layer: nn.Module, **block_inputs: torch.Tensor) -> torch.Tensor:
        return layer(block_inputs["hidden_states"], block_inputs["attention_mask"])

    def tiny_config(self) -> PretrainedConfig:
        return DistilBertConfig(vocab_size=100, dim=64, n_layers=3, n_heads=4, hidden_dim=128,
                                max_position_embeddings=160, num_labels=2)
