"""Uniform magnitude pruning: one structure for every layer, the largest-norm structures kept. Layer dropping: the
first layers kept, or the layers of least block influence removed."""

from __future__ import annotations

import pytest
import torch

from transformers import AutoTokenizer

from tests.test_causal_lm import spec, write_texts, write_tiny_decoder
from ziplm.families import LayerStructure, ModelStructure, adapter_for
from ziplm.families.loading import build_model
from ziplm.stages.baselines import (block_influence, drop_layers, influence_structure, magnitude_prune,
                                    remove_modules, uniform_structure)
from ziplm.tasks import load_task
from ziplm.stages.export import export_model, verify_export


def test_uniform_structure_hits_a_reachable_target_exactly(tiny_table):
    shape = tiny_table.model_shape
    half = ModelStructure.uniform(shape, shape.num_units // 2, shape.ffn_size // 2)  # a candidate (fraction 0.5)
    target = tiny_table.dense_ms() / tiny_table.predict_ms(half)
    structure = uniform_structure(tiny_table, target)
    assert len(set(structure.layers)) == 1
    assert tiny_table.predict_ms(structure) == pytest.approx(tiny_table.predict_ms(half))


def test_magnitude_prune_keeps_the_largest_heads(tiny_config):
    torch.manual_seed(0)
    dense = build_model(tiny_config)
    adapter = adapter_for(tiny_config)
    layer = adapter.layers(dense)[0]
    with torch.no_grad():
        adapter.attention_out_proj(layer).weight[:, 32:48] *= 100.0  # unit 2 is by far the largest
    pruned = magnitude_prune(dense, adapter, ModelStructure.uniform(adapter.shape(tiny_config), 1, 32))
    kept = adapter.attention_out_proj(adapter.layers(pruned)[0]).weight
    assert torch.equal(kept, adapter.attention_out_proj(layer).weight[:, 32:48])
    assert adapter.ffn_out_proj(adapter.layers(pruned)[2]).weight.shape == (64, 32)


def test_drop_layers_keeps_the_first_layers_and_runs(tiny_config, tmp_path):
    torch.manual_seed(0)
    dense = build_model(tiny_config)
    adapter = adapter_for(tiny_config)
    dropped = drop_layers(dense, adapter, 2)
    assert adapter.shape(dropped.config).num_layers == 2 and len(adapter.layers(dense)) == 3
    for kept, original in zip(adapter.layers(dropped), adapter.layers(dense)):
        assert torch.equal(adapter.ffn_out_proj(kept).weight, adapter.ffn_out_proj(original).weight)
    verify_export(dropped, export_model(dropped, tmp_path / "dropped.onnx", 1, 16))
    with pytest.raises(ValueError, match="1..3"):
        drop_layers(dense, adapter, 0)


def test_a_layer_that_leaves_the_residual_stream_as_it_is_has_no_block_influence(tmp_path):
    decoder = write_tiny_decoder(tmp_path / "decoder")
    task, model = load_task(spec(write_texts(tmp_path / "texts"))).adopt(str(decoder))
    adapter = adapter_for(model.config)
    tokenizer = AutoTokenizer.from_pretrained(decoder)
    before = block_influence(model, adapter, tokenizer, task, samples=8)
    passthrough = remove_modules(model, adapter, ModelStructure((LayerStructure(3, 64), LayerStructure(0, 0),
                                                                 LayerStructure(3, 64))))
    after = block_influence(passthrough, adapter, tokenizer, task, samples=8)
    assert min(before) > 1e-3 and after[1] == pytest.approx(0.0, abs=1e-6)
    assert after[0] == pytest.approx(before[0], abs=1e-6)  # the layers before it see the same inputs


def test_the_layers_of_least_influence_go_first(tiny_table):
    shape = tiny_table.model_shape
    full, gone = LayerStructure(shape.num_units, shape.ffn_size), LayerStructure(0, 0)
    one_dropped = ModelStructure((full, gone, full))
    target = tiny_table.dense_ms() / tiny_table.predict_ms(one_dropped)
    assert influence_structure(tiny_table, [0.3, 0.1, 0.2], target) == one_dropped
    assert influence_structure(tiny_table, [0.3, 0.1, 0.2], 1.0) == ModelStructure.dense(shape)
