"""Llama-style decoders: pre-RMSNorm layers (`layers[i]`: input_layernorm, self_attn, post_attention_layernorm, mlp)
with separate `q_proj/k_proj/v_proj/o_proj`, a gated FFN (`up_proj`, `gate_proj`, `down_proj`), rotary positions and
grouped-query attention: one prunable attention unit is one KV head with its group of query heads (the generic
adapter's unit). The attention reads its head counts from its projections' shapes, so a shrunken layer needs no
counters set. A removed attention or FFN adds nothing to the residual stream but its output bias (Llama has none): the
module and its input norm vanish.

Served model types (each checked by the family conformance tests): llama, mistral, qwen2 (Q/K/V biases) and qwen3
(per-head Q/K norms, which shrinking heads leaves as they are)."""

from __future__ import annotations

from torch import nn
from transformers import LlamaConfig, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from ziplm.families.base import ModelShape, eager_config
from ziplm.families.decoder import DecoderAdapter
from ziplm.families.prenorm import PreNormModules, RotaryLayers
from ziplm.families.registry import register_family

LAYER_CLASSES: dict[str, type[nn.Module]] = {"llama": LlamaDecoderLayer, "mistral": MistralDecoderLayer,
                                             "qwen2": Qwen2DecoderLayer, "qwen3": Qwen3DecoderLayer}


@register_family
class LlamaAdapter(RotaryLayers, PreNormModules, DecoderAdapter):
    name = "llama"
    model_types = tuple(LAYER_CLASSES)
    attention_modules = ("self_attn", "input_layernorm")
    ffn_modules = ("mlp", "post_attention_layernorm")

    def shape(self, config: PretrainedConfig) -> ModelShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return ModelShape(self.name, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                          config.num_key_value_heads, head_dim, config.intermediate_size, config.vocab_size)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.layers

    def attention_in_projs(self, layer: nn.Module) -> tuple[nn.Linear, ...]:
        return layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj

    def attention_out_proj(self, layer: nn.Module) -> nn.Linear:
        return layer.self_attn.o_proj

    def ffn_in_projs(self, layer: nn.Module) -> tuple[nn.Linear, ...]:
        return layer.mlp.up_proj, layer.mlp.gate_proj

    def ffn_out_proj(self, layer: nn.Module) -> nn.Linear:
        return layer.mlp.down_proj

    def new_layer(self, config: PretrainedConfig) -> nn.Module:
        return LAYER_CLASSES[config.model_type](eager_config(config), layer_idx=0)

    def tiny_config(self) -> PretrainedConfig:
        """Grouped-query attention: 6 query heads in 3 KV groups of 2."""
        return LlamaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                           num_key_value_heads=3, intermediate_size=64, max_position_embeddings=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
