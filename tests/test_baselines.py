"""Uniform magnitude pruning: one structure for every layer, the largest-norm structures kept."""

from __future__ import annotations

import pytest
import torch

from ziplm.families import ModelStructure, adapter_for
from ziplm.families.loading import build_model
from ziplm.stages.baselines import drop_layers, magnitude_prune, uniform_structure
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
