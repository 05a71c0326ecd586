"""INT8 fake-quant: the math, preparing and training a model, calibration, ONNX integer kernels, save and reload."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import toy_task
from ziplm.errors import BadInputError
from ziplm.families import LayerStructure, ModelStructure, adapter_for
from ziplm.families import loading
from ziplm.families.loading import build_model, save_model
from ziplm.runtimes import InferenceEnv, get_runtime
from ziplm.stages import quantize as q
from ziplm.stages.export import export_model, parity_atol, verify_export
from ziplm.stages.quantize import load_model

UNEVEN = ModelStructure((LayerStructure(2, 64), LayerStructure(0, 32), LayerStructure(4, 0)))
INTEGER_OPS = {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "QAttention", "DynamicQuantizeMatMul"}


def random_batches(config, count: int = 3) -> list[dict[str, torch.Tensor]]:
    adapter = adapter_for(config)
    return [{k: torch.from_numpy(v) for k, v in adapter.example_inputs(config, 4, 24, seed=i).items()}
            for i in range(count)]


def quantized_model(config, structure: ModelStructure | None = None):
    torch.manual_seed(0)
    model = build_model(config, structure=structure)
    q.prepare_qat(model, adapter_for(config))
    q.calibrate(model, random_batches(config))
    return model


# --- the math --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qmax", [127, 63])
def test_weight_fake_quant_is_symmetric_per_channel_and_keeps_zeros(qmax):
    torch.manual_seed(0)
    W = torch.randn(6, 10) * torch.arange(1, 7).unsqueeze(1)  # rows of very different ranges
    W[2, 3] = W[4, :] = 0.0
    s = q.weight_scale(W, qmax)
    Wq = q.fake_quant_weight(W, s)
    assert torch.allclose(s[:4], W[:4].abs().amax(1) / qmax)
    assert Wq[2, 3] == 0 and torch.all(Wq[4] == 0)
    assert torch.all((W - Wq).abs() <= s.unsqueeze(1) / 2 + 1e-7)  # round to nearest: half a step per channel
    assert torch.allclose(Wq.abs().amax(1)[:4], W.abs().amax(1)[:4])  # the largest weight is exactly representable
    integers = Wq / s.unsqueeze(1)
    assert torch.allclose(integers, torch.round(integers), atol=1e-4)  # on the integer grid
    assert integers.abs().max() <= qmax + 1e-4  # 7-bit weights stay where 16-bit pair sums cannot saturate


@pytest.mark.parametrize("flags, bits", [("avx avx2 fma", 7), ("avx avx2 fma avx512f avx512_vnni", 8),
                                         ("avx avx2 avx_vnni", 8), ("fp asimd asimddp", 8)])
def test_weights_default_to_7_bits_where_the_integer_kernels_saturate(flags, bits, tiny_config, tmp_path,
                                                                       monkeypatch):
    from ziplm.runtimes import base

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(base, "CPUINFO", cpuinfo)
    settings = q.QuantSettings()
    assert settings.weight_bits == bits and settings.weight_qmax == 2 ** (bits - 1) - 1
    assert q.QuantSettings(weight_bits=8).weight_bits == 8  # a recipe may choose either
    model = build_model(tiny_config)
    quants = q.prepare_qat(model, adapter_for(tiny_config), settings)
    assert {quant.weight_qmax for quant in quants.values()} == {settings.weight_qmax}
    recorded = q.recorded_quantization(model.config)["settings"]
    assert recorded["weight_bits"] == bits  # saved with the member: it reloads the same anywhere


def test_activation_range_always_contains_zero():
    s, z = q.activation_qparams(torch.tensor(0.5), torch.tensor(2.0))  # all positive: zero is the lower end
    assert int(z) == 0 and float(s) == pytest.approx(2.0 / 255)
    s, z = q.activation_qparams(torch.tensor(-1.0), torch.tensor(3.0))
    assert float(s) == pytest.approx(4.0 / 255) and int(z) == round(1.0 / float(s))
    assert float(q.fake_quant_activation(torch.zeros(3), s, z).abs().max()) == 0.0


@pytest.mark.parametrize("observer", ["minmax", "ema"])
def test_observers(observer):
    x_min, x_max = q.observe(torch.tensor(0.0), torch.tensor(0.0), torch.tensor([-1.0, 2.0]), 0, observer, 0.5)
    assert (float(x_min), float(x_max)) == (-1.0, 2.0)  # the first batch sets the range
    x_min, x_max = q.observe(x_min, x_max, torch.tensor([-3.0, 1.0]), 1, observer, 0.5)
    assert (float(x_min), float(x_max)) == ((-3.0, 2.0) if observer == "minmax" else (-2.0, 1.5))


def test_settings_reject_unknown_keys():
    with pytest.raises(ValueError, match="extra"):
        q.QuantSettings(bits=4)


# --- preparing and training -------------------------------------------------------------------------------------------
def test_prepare_wraps_exactly_the_encoder_matmuls(tiny_config):
    model = build_model(tiny_config, structure=UNEVEN)
    adapter = adapter_for(tiny_config)
    before = adapter.prunable_linears(model)
    # layer 0 full (4 attention + 1 + 1), layer 1 without attention (2), layer 2 without FFN (4)
    assert len(before) == 6 + 2 + 4 and not any("classifier" in n or "pooler" in n for n in before)
    weights = {name: linear.weight for name, linear in before.items()}
    swapped = q.prepare_qat(model, adapter)
    assert sorted(swapped) == sorted(q.quant_linears(model)) == sorted(before)
    assert all(swapped[name].weight is weights[name] for name in before)  # parameters shared, not copied
    assert not isinstance(model.classifier, q.QuantLinear) and not isinstance(model.bert.pooler.dense, q.QuantLinear)
    assert model.config.ziplm_quantization["modules"] == sorted(before)
    with pytest.raises(BadInputError, match="already quantized"):
        q.prepare_qat(model, adapter)


def test_one_optimizer_step_trains_through_fake_quant_and_keeps_sparsity(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config)
    adapter = adapter_for(tiny_config)
    query = adapter.layers(model)[0].attention.self.query
    with torch.no_grad():
        query.weight[::2] = 0.0  # an oBERT-style mask: every other row pruned
    q.prepare_qat(model, adapter)
    q.calibrate(model, random_batches(tiny_config))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    batch = random_batches(tiny_config, 1)[0]
    loss = model(**batch, labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    optimizer.step()

    quant_query = adapter.layers(model)[0].attention.self.query
    assert torch.isfinite(loss)
    assert torch.all(quant_query.weight[::2] == 0)  # masked weights got no gradient and stay exactly zero
    assert not torch.equal(quant_query.weight[1::2], before["bert.encoder.layer.0.attention.self.query.weight"][1::2])
    value = "bert.encoder.layer.1.attention.self.value.weight"
    assert not torch.equal(dict(model.named_parameters())[value], before[value])  # the STE passes gradients on


def test_calibration_on_data_sets_frozen_scales(tiny_bert_dir):
    model = load_model(str(tiny_bert_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    task = toy_task(96, batch_size=8)  # 24 calibration examples: 3 batches
    q.prepare_qat(model, adapter_for(model.config))
    for quant in q.quant_linears(model).values():
        assert not quant.calibrated
    q.calibrate_activations(model, tokenizer, task)
    for quant in q.quant_linears(model).values():
        assert int(quant.observed_batches) == 3 and not quant.observing
        assert float(quant.input_min) < 0 < float(quant.input_max)
        assert float(quant.input_scale) == pytest.approx(float(quant.input_max - quant.input_min) / 255, rel=1e-5)
    task.calibration = []
    with pytest.raises(BadInputError, match="without calibration examples"):
        q.calibrate_activations(model, tokenizer, task)


def test_deployable_is_precision_aware(tiny_config):
    model = build_model(tiny_config)
    adapter = adapter_for(tiny_config)
    assert q.deployable(model, adapter.prunable_linears, "fp32", []) is model
    deployed = q.deployable(model, adapter.prunable_linears, "int8", random_batches(tiny_config))
    assert deployed is not model and not q.is_quantized(model)  # the float model is left alone
    assert len(q.quant_linears(deployed)) == 18 and all(m.calibrated for m in q.quant_linears(deployed).values())
    assert q.deployable(deployed, adapter.prunable_linears, "int8", []) is deployed
    with pytest.raises(BadInputError, match="precision is fp32"):
        q.deployable(deployed, adapter.prunable_linears, "fp32", [])
    uncalibrated = build_model(tiny_config)
    q.prepare_qat(uncalibrated, adapter)
    with pytest.raises(q.QuantizationError, match="never calibrated"):
        q.deployable(uncalibrated, adapter.prunable_linears, "int8", [])


def test_deployable_makes_a_timed_copy_as_sparse_as_the_chain_leaves_it(tiny_config):
    model = build_model(tiny_config)
    adapter = adapter_for(tiny_config)
    sparse = q.deployable(model, adapter.prunable_linears, "fp32", [], sparsity=0.8)
    weights = [linear.weight for linear in adapter.prunable_linears(sparse).values()]
    total = sum(weight.numel() for weight in weights)
    assert sum(int((weight == 0).sum()) for weight in weights) == round(0.8 * total)
    threshold = max(float(w.abs()[w == 0].max()) for w in weights if int((w == 0).sum()))  # one global threshold
    assert all(float(w.abs()[w != 0].min()) >= threshold for w in weights if int((w != 0).sum()))
    assert not any(int((linear.weight == 0).sum()) for linear in adapter.prunable_linears(model).values())
    assert q.deployable(sparse, adapter.prunable_linears, "fp32", [], sparsity=0.8) is sparse  # oBERT's own zeros


# --- ONNX: QDQ export, integer kernels, parity ------------------------------------------------------------------------
def optimized_ops(onnx_path, tmp_path) -> tuple[Counter, list[onnx.NodeProto]]:
    runtime = get_runtime(InferenceEnv(threads=1))
    graph = onnx.load(str(runtime.save_optimized(onnx_path, tmp_path / "optimized.onnx"))).graph
    return Counter(node.op_type for node in graph.node), list(graph.node)


def test_onnx_runtime_runs_integer_kernels_and_matches_fake_quant(tiny_config, tmp_path):
    model = quantized_model(tiny_config, UNEVEN)
    onnx_path = export_model(model, tmp_path / "int8.onnx")
    exported = Counter(node.op_type for node in onnx.load(str(onnx_path)).graph.node)
    assert exported["QuantizeLinear"] >= 2 * 12 and exported["DequantizeLinear"] >= 2 * 12  # weight + input per linear

    ops, nodes = optimized_ops(onnx_path, tmp_path)
    assert sum(ops[op] for op in INTEGER_OPS) == 12  # every quantized linear runs as an integer kernel
    dequantized = {out for node in nodes if node.op_type == "DequantizeLinear" for out in node.output}
    float_matmuls_fed_by_dq = [n.name for n in nodes if n.op_type in {"MatMul", "Gemm", "FusedMatMul"}
                               and set(n.input) & dequantized]
    assert float_matmuls_fed_by_dq == []

    report = verify_export(model, onnx_path, atol=parity_atol("int8"))
    assert report.max_abs_diff <= parity_atol("int8")
    float_model = build_model(tiny_config, structure=UNEVEN)
    float_model.load_state_dict(model.state_dict(), strict=False)
    noise = verify_export(float_model, onnx_path, atol=1.0).max_abs_diff  # the file against the float model
    assert noise > 10 * report.max_abs_diff  # parity is far tighter than the quantization noise it must not hide


# --- save and reload --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", [None, UNEVEN], ids=["dense", "shrunk"])
def test_quantized_member_round_trips_through_its_folder(tiny_config, tmp_path, structure):
    model = quantized_model(tiny_config, structure)
    save_model(model, tmp_path / "member")
    config = json.loads((tmp_path / "member" / "config.json").read_text())
    assert config["ziplm_quantization"]["settings"] == q.QuantSettings().model_dump()

    reloaded = load_model(str(tmp_path / "member"))
    assert sorted(q.quant_linears(reloaded)) == sorted(q.quant_linears(model))
    for name, quant in q.quant_linears(reloaded).items():
        original = q.quant_linears(model)[name]
        assert quant.calibrated and not quant.observing
        assert torch.equal(quant.input_scale, original.input_scale)
        assert torch.equal(quant.input_zero_point, original.input_zero_point)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    verify_export(reloaded, export_model(reloaded, tmp_path / "member.onnx"), atol=parity_atol("int8"))


def test_a_member_saved_before_weight_bits_existed_reloads_with_8_bit_weights(tiny_config, tmp_path):
    model = quantized_model(tiny_config)
    save_model(model, tmp_path / "member")
    config_path = tmp_path / "member" / "config.json"
    config = json.loads(config_path.read_text())
    del config["ziplm_quantization"]["settings"]["weight_bits"]  # as written before the setting existed
    config_path.write_text(json.dumps(config))
    reloaded = load_model(str(tmp_path / "member"))
    assert {quant.weight_qmax for quant in q.quant_linears(reloaded).values()} == {127}


def test_reload_keeps_the_sparsity_mask(tiny_config, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_config)
    adapter = adapter_for(tiny_config)
    with torch.no_grad():
        adapter.ffn_out_proj(adapter.layers(model)[1]).weight[:, :50] = 0.0
    q.prepare_qat(model, adapter)
    q.calibrate(model, random_batches(tiny_config))
    save_model(model, tmp_path / "member")
    reloaded = load_model(str(tmp_path / "member"))
    mask = adapter.ffn_out_proj(adapter.layers(reloaded)[1]).weight_mask
    assert mask is not None and not bool(mask[:, :50].any()) and bool(mask[:, 50:].all())


def test_the_family_loader_refuses_a_quantized_member_and_names_the_loader(tiny_config, tmp_path):
    save_model(quantized_model(tiny_config), tmp_path / "member")
    with pytest.raises(BadInputError, match=r"records ziplm_quantization .* ziplm.stages.quantize.load_model"):
        loading.load_model(str(tmp_path / "member"))


def test_reload_rejects_a_quantization_record_for_other_modules(tiny_config, tmp_path):
    model = quantized_model(tiny_config)
    save_model(model, tmp_path / "member")
    path = tmp_path / "member" / "config.json"
    config = json.loads(path.read_text())
    config["ziplm_quantization"]["modules"] = config["ziplm_quantization"]["modules"][1:]
    path.write_text(json.dumps(config))
    with pytest.raises(BadInputError, match="does not belong"):
        load_model(str(tmp_path / "member"))


def test_int8_outputs_differ_from_float_by_quantization_noise_only(tiny_config):
    torch.manual_seed(0)
    float_model = build_model(tiny_config)
    model = q.deployable(float_model, adapter_for(tiny_config).prunable_linears, "int8",
                         random_batches(tiny_config))
    ids = torch.randint(0, tiny_config.vocab_size, (4, 24))
    with torch.no_grad():
        reference, quantized = float_model(input_ids=ids).logits, model(input_ids=ids).logits
    relative = float((reference - quantized).norm() / reference.norm())
    assert 0 < relative < 0.1, relative
    assert np.isfinite(quantized.numpy()).all()
