"""The harness that runs Torch-Pruning on our models (benchmarks.torch_pruning_peer): the structure it plans at a
ratio is the one pruning leaves, only heads and FFN neurons go, and the pruned model runs and exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from benchmarks.torch_pruning_peer import PeerConfig, predicted_speedup, prune_to_speedup
from tests.conftest import toy_task
from ziplm.families import ModelStructure, adapter_for
from ziplm.families.base import recorded_structure
from ziplm.families.loading import build_model
from ziplm.stages.export import export_model, verify_export

TASK = toy_task(64)


def kept_structure(model: torch.nn.Module) -> ModelStructure:
    """Heads and FFN width per layer, read off the weights."""
    adapter = adapter_for(model.config)
    shape = adapter.shape(model.config)
    layers = adapter.layers(model)
    return ModelStructure.from_json({
        "units": [adapter.attention_in_projs(layer)[0].out_features // shape.head_dim for layer in layers],
        "ffn": [adapter.ffn_in_projs(layer)[0].out_features for layer in layers]})


@pytest.mark.parametrize("config", [PeerConfig("magnitude", "global"), PeerConfig("magnitude", "uniform"),
                                    PeerConfig("taylor", "global"), PeerConfig("hessian", "uniform")],
                         ids=lambda c: c.name)
def test_torch_pruning_lands_near_the_target_and_leaves_the_structure_it_planned(
        config: PeerConfig, tiny_config, tiny_table, tiny_bert_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    dense = build_model(tiny_config).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    shape = adapter_for(tiny_config).shape(tiny_config)
    half = ModelStructure.uniform(shape, shape.num_units // 2, shape.ffn_size // 2)
    target = predicted_speedup(tiny_table, half)
    example = TASK.encode(tokenizer, TASK.validation[:1])

    pruned = prune_to_speedup(dense, config, target, tiny_table, TASK, tokenizer, TASK.calibration, example)

    assert kept_structure(pruned.model) == pruned.structure == recorded_structure(pruned.model.config)
    assert pruned.predicted_speedup == pytest.approx(target, rel=0.15)  # ratio steps are whole heads on 4 heads
    assert pruned.structure != ModelStructure.dense(shape)
    if config.scope == "uniform":
        assert len(set(pruned.structure.layers)) == 1
    dense_state = dense.state_dict()
    for name, tensor in pruned.model.state_dict().items():  # the residual width and embeddings stay whole
        if "embeddings" in name or "LayerNorm" in name or "classifier" in name or "pooler" in name:
            assert torch.equal(tensor, dense_state[name]), name
    assert sum(p.numel() for p in dense.parameters()) > sum(p.numel() for p in pruned.model.parameters())
    onnx = export_model(pruned.model, tmp_path / "peer.onnx", 1, 16)
    assert not verify_export(pruned.model, onnx).failures
