"""Shrinking layers through the family adapter: shapes, reload from a folder, ONNX parity, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AlbertConfig, T5Config

from ziplm.families import LayerStructure, ModelStructure, adapter_for
from ziplm.families.base import recorded_structure
from ziplm.families.loading import build_model, load_model, save_model
from ziplm.errors import BadInputError
from ziplm.stages.export import ExportParityError, export_model, verify_export

UNEVEN = ModelStructure((LayerStructure(2, 64), LayerStructure(0, 32), LayerStructure(4, 0)))


def test_shape_of_bert(tiny_config):
    shape = adapter_for(tiny_config).shape(tiny_config)
    assert (shape.num_layers, shape.num_units, shape.head_dim, shape.ffn_size) == (3, 4, 16, 128)


def test_shrink_keeps_the_chosen_heads_and_neurons(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config)
    adapter = adapter_for(tiny_config)
    layer = adapter.layers(model)[0]
    query_before = layer.attention.self.query.weight.detach().clone()
    out_before = layer.attention.output.dense.weight.detach().clone()
    fc2_before = layer.output.dense.weight.detach().clone()
    shape = adapter.shape(tiny_config)

    adapter.shrink_attention(layer, shape, [3, 1])
    adapter.shrink_ffn(layer, [5, 7, 100])

    assert torch.equal(layer.attention.self.query.weight, torch.cat([query_before[48:64], query_before[16:32]]))
    assert torch.equal(layer.attention.output.dense.weight, torch.cat([out_before[:, 48:64], out_before[:, 16:32]], 1))
    assert torch.equal(layer.output.dense.weight, fc2_before[:, [5, 7, 100]])
    assert layer.attention.self.num_attention_heads == 2


def test_removed_module_leaves_residual_and_norm(tiny_config):
    """Level 0 of a post-LN block: output = LayerNorm(x + b_out)."""
    model = build_model(tiny_config)
    adapter = adapter_for(tiny_config)
    layer = adapter.layers(model)[0]
    bias, norm = layer.output.dense.bias.detach().clone(), layer.output.LayerNorm
    adapter.shrink_ffn(layer, [])
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.allclose(layer.feed_forward_chunk(x), norm(x + bias))


@pytest.mark.parametrize("all_removed", [False, True], ids=["uneven-with-removed-modules", "every-module-removed"])
def test_shrunken_model_reloads_and_matches_its_onnx_export(tiny_config, tmp_path, all_removed):
    structure = ModelStructure.uniform(adapter_for(tiny_config).shape(tiny_config), 0, 0) if all_removed else UNEVEN
    torch.manual_seed(0)
    model = build_model(tiny_config, structure=structure)
    save_model(model, tmp_path / "member")
    assert json.loads((tmp_path / "member" / "config.json").read_text())["ziplm_structure"] == structure.to_json()

    reloaded = load_model(str(tmp_path / "member"))
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)

    onnx_path = export_model(reloaded, tmp_path / "member" / "model.onnx")
    report = verify_export(reloaded, onnx_path, atol=1e-4)
    assert report.max_abs_diff <= 1e-4
    assert len(report.checked_shapes) >= 2


def test_export_leaves_the_model_in_eval_mode(tiny_config, tmp_path):
    """The exporter restores the training flag of the module it is given: exporting must not turn dropout on."""
    torch.manual_seed(0)
    model = build_model(tiny_config)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        export_model(model, tmp_path / "model.onnx")
        assert not any(module.training for module in model.modules())
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("against_float64", [False, True], ids=["absolute", "against float64"])
def test_parity_check_catches_a_mismatch(tiny_config, tmp_path, against_float64):
    model = build_model(tiny_config, structure=UNEVEN)
    onnx_path = export_model(model, tmp_path / "model.onnx")
    assert verify_export(model, onnx_path, against_float64=against_float64).fp32_error < 1e-5
    with torch.no_grad():
        model.classifier.bias += 1e-3
    with pytest.raises(ExportParityError, match="does not match PyTorch"):
        verify_export(model, onnx_path, against_float64=against_float64)


def test_structure_outside_the_model_is_rejected(tiny_config):
    model = build_model(tiny_config)
    too_wide = ModelStructure.uniform(adapter_for(tiny_config).shape(tiny_config), 5, 128)
    with pytest.raises(BadInputError, match="outside 0..4 units"):
        adapter_for(tiny_config).apply_structure(model, too_wide)
    with pytest.raises(BadInputError, match="lists 1 layers; the model has 3"):
        adapter_for(tiny_config).apply_structure(model, ModelStructure((LayerStructure(1, 1),)))


@pytest.mark.parametrize("config", [T5Config(), AlbertConfig()], ids=["t5", "albert"])
def test_unsupported_architecture_names_the_supported_ones(config):
    """ALBERT looks BERT-like but shares one layer's weights across all layers: it is refused like any other."""
    with pytest.raises(BadInputError, match=rf"unsupported architecture '{config.model_type}'.*supported model types: "
                                            r"bert, .*distilbert, electra, .*roberta"):
        adapter_for(config)


def test_building_a_shrunk_model_leaves_the_given_config_alone(tiny_config):
    """A latency table builds shrunk copies from a real model's config; the real model must stay dense."""
    adapter = adapter_for(tiny_config)
    shrunk = build_model(tiny_config, structure=ModelStructure.uniform(adapter.shape(tiny_config), 1, 32))
    assert recorded_structure(tiny_config) is None
    assert adapter.structure(shrunk.config) == ModelStructure.uniform(adapter.shape(tiny_config), 1, 32)


def test_prunable_linears_are_the_projections_of_modules_still_present(tiny_config):
    model = build_model(tiny_config, structure=UNEVEN)  # layer 1 has no attention, layer 2 no FFN
    names = list(adapter_for(tiny_config).prunable_linears(model))
    assert len(names) == 6 + 2 + 4
    assert "bert.encoder.layer.0.attention.self.query" in names and "bert.encoder.layer.0.output.dense" in names
    assert not any(n.startswith(("bert.encoder.layer.1.attention", "bert.encoder.layer.2.output",
                                 "bert.encoder.layer.2.intermediate")) for n in names)
    assert not any("embeddings" in n or "pooler" in n or "classifier" in n for n in names)
