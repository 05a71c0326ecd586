"""Every registered model family, run through what the pipeline does with it: shrink unevenly, remove modules, reload
from a folder, export to ONNX with parity on a padded batch, and build latency-table blocks. A family is covered by
registering its adapter (whose `tiny_config` is its fixture); nothing here names a family.

The grouped-query attention path of the generic adapter (a unit is one KV head with its group of query heads) is
checked on a real Llama attention module, whose output must equal the dense one with the removed groups' heads cut
out of the output projection."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from ziplm.families import FamilyAdapter, LayerStructure, ModelShape, ModelStructure, adapter_for
from ziplm.families.loading import build_model, load_model, save_model
from ziplm.families.registry import _FAMILIES
from ziplm.runtimes import InferenceEnv
from ziplm.stages.export import export_model, verify_export
from ziplm.stages.latency_table import export_block

ADAPTERS = sorted({adapter.name: adapter for adapter in _FAMILIES.values()}.items())


@pytest.fixture(params=[adapter for _, adapter in ADAPTERS], ids=[name for name, _ in ADAPTERS])
def family(request) -> tuple[FamilyAdapter, PretrainedConfig, ModelShape]:
    adapter = request.param
    config = adapter.tiny_config()
    return adapter, config, adapter.shape(config)


def uneven(shape: ModelShape) -> ModelStructure:
    """Each layer different: one keeps a unit and half the FFN, one loses its attention, one its FFN (then repeat)."""
    options = [LayerStructure(1, shape.ffn_size // 2), LayerStructure(0, shape.ffn_size),
               LayerStructure(shape.num_units, 0)]
    return ModelStructure(tuple(options[i % 3] for i in range(shape.num_layers)))


def test_every_family_has_a_tiny_fixture_that_can_be_shrunk_unevenly(family):
    adapter, config, shape = family
    assert adapter_for(config) is adapter
    assert shape.num_layers >= 3 and shape.num_units >= 2 and shape.ffn_size >= 64


def test_a_shrunk_model_runs_reloads_and_exports_with_parity(family, tmp_path):
    adapter, config, shape = family
    structure = uneven(shape)
    torch.manual_seed(0)
    model = build_model(config, structure=structure)
    assert adapter.structure(model.config) == structure
    for layer, kept in zip(adapter.layers(model), structure.layers):
        assert adapter.has_attention(layer) == (kept.units > 0) and adapter.has_ffn(layer) == (kept.ffn > 0)
    save_model(model, tmp_path / "member")
    assert json.loads((tmp_path / "member" / "config.json").read_text())["ziplm_structure"] == structure.to_json()
    reloaded = load_model(str(tmp_path / "member"))
    example = {k: torch.from_numpy(v) for k, v in adapter.example_inputs(config, 2, 12).items()}
    with torch.no_grad():
        assert torch.equal(model(**example).logits, reloaded(**example).logits)
    onnx_path = export_model(reloaded, tmp_path / "member.onnx")
    report = verify_export(reloaded, onnx_path, atol=1e-4)  # batch 2 has a padded row
    assert report.max_abs_diff <= 1e-4 and len(report.checked_shapes) >= 2
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(adapter.input_names(config))


@pytest.mark.parametrize("kept", [(2, 0), (0, 64), (1, 32), (0, 0)], ids=["attention", "ffn", "both", "empty"])
def test_latency_table_blocks_build_and_run(family, tmp_path, kept):
    adapter, config, shape = family
    structure = LayerStructure(min(kept[0], shape.num_units), min(kept[1], shape.ffn_size))
    env = InferenceEnv(threads=1, sequence_length=16)
    path = export_block(adapter, config, structure, env, tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = adapter.block_inputs(config, 1, 16)
    (output,) = session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})
    assert output.shape == (1, 16, shape.hidden_size) and np.isfinite(output).all()


# --- grouped-query attention ------------------------------------------------------------------------------------------
class GroupedQueryAttention(FamilyAdapter):
    """Just enough of a Llama-style adapter to shrink one attention module holder (`layer.self_attn`) by KV groups."""

    name = "gqa-test"
    model_types = ()

    def shape(self, config):
        head_dim = config.hidden_size // config.num_attention_heads
        return ModelShape("gqa-test", config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                          config.num_key_value_heads, head_dim, config.intermediate_size, config.vocab_size)

    def layers(self, model):
        return model.layers

    def attention_in_projs(self, layer):
        return layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj

    def attention_out_proj(self, layer):
        return layer.self_attn.o_proj

    def ffn_in_projs(self, layer):
        return ()

    def ffn_out_proj(self, layer):
        raise AssertionError("this test adapter has no FFN")

    def remove_attention(self, layer):
        raise AssertionError("this test shrinks attention, it does not remove it")

    remove_ffn = remove_attention

    def has_attention(self, layer):
        return True

    def has_ffn(self, layer):
        return False

    def new_layer(self, config):
        holder = nn.Module()
        holder.self_attn = LlamaAttention(config, layer_idx=0)
        return holder

    def run_layer(self, layer, **block_inputs):
        return layer.self_attn(**block_inputs)[0]

    def tiny_config(self):
        config = LlamaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=1, num_attention_heads=6,
                             num_key_value_heads=3, intermediate_size=64, max_position_embeddings=64)
        config._attn_implementation = "eager"
        return config


def test_a_grouped_query_unit_is_one_kv_head_with_its_query_heads():
    adapter = GroupedQueryAttention()
    config = adapter.tiny_config()
    shape = adapter.shape(config)
    assert (shape.num_units, shape.heads_per_unit, shape.head_dim) == (3, 2, 8)
    assert list(adapter.unit_columns(shape, 1)) == list(range(16, 32)) and list(adapter.kv_rows(shape, 1)) == list(
        range(8, 16))
    torch.manual_seed(0)
    layer = adapter.new_layer(config).eval()
    x = torch.randn(2, 5, config.hidden_size)
    rotary = LlamaRotaryEmbedding(config)
    inputs = {"hidden_states": x, "position_embeddings": rotary(x, torch.arange(5)[None].expand(2, 5)),
              "attention_mask": None}
    with torch.no_grad():
        reference = nn.Module()
        reference.self_attn = LlamaAttention(config, layer_idx=0).eval()
        reference.self_attn.load_state_dict(layer.self_attn.state_dict())
        reference.self_attn.o_proj.weight[:, 16:32] = 0.0  # unit 1 (query heads 2 and 3, KV head 1) contributes 0
        expected = adapter.run_layer(reference, **inputs)
        adapter.shrink_attention(layer, shape, [2, 0])  # kept in this order: the pairing of heads must follow
        actual = adapter.run_layer(layer, **inputs)
    attention = layer.self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features,
            attention.o_proj.in_features) == (32, 16, 16, 32)
    assert torch.allclose(actual, expected, atol=1e-5)
