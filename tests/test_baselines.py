"""Uniform magnitude pruning: one structure for every layer, the largest-norm structures kept."""

from __future__ import annotations

import torch

from ziplm.families import ModelStructure, adapter_for
from ziplm.families.loading import build_model
from ziplm.stages.baselines import magnitude_prune, uniform_structure


def test_uniform_structure_is_uniform_and_near_the_target(tiny_table):
    structure = uniform_structure(tiny_table, 1.5)
    assert len(set(structure.layers)) == 1
    dense_ms = tiny_table.predict_ms(ModelStructure.dense(tiny_table.model_shape))
    closest = min(abs(dense_ms / tiny_table.predict_ms(ModelStructure.uniform(tiny_table.model_shape, u, w)) - 1.5)
                  for u in tiny_table.unit_levels for w in tiny_table.ffn_levels)
    assert abs(dense_ms / tiny_table.predict_ms(structure) - 1.5) <= closest + 0.25


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
