"""Every registered model type, run through what the pipeline does with it: shrink unevenly, remove modules, reload
from a folder, export to ONNX with parity on a padded batch, and build latency-table blocks. A model type is covered
by registering its adapter (whose `tiny_config_of` is its fixture); nothing here names a family.

What pruning must mean in every family is checked against the dense model itself: keeping some attention units and
FFN neurons (out of order) equals the dense model with the others' output-projection columns zeroed, and removing a
module equals zeroing its output projection's weights. Both hold only if every coupled slice (fused parts, KV groups,
shared position biases, the bias or norm a removed module leaves) is cut consistently."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import PretrainedConfig

from ziplm.families import FamilyAdapter, LayerStructure, ModelShape, ModelStructure, adapter_for
from ziplm.families.base import weight_matrix
from ziplm.families.loading import build_model, load_model, load_skeleton, save_model
from ziplm.families.registry import _FAMILIES
from ziplm.runtimes import InferenceEnv
from ziplm.stages.calibrate import layer_sequential_hessians, whole_model_hessians
from ziplm.stages.export import export_model, verify_export
from ziplm.stages.latency_table import export_block

MODEL_TYPES = sorted(_FAMILIES)


@pytest.fixture(params=MODEL_TYPES)
def family(request) -> tuple[FamilyAdapter, PretrainedConfig, ModelShape]:
    adapter = _FAMILIES[request.param]
    config = adapter.tiny_config_of(request.param)
    return adapter, config, adapter.shape(config)


def uneven(shape: ModelShape) -> ModelStructure:
    """Each layer different: one keeps a unit and half the FFN, one loses its attention, one its FFN (then repeat)."""
    options = [LayerStructure(1, shape.ffn_size // 2), LayerStructure(0, shape.ffn_size),
               LayerStructure(shape.num_units, 0)]
    return ModelStructure(tuple(options[i % 3] for i in range(shape.num_layers)))


def test_every_model_type_has_a_tiny_fixture_that_can_be_shrunk_unevenly(family, request):
    adapter, config, shape = family
    assert adapter_for(config) is adapter and config.model_type == request.node.callspec.params["family"]
    assert shape.num_layers >= 3 and shape.num_units >= 2 and shape.ffn_size >= 64


def test_a_shrunk_model_runs_reloads_and_exports_with_parity(family, tmp_path):
    adapter, config, shape = family
    structure = uneven(shape)
    torch.manual_seed(0)
    model = build_model(config, structure=structure)
    assert adapter.structure(model.config) == structure
    for layer, kept in zip(adapter.layers(model), structure.layers):
        assert adapter.has_attention(layer) == (kept.units > 0) and adapter.has_ffn(layer) == (kept.ffn > 0)
    save_model(model, tmp_path / "member")
    assert json.loads((tmp_path / "member" / "config.json").read_text())["ziplm_structure"] == structure.to_json()
    reloaded = load_model(str(tmp_path / "member"))
    example = {k: torch.from_numpy(v) for k, v in adapter.example_inputs(config, 2, 12).items()}
    with torch.no_grad():
        assert torch.equal(model(**example).logits, reloaded(**example).logits)
    onnx_path = export_model(reloaded, tmp_path / "member.onnx")
    report = verify_export(reloaded, onnx_path, atol=1e-4)  # batch 2 has a padded row
    assert report.max_abs_diff <= 1e-4 and len(report.checked_shapes) >= 2
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(adapter.input_names(config))


@pytest.mark.parametrize("kept", [(2, 0), (0, 64), (1, 32), (0, 0)], ids=["attention", "ffn", "both", "empty"])
def test_latency_table_blocks_build_and_run(family, tmp_path, kept):
    adapter, config, shape = family
    structure = LayerStructure(min(kept[0], shape.num_units), min(kept[1], shape.ffn_size))
    env = InferenceEnv(threads=1, sequence_length=16)
    path = export_block(adapter, config, structure, env, tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = adapter.block_inputs(config, 1, 16)
    (output,) = session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})
    assert output.shape == (1, 16, shape.hidden_size) and np.isfinite(output).all()


def test_layer_sequential_calibration_of_a_saved_model_equals_the_whole_model(family, tmp_path):
    """A shrunk model saved, loaded as a skeleton (no layer weights in memory) and calibrated one layer at a time gives
    the Hessians and stream energies of the whole model run batch by batch, to the bit; each layer's weights are
    dropped again after it ran."""
    adapter, config, shape = family
    torch.manual_seed(0)
    model = build_model(config, structure=uneven(shape))
    save_model(model, tmp_path / "member")
    example = adapter.example_inputs(config, 2, 12)
    example["attention_mask"][1, 8:] = 0  # a padded row
    batches = [{name: torch.from_numpy(value) for name, value in example.items()}] * 2
    whole = whole_model_hessians(model, adapter, batches, progress=lambda _: None)
    skeleton, layers = load_skeleton(str(tmp_path / "member"))
    assert all(parameter.is_meta for layer in adapter.layers(skeleton) for parameter in layer.parameters())
    sequential = list(layer_sequential_hessians(skeleton, adapter, batches, progress=lambda _: None, weights=layers))
    assert all(parameter.is_meta for layer in adapter.layers(skeleton) for parameter in layer.parameters())
    for a, b in zip(whole, sequential, strict=True):
        assert (a.tokens, a.stream_in, a.stream_out) == (b.tokens, b.stream_in, b.stream_out) and a.tokens == 2 * 20
        for H_whole, H_sequential in ((a.attention, b.attention), (a.ffn, b.ffn)):
            assert (H_whole is None and H_sequential is None) or torch.equal(H_whole, H_sequential)
    assert sum(layer.attention is None or layer.ffn is None for layer in sequential) >= 2  # removed modules: none


def test_kept_units_and_neurons_equal_the_dense_model_with_the_others_zeroed(family):
    """Layer 1 keeps its last and first attention units (in that order) and three FFN neurons out of order."""
    adapter, config, shape = family
    dense = random_model(config)
    pruned, zeroed = copy.deepcopy(dense), copy.deepcopy(dense)
    kept_units, kept_neurons = [shape.num_units - 1, 0], [shape.ffn_size - 1, 5, 17]
    adapter.shrink_attention(adapter.layers(pruned)[1], shape, kept_units)
    adapter.shrink_ffn(adapter.layers(pruned)[1], kept_neurons)
    layer = adapter.layers(zeroed)[1]
    with torch.no_grad():
        for unit in set(range(shape.num_units)) - set(kept_units):
            weight_matrix(adapter.attention_out_proj(layer))[:, adapter.unit_columns(shape, unit)] = 0.0
        dropped = [n for n in range(shape.ffn_size) if n not in kept_neurons]
        weight_matrix(adapter.ffn_out_proj(layer))[:, dropped] = 0.0
    assert weight_matrix(adapter.attention_out_proj(adapter.layers(pruned)[1])).shape[1] == 2 * shape.head_dim * (
        shape.heads_per_unit)
    assert_same_outputs(adapter, config, pruned, zeroed)


def test_a_removed_module_equals_its_output_projection_zeroed(family):
    """Layer 0 loses its attention and layer 1 its FFN: what remains of them (an output bias, a norm) must keep the
    model exactly where zeroing those modules' output weights puts it."""
    adapter, config, shape = family
    dense = random_model(config)
    removed, zeroed = copy.deepcopy(dense), copy.deepcopy(dense)
    adapter.remove_attention(adapter.layers(removed)[0])
    adapter.remove_ffn(adapter.layers(removed)[1])
    with torch.no_grad():
        weight_matrix(adapter.attention_out_proj(adapter.layers(zeroed)[0])).zero_()
        weight_matrix(adapter.ffn_out_proj(adapter.layers(zeroed)[1])).zero_()
    assert not adapter.has_attention(adapter.layers(removed)[0]) and not adapter.has_ffn(adapter.layers(removed)[1])
    assert_same_outputs(adapter, config, removed, zeroed)


def random_model(config: PretrainedConfig) -> torch.nn.Module:
    """A model of `config` whose biases are random too (initialisation zeroes many), so that what a removed module
    leaves of its bias shows."""
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
    return model


def assert_same_outputs(adapter: FamilyAdapter, config: PretrainedConfig, actual: torch.nn.Module,
                        expected: torch.nn.Module) -> None:
    example = adapter.example_inputs(config, 2, 12)
    example["attention_mask"][1, 8:] = 0  # a padded row
    inputs = {name: torch.from_numpy(value) for name, value in example.items()}
    with torch.no_grad():
        assert torch.allclose(actual(**inputs).logits, expected(**inputs).logits, atol=1e-5)
