"""What the conformance test cannot see of the BERT-like families: RoBERTa's position ids follow the padding index in
the exported graph for every model type it serves, ELECTRA's fixture keeps its embedding width apart from the
hidden size, and DistilBERT's shrunk or removed modules compute what the dense layer computes without them."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import CamembertConfig, RobertaConfig, XLMRobertaConfig

from ziplm.families import ModelStructure, adapter_for
from ziplm.families.bert import TINY_SIZES
from ziplm.families.distilbert import DistilBertAdapter
from ziplm.families.electra import ElectraAdapter
from ziplm.families.loading import build_model
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
