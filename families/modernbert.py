"""ModernBERT: pre-norm layers with one fused Q/K/V projection (`attn.Wqkv`, rows [Q | K | V], each head by head), a
gated GeGLU FFN whose `mlp.Wi` holds the up and the gate projection ([up | gate], neuron by neuron), rotary positions,
alternating local and global attention, no biases by default. A removed attention or FFN adds nothing to the residual
stream: the module and its input norm vanish."""

from __future__ import annotations

from torch import nn
from transformers import ModernBertConfig, PretrainedConfig
from transformers.models.modernbert.modeling_modernbert import ModernBertEncoderLayer

from ziplm.families.base import ModelShape, Slice, eager_config, fused_attention_unit
from ziplm.families.prenorm import PreNormModules, RotaryLayers
from ziplm.families.registry import register_family


@register_family
class ModernBertAdapter(RotaryLayers, PreNormModules):
    name = "modernbert"
    model_types = ("modernbert",)
    attention_modules = ("attn", "attn_norm")
    ffn_modules = ("mlp", "mlp_norm")

    def shape(self, config: PretrainedConfig) -> ModelShape:
        return ModelShape.multi_head(self.name, config.num_hidden_layers, config.hidden_size,
                                     config.num_attention_heads, config.intermediate_size, config.vocab_size)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.layers

    def attention_in_projs(self, layer: nn.Module) -> tuple[nn.Linear, ...]:
        return (layer.attn.Wqkv,)

    def attention_out_proj(self, layer: nn.Module) -> nn.Linear:
        return layer.attn.Wo

    def ffn_in_projs(self, layer: nn.Module) -> tuple[nn.Linear, ...]:
        return (layer.mlp.Wi,)

    def ffn_out_proj(self, layer: nn.Module) -> nn.Linear:
        return layer.mlp.Wo

    def attention_unit(self, layer: nn.Module, shape: ModelShape, unit: int) -> list[Slice]:
        return fused_attention_unit(layer.attn.Wqkv, layer.attn.Wo, shape, unit)

    def ffn_unit(self, layer: nn.Module, neuron: int) -> list[Slice]:
        """A neuron's row of the up half and of the gate half of `Wi` (two parts), its column of `Wo`."""
        wi, width = layer.mlp.Wi, layer.mlp.Wo.in_features
        return [Slice(wi, "out", (neuron,), 0), Slice(wi, "out", (width + neuron,), 1),
                Slice(layer.mlp.Wo, "in", (neuron,))]

    def new_layer(self, config: PretrainedConfig) -> nn.Module:
        """A layer with an input norm (layer 0 has none) and local attention, as most of the model's layers."""
        return ModernBertEncoderLayer(eager_config(config), layer_idx=1)

    def tiny_config(self) -> PretrainedConfig:
        return ModernBertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=160, num_labels=2,
                                global_attn_every_n_layers=3, local_attention=16, pad_token_id=0, bos_token_id=1,
                                cls_token_id=1, eos_token_id=2, sep_token_id=2)
