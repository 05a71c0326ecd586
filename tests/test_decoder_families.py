"""What the conformance test cannot see of the pre-norm and decoder families: a layer that loses both modules is the
residual stream plus its output biases and keeps no norm; decoder blocks are timed under a causal mask; a grouped-query
unit is one KV head with its query heads; a decoder's logits keep one row per position at any sequence length."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ziplm.families import ModelStructure, adapter_for
from ziplm.families.gpt2 import GPT2Adapter
from ziplm.families.llama import LlamaAdapter
from ziplm.families.loading import build_model
from ziplm.families.modernbert import ModernBertAdapter
from ziplm.runtimes import InferenceEnv
from ziplm.stages.export import export_model
from ziplm.stages.latency_table import export_block

PRE_NORM = [ModernBertAdapter(), GPT2Adapter(), LlamaAdapter()]
DECODERS = [GPT2Adapter(), LlamaAdapter()]


@pytest.mark.parametrize("adapter", PRE_NORM, ids=lambda adapter: adapter.name)
def test_a_pre_norm_layer_without_its_modules_adds_only_their_output_biases(adapter):
    config = adapter.tiny_config()
    torch.manual_seed(0)
    layer = adapter.new_layer(config).eval()
    biases = [proj.bias for proj in (adapter.attention_out_proj(layer), adapter.ffn_out_proj(layer))
              if proj.bias is not None]
    inputs = {name: torch.from_numpy(value) for name, value in adapter.block_inputs(config, 1, 8).items()}
    adapter.remove_attention(layer)
    adapter.remove_ffn(layer)
    with torch.no_grad():
        expected = inputs["hidden_states"] + sum(biases, torch.zeros(config.hidden_size))
        output = adapter.run_layer(layer, **inputs)
    assert torch.allclose(output[0] if isinstance(output, tuple) else output, expected, atol=1e-6)
    assert sorted(name.split(".")[-1] for name, _ in layer.named_parameters()) == ["bias"] * len(biases)


@pytest.mark.parametrize("adapter", DECODERS, ids=lambda adapter: adapter.name)
def test_a_decoder_block_is_timed_under_a_causal_mask(adapter, tmp_path):
    """Changing the last position's input must leave every earlier position's output as it was."""
    config = adapter.tiny_config()
    path = export_block(adapter, config, adapter.structure(config).layers[0], InferenceEnv(threads=1,
                                                                                            sequence_length=10),
                        tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = adapter.block_inputs(config, 1, 10)
    changed = {**inputs, "hidden_states": inputs["hidden_states"].copy()}
    changed["hidden_states"][0, -1] += 1.0
    (before,), (after,) = session.run(None, inputs), session.run(None, changed)
    assert np.allclose(before[0, :-1], after[0, :-1], atol=1e-6) and not np.allclose(before[0, -1], after[0, -1])


def test_a_llama_unit_is_one_kv_head_with_its_group_of_query_heads():
    adapter = LlamaAdapter()
    config = adapter.tiny_config()
    shape = adapter.shape(config)
    assert (shape.num_units, shape.heads_per_unit, shape.head_dim) == (3, 2, 8)
    layer = adapter.new_layer(config)
    adapter.shrink_attention(layer, shape, [2, 0])
    q, k, v = adapter.attention_in_projs(layer)
    assert (q.out_features, k.out_features, v.out_features, adapter.attention_out_proj(layer).in_features) == (
        32, 16, 16, 32)


def test_a_decoder_exports_logits_for_every_position_at_any_sequence_length(tmp_path):
    adapter = GPT2Adapter()
    config = adapter.tiny_config()
    torch.manual_seed(0)
    model = build_model(config, structure=ModelStructure.uniform(adapter.shape(config), 2, 64))
    assert isinstance(adapter_for(model.config), GPT2Adapter) and type(model).__name__ == "GPT2LMHeadModel"
    session = ort.InferenceSession(str(export_model(model, tmp_path / "model.onnx", 1, 16)),
                                   providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, adapter.example_inputs(config, 2, 7))
    assert logits.shape == (2, 7, config.vocab_size)
    assert [dim if isinstance(dim, str) else "fixed" for dim in session.get_outputs()[0].shape][:2] == [
        "batch", "sequence"]
