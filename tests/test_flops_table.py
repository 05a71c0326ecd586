"""The FLOPs table of the ablation: same levels as the measured table, costs proportional to multiply-adds."""

from __future__ import annotations

import pytest

from ziplm.families import ModelStructure
from ziplm.stages.flops_table import attention_unit_flops, ffn_neuron_flops, flops_table


def test_flops_table_matches_dense_and_scales_linearly(tiny_table):
    table = flops_table(tiny_table)
    shape = table.model_shape
    assert table.unit_levels == tiny_table.unit_levels and table.ffn_levels == tiny_table.ffn_levels
    assert table.dense_ms() == pytest.approx(tiny_table.dense_ms())
    assert table.attention_ms[0] == 0.0 and table.ffn_ms[0] == 0.0
    # costs are linear in what is kept: half the FFN width costs half
    half = table.ffn_levels.index(shape.ffn_size // 2)
    assert table.ffn_ms[half] == pytest.approx(table.ffn_ms[-1] / 2)
    assert 1.0 < table.max_speedup() < float("inf")
    one_unit_each = ModelStructure.uniform(shape, 1, 0)
    tokens = table.environment["batch_size"] * table.environment["sequence_length"]
    ratio = attention_unit_flops(shape, tokens, table.environment["sequence_length"]) / ffn_neuron_flops(shape, tokens)
    assert (table.predict_ms(one_unit_each) - table.base_ms) / shape.num_layers == pytest.approx(
        table.ffn_ms[1] / table.ffn_levels[1] * ratio)
