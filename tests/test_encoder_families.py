"""What the conformance test cannot see of the BERT-like families: RoBERTa's position ids follow the padding index in
the exported graph for every model type it serves, ELECTRA's fixture keeps its embedding width apart from the
hidden size, DistilBERT's shrunk or removed modules compute what the dense layer computes without them, and MPNet's
pruned layers read their own heads' rows of the shared relative position bias."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import CamembertConfig, RobertaConfig, XLMRobertaConfig

from ziplm.families import ModelStructure, adapter_for
from ziplm.families.bert import TINY_SIZES
from ziplm.families.distilbert import DistilBertAdapter
from ziplm.families.electra import ElectraAdapter
from ziplm.families.base import record_structure
from ziplm.families.loading import build_model, load_model, save_model
from ziplm.families.mpnet import MPNetAdapter
from ziplm.families.roberta import RobertaAdapter
from ziplm.stages.export import export_model


@pytest.mark.parametrize("config_class", [RobertaConfig, XLMRobertaConfig, CamembertConfig],
                         ids=["roberta", "xlm-roberta", "camembert"])
def test_roberta_models_export_position_ids_that_follow_the_padding(config_class, tmp_path):
    """A tokenizer pads with pad_token_id, whose position is the padding index; the graph must compute positions from
    the ids it is fed (a row padded at another length gets other positions), not keep the traced ones."""
    config = config_class(**TINY_SIZES, type_vocab_size=1, max_position_embeddings=66)
    adapter = adapter_for(config)
    assert isinstance(adapter, RobertaAdapter) and adapter.input_names(config) == ("input_ids", "attention_mask")
    shape = adapter.shape(config)
    torch.manual_seed(0)
    model = build_model(config, structure=ModelStructure.uniform(shape, 2, 64))
    onnx_path = export_model(model, tmp_path / "model.onnx", 2, 20)
    ids = torch.randint(config.pad_token_id + 1, config.vocab_size, (3, 16))
    mask = torch.ones_like(ids)
    for row, length in ((1, 9), (2, 4)):
        ids[row, length:], mask[row, length:] = config.pad_token_id, 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits.numpy()
        alone = model(input_ids=ids[2:, :4]).logits.numpy()  # the short row unpadded: same positions, same logits
    assert np.abs(actual - expected).max() <= 1e-4 and np.abs(expected[2:] - alone).max() <= 1e-4


def test_electra_fixture_has_embeddings_narrower_than_its_layers():
    """So the conformance test runs ELECTRA through its embedding projection (embedding_size -> hidden_size)."""
    adapter = ElectraAdapter()
    config = adapter.tiny_config()
    assert config.embedding_size < adapter.shape(config).hidden_size
    assert "embeddings_project" not in " ".join(adapter.prunable_linears(build_model(config)))


@pytest.fixture
def distilbert_layer() -> tuple[DistilBertAdapter, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A DistilBERT block with random weights and biases (initialisation leaves biases zero), an input and an additive
    attention mask (the last position of one row masked)."""
    adapter = DistilBertAdapter()
    torch.manual_seed(0)
    layer = adapter.layers(build_model(adapter.tiny_config()))[0]
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if name.endswith("bias"):
                parameter.normal_()
    mask = torch.zeros(2, 1, 1, 7)
    mask[1, ..., -1] = torch.finfo(torch.float32).min
    return adapter, layer, torch.randn(2, 7, 64), mask


def test_distilbert_head_pruned_attention_is_the_dense_one_without_those_heads(distilbert_layer):
    adapter, layer, x, mask = distilbert_layer
    shape = adapter.shape(adapter.tiny_config())
    with torch.no_grad():
        adapter.attention_out_proj(layer).weight[:, 16:32] = 0.0  # head 1 contributes nothing
        adapter.attention_out_proj(layer).weight[:, 48:64] = 0.0  # nor head 3
        expected = adapter.run_layer(layer, hidden_states=x, attention_mask=mask)
        adapter.shrink_attention(layer, shape, [2, 0])  # kept in this order: Q, K, V rows must follow
        actual = adapter.run_layer(layer, hidden_states=x, attention_mask=mask)
    assert (layer.attention.n_heads, layer.attention.dim, layer.attention.q_lin.out_features) == (2, 32, 32)
    assert torch.allclose(actual, expected, atol=1e-5)


def test_distilbert_removed_modules_leave_the_output_bias_in_the_residual_norm(distilbert_layer):
    """Level 0 of a post-LN block: sa_layer_norm(x + b_out) after attention, output_layer_norm(h + b_out) after FFN."""
    adapter, layer, x, mask = distilbert_layer
    attention_bias = adapter.attention_out_proj(layer).bias.detach().clone()
    ffn_bias = adapter.ffn_out_proj(layer).bias.detach().clone()
    adapter.shrink_attention(layer, adapter.shape(adapter.tiny_config()), [])
    adapter.shrink_ffn(layer, [])
    assert not (adapter.has_attention(layer) or adapter.has_ffn(layer)) and adapter.layer_linears(layer) == []
    with torch.no_grad():
        h = layer.sa_layer_norm(x + attention_bias)
        assert torch.allclose(adapter.run_layer(layer, hidden_states=x, attention_mask=mask),
                              layer.output_layer_norm(h + ffn_bias))


def test_mpnet_keeps_its_own_heads_rows_of_the_shared_position_bias_through_a_reload(tmp_path):
    """Heads 2 and 0 of layer 1 kept (out of order): the pruned model must equal the dense one with heads 1 and 3's
    columns of that layer's output projection zeroed, which holds only if the layer adds heads 2 and 0's rows of the
    relative position bias that the encoder computes for all heads; and again after a save and reload."""
    adapter = MPNetAdapter()
    config = adapter.tiny_config()
    shape = adapter.shape(config)
    torch.manual_seed(0)
    dense = build_model(config).eval()
    with torch.no_grad():  # initialised at std 0.02, the bias barely moves the outputs: make it matter
        dense.mpnet.encoder.relative_attention_bias.weight.normal_(0.0, 3.0)
    pruned, zeroed = copy.deepcopy(dense), copy.deepcopy(dense)
    adapter.shrink_attention(adapter.layers(pruned)[1], shape, [2, 0])
    with torch.no_grad():
        out_proj = adapter.attention_out_proj(adapter.layers(zeroed)[1])
        for head in (1, 3):
            out_proj.weight[:, adapter.unit_columns(shape, head)] = 0.0
    inputs = {name: torch.from_numpy(value) for name, value in adapter.example_inputs(config, 2, 12).items()}
    with torch.no_grad():
        expected = zeroed(**inputs).logits
        assert torch.allclose(pruned(**inputs).logits, expected, atol=1e-5)
        structure = ModelStructure.from_json({"units": [4, 2, 4], "ffn": [128, 128, 128]})
        record_structure(pruned.config, structure)
        save_model(pruned, tmp_path / "member")
        assert torch.allclose(load_model(str(tmp_path / "member"))(**inputs).logits, expected, atol=1e-5)
