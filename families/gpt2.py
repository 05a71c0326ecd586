"""GPT-2: pre-LayerNorm decoder layers (`h[i]`: ln_1, attn, ln_2, mlp). Q, K and V are one fused Conv1D
(`attn.c_attn`, weights stored [in, out], outputs [Q | K | V], each head by head), the output projection is
`attn.c_proj`, the FFN `mlp.c_fc` / `mlp.c_proj`; learned positions. A removed attention or FFN adds nothing to the
residual stream but its output bias: the module and its input norm vanish."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, PretrainedConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from ziplm.families.base import ModelShape, Slice, eager_config, fused_attention_unit
from ziplm.families.decoder import DecoderAdapter, block_cache
from ziplm.families.prenorm import PreNormModules
from ziplm.families.registry import register_family


@register_family
class GPT2Adapter(PreNormModules, DecoderAdapter):
    name = "gpt2"
    model_types = ("gpt2",)
    attention_modules = ("attn", "ln_1")
    ffn_modules = ("mlp", "ln_2")

    def shape(self, config: PretrainedConfig) -> ModelShape:
        return ModelShape.multi_head(self.name, config.n_layer, config.n_embd, config.n_head,
                                     config.n_inner or 4 * config.n_embd, config.vocab_size)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.h

    def attention_in_projs(self, layer: nn.Module) -> tuple[nn.Module, ...]:
        return (layer.attn.c_attn,)

    def attention_out_proj(self, layer: nn.Module) -> nn.Module:
        return layer.attn.c_proj

    def ffn_in_projs(self, layer: nn.Module) -> tuple[nn.Module, ...]:
        return (layer.mlp.c_fc,)

    def ffn_out_proj(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.c_proj

    def attention_unit(self, layer: nn.Module, shape: ModelShape, unit: int) -> list[Slice]:
        return fused_attention_unit(layer.attn.c_attn, layer.attn.c_proj, shape, unit)

    def set_attention_counts(self, layer: nn.Module, units: int) -> None:
        """GPT2Attention splits c_attn's output at `split_size` into Q, K and V."""
        layer.attn.num_heads = units
        layer.attn.split_size = units * layer.attn.head_dim

    def new_layer(self, config: PretrainedConfig) -> nn.Module:
        return GPT2Block(eager_config(config), layer_idx=0)

    def run_layer(self, layer: nn.Module, **block_inputs: torch.Tensor) -> torch.Tensor:
        return layer(block_inputs["hidden_states"], attention_mask=block_inputs["attention_mask"],
                     past_key_values=block_cache(block_inputs))

    def tiny_config(self) -> PretrainedConfig:
        return GPT2Config(vocab_size=100, n_embd=64, n_layer=3, n_head=4, n_inner=128, n_positions=64,
                          bos_token_id=1, eos_token_id=2)
