"""A FLOPs "latency table": what the search would believe if it counted multiply-adds instead of measuring.

It has the levels of a measured table and the same interface, so the search and the closed loop run on it
unchanged; only the costs differ. Each level's cost is its FLOPs per forward pass, scaled so that the dense model's
prediction equals the measured table's dense prediction (the targets then mean the same thing). Used by the
ablation in benchmarks/accuracy_vs_speedup.py: what measuring in the runtime is worth.

FLOPs per layer, batch b, sequence s, hidden d, head_dim h, kv heads per unit r (multiply-add = 2 FLOPs):
    attention unit: 2bs*d*h*(2r + 2)   Q and O for r heads, K and V once per unit
                  + 2 * 2bs^2*h*r        scores Q K^T and the weighted sum A V of r heads
    FFN neuron:     2bs*d*2              one row of the up projection, one column of the down projection
    base:           2b*d^2               the pooled head's projection (lookups and norms count as free)
"""

from __future__ import annotations

import dataclasses

from ziplm.families import ModelShape
from ziplm.stages.latency_table import Correction, LatencyTable


def attention_unit_flops(shape: ModelShape, tokens: int, sequence: int) -> float:
    r, h, d = shape.heads_per_unit, shape.head_dim, shape.hidden_size
    return 2 * tokens * d * h * (2 * r + 2) + 4 * tokens * sequence * h * r


def ffn_neuron_flops(shape: ModelShape, tokens: int) -> float:
    return 4 * tokens * shape.hidden_size


def flops_table(measured: LatencyTable) -> LatencyTable:
    """The measured table's levels with FLOPs-proportional costs and no correction."""
    shape = measured.model_shape
    sequence = measured.environment["sequence_length"]
    tokens = measured.environment["batch_size"] * sequence
    attention = [units * attention_unit_flops(shape, tokens, sequence) for units in measured.unit_levels]
    ffn = [width * ffn_neuron_flops(shape, tokens) for width in measured.ffn_levels]
    base = 2 * measured.environment["batch_size"] * shape.hidden_size**2
    dense_flops = base + shape.num_layers * (attention[-1] + ffn[-1])
    ms_per_flop = measured.dense_ms() / dense_flops
    return dataclasses.replace(
        measured,
        fingerprint=f"flops-{measured.fingerprint}",
        attention_ms=[f * ms_per_flop for f in attention],
        ffn_ms=[f * ms_per_flop for f in ffn],
        base_ms=base * ms_per_flop,
        correction=Correction(),
        calibration=[],
        block_p90_ms={},
    )
