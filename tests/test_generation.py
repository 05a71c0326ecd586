"""Every decoder model type exported for generation: greedy decoding over the KV cache in ONNX Runtime (our loop)
equals transformers' `generate` token for token, dense and pruned (uneven KV-head counts, the first layer's attention
removed, so its cache entry is absent), on one prompt and on a left-padded batch; the artifact and config.json
describe the pruned cache; and the phases of generation (prefill, decode) are fed and latency-tabled."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import QUICK_UNGUARDED as QUICK
from ziplm.errors import BadInputError
from ziplm.families import LayerStructure, ModelShape, ModelStructure
from ziplm.families.decoder import KV_HEADS_KEY, DecoderAdapter
from ziplm.families.loading import build_model, load_model, save_model
from ziplm.families.registry import _FAMILIES
from ziplm.pipeline.cli import app
from ziplm.pipeline.report import runtime_json
from ziplm.runtimes import InferenceEnv, get_runtime
from ziplm.runtimes.onnxruntime_cpu import OnnxRuntimeCPU, OrtSession
from ziplm.stages import latency_table as lt
from ziplm.stages.export import ExportParityError
from ziplm.stages.generation import (GenerationParity, GenerationRequest, StopTokens, check_generation,
                                     export_for_generation, onnx_greedy_generate, phase_feeds, serving_runtime,
                                     torch_greedy_generate)

DECODER_TYPES = sorted(name for name, adapter in _FAMILIES.items() if isinstance(adapter, DecoderAdapter))
NEW_TOKENS = 32


def test_the_decoder_families_are_registered():
    assert {"gpt2", "llama", "mistral", "qwen2", "qwen3"} <= set(DECODER_TYPES)


def pruned(shape: ModelShape) -> ModelStructure:
    """Layer 0 without attention, layer 1 with one KV group and half its FFN, layer 2 dense attention without FFN."""
    options = [LayerStructure(0, shape.ffn_size), LayerStructure(1, shape.ffn_size // 2),
               LayerStructure(shape.num_units, 0)]
    return ModelStructure(tuple(options[i % 3] for i in range(shape.num_layers)))


def decoder(model_type: str, structure: str, seed: int = 0) -> torch.nn.Module:
    adapter = _FAMILIES[model_type]
    config = adapter.tiny_config_of(model_type)
    torch.manual_seed(seed)
    model = build_model(config, structure=pruned(adapter.shape(config)) if structure == "pruned" else None)
    model.generation_config.eos_token_id = None  # every row runs all NEW_TOKENS steps (stopping is tested apart)
    return model


def prompts(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two prompts of 9 tokens, the second left-padded to hold 6."""
    input_ids = np.random.default_rng(1).integers(3, vocab_size, (2, 9))
    mask = np.ones_like(input_ids)
    mask[1, :3] = 0
    return input_ids, mask


@pytest.mark.parametrize("structure", ["dense", "pruned"])
@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_generation_in_onnx_runtime_equals_transformers_generate(model_type, structure, tmp_path):
    model = decoder(model_type, structure)
    path = export_for_generation(model, tmp_path / "generation.onnx")
    input_ids, mask = prompts(model.config.vocab_size)
    assert check_generation(model, path, input_ids[:1], NEW_TOKENS) == GenerationParity(NEW_TOKENS, 1)
    assert check_generation(model, path, input_ids, NEW_TOKENS, mask) == GenerationParity(NEW_TOKENS, 2)


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_the_artifact_has_one_cache_entry_per_attending_layer_with_its_own_head_count(model_type, tmp_path):
    model = decoder(model_type, "pruned")
    adapter = _FAMILIES[model_type]
    shape = adapter.shape(model.config)
    session = ort.InferenceSession(str(export_for_generation(model, tmp_path / "g.onnx")))
    inputs = {spec.name: spec.shape for spec in session.get_inputs()}
    outputs = [spec.name for spec in session.get_outputs()]
    kv_heads = adapter.kv_heads(model.config)
    assert kv_heads == [layer.units for layer in pruned(shape).layers] and kv_heads[0] == 0
    attending = [i for i, heads in enumerate(kv_heads) if heads]
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [name for name in inputs if name.startswith("past")] == [
        f"past_key_values.{i}.{part}" for i in attending for part in ("key", "value")]
    for i in attending:
        assert inputs[f"past_key_values.{i}.key"] == ["batch", kv_heads[i], "past_sequence", shape.head_dim]
    assert outputs == ["logits", *(f"present.{i}.{part}" for i in attending for part in ("key", "value"))]
    assert adapter.kv_cache_bytes_per_token(model.config) == 2 * sum(kv_heads) * shape.head_dim * 4


def test_prefill_returns_the_last_positions_logits_and_the_cache_of_the_whole_prompt(tmp_path):
    model = decoder("llama", "pruned")
    session = ort.InferenceSession(str(export_for_generation(model, tmp_path / "g.onnx")))
    input_ids = prompts(model.config.vocab_size)[0][:1]
    empty = {spec.name: np.zeros((1, spec.shape[1], 0, spec.shape[3]), np.float32)
             for spec in session.get_inputs() if spec.name.startswith("past")}
    feed = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
            "position_ids": np.arange(input_ids.shape[1])[None], **empty}
    logits, *present = session.run(None, feed)
    with torch.no_grad():
        expected = model(torch.from_numpy(input_ids)).logits[:, -1:].numpy()
    assert logits.shape == (1, 1, model.config.vocab_size)
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert all(tensor.shape[2] == input_ids.shape[1] for tensor in present)


def test_a_reloaded_member_generates_the_same_and_its_config_describes_the_cache(tmp_path):
    model = decoder("llama", "pruned")
    save_model(model, tmp_path / "member")
    config = json.loads((tmp_path / "member" / "config.json").read_text())
    adapter = _FAMILIES["llama"]
    assert config["head_dim"] == adapter.shape(model.config).head_dim
    assert config[KV_HEADS_KEY] == adapter.kv_heads(model.config)
    reloaded = load_model(str(tmp_path / "member"), "causal-lm")
    reloaded.generation_config.eos_token_id = None
    path = export_for_generation(reloaded, tmp_path / "g.onnx")
    input_ids, mask = prompts(model.config.vocab_size)
    check_generation(model, path, input_ids, NEW_TOKENS, mask)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_plain_generate_without_our_cache_gives_the_same_tokens(model_type):
    """A user's `model.generate()` builds transformers' own cache: the removed attention of layer 0 must not make it
    read an empty cache (which mis-masks the padded row)."""
    model = decoder(model_type, "pruned")
    input_ids, mask = prompts(model.config.vocab_size)
    with torch.no_grad():
        plain = model.generate(torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                               max_new_tokens=NEW_TOKENS, do_sample=False).numpy()
    np.testing.assert_array_equal(plain, torch_greedy_generate(model, input_ids, NEW_TOKENS, mask))


def test_a_row_that_produces_a_stop_token_is_padded_and_generation_ends_as_in_transformers(tmp_path):
    model = decoder("gpt2", "pruned")
    path = export_for_generation(model, tmp_path / "g.onnx")
    input_ids, mask = prompts(model.config.vocab_size)
    session = OrtSession(ort.InferenceSession(str(path)))
    free = onnx_greedy_generate(session, input_ids, NEW_TOKENS, mask)
    stop = int(free[0, input_ids.shape[1] + 4])  # the first row's fifth new token ends its generation
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = stop, 0
    assert StopTokens.of(model) == StopTokens((stop,), 0)
    check_generation(model, path, input_ids, NEW_TOKENS, mask)
    stopped = onnx_greedy_generate(session, input_ids, NEW_TOKENS, mask, StopTokens.of(model))
    first_stop = int(np.flatnonzero(stopped[0, input_ids.shape[1]:] == stop)[0])
    assert first_stop <= 4 and (stopped[0, input_ids.shape[1] + first_stop + 1:] == 0).all()


def test_an_artifact_of_other_weights_fails_the_check(tmp_path):
    path = export_for_generation(decoder("llama", "pruned", seed=1), tmp_path / "g.onnx")
    model = decoder("llama", "pruned", seed=0)
    with pytest.raises(ExportParityError, match="differs from transformers' generate: row 0"):
        check_generation(model, path, prompts(model.config.vocab_size)[0][:1], NEW_TOKENS)


def test_encoders_are_refused(tiny_bert_dir, tmp_path):
    with pytest.raises(BadInputError, match="not a decoder"):
        export_for_generation(load_model(str(tiny_bert_dir)), tmp_path / "g.onnx")
    assert not (tmp_path / "g.onnx").exists()


def test_a_decoder_without_attention_generates_without_a_cache(tmp_path):
    """Each token then depends on itself and its position only: the artifact has no cache entries (nor an
    attention_mask, which nothing reads), and transformers generates with use_cache off."""
    adapter = _FAMILIES["gpt2"]
    config = adapter.tiny_config()
    torch.manual_seed(0)
    model = build_model(config, structure=ModelStructure.uniform(adapter.shape(config), 0, 32))
    model.generation_config.eos_token_id = None
    path = export_for_generation(model, tmp_path / "g.onnx")
    assert [spec.name for spec in ort.InferenceSession(str(path)).get_inputs()] == ["input_ids", "position_ids"]
    assert check_generation(model, path, prompts(config.vocab_size)[0][:1], 8) == GenerationParity(8, 1)


def test_phase_feeds_size_each_files_cache_for_prefill_and_decode(tmp_path):
    model = decoder("llama", "pruned")
    session = OnnxRuntimeCPU(threads=1).load(export_for_generation(model, tmp_path / "g.onnx"))
    env = InferenceEnv(batch_size=2, sequence_length=12)
    prefill = phase_feeds(env.in_phase("prefill"), model.config.vocab_size)(session)
    decode = phase_feeds(env.in_phase("decode", 20), model.config.vocab_size)(session)
    assert prefill["input_ids"].shape == (2, 12) and prefill["attention_mask"].shape == (2, 12)
    assert decode["input_ids"].shape == (2, 1) and decode["attention_mask"].shape == (2, 21)
    assert (decode["position_ids"] == 20).all() and (prefill["position_ids"][1] == np.arange(12)).all()
    kv_heads = _FAMILIES["llama"].kv_heads(model.config)
    for name, shape in session.input_shapes.items():
        if name.startswith("past_key_values."):
            heads, head_dim = shape[1], shape[3]
            assert heads == kv_heads[int(name.split(".")[1])]
            assert prefill[name].shape == (2, heads, 0, head_dim) and decode[name].shape == (2, heads, 20, head_dim)
    logits, *present = session.run(decode)
    assert logits.shape == (2, 1, model.config.vocab_size) and all(t.shape[2] == 21 for t in present)
    with pytest.raises(ValueError, match="whole-sequence phase"):
        phase_feeds(env, model.config.vocab_size)


def test_a_decode_environment_needs_its_context_length_and_only_decode_has_one():
    assert InferenceEnv().phase == "sequence" and InferenceEnv().describe_phase() == ""
    assert InferenceEnv().in_phase("decode", 512).describe_phase() == "time per token at context 512"
    with pytest.raises(ValueError, match="set context_length"):
        InferenceEnv(phase="decode")
    with pytest.raises(ValueError, match="phase prefill has none"):
        InferenceEnv(phase="prefill", context_length=64)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_a_decode_block_is_one_token_over_its_levels_cache_and_exports_with_parity(model_type, tmp_path):
    adapter = _FAMILIES[model_type]
    config = adapter.tiny_config()
    level = LayerStructure(2, 32)
    env = InferenceEnv(threads=1, sequence_length=8, phase="decode", context_length=12)
    torch.manual_seed(0)
    path = lt.export_block(adapter, config, level, env, tmp_path)
    torch.manual_seed(0)  # the same fresh layer as the block's
    layer = adapter.new_layer(config).eval()
    adapter.shrink_layer(layer, adapter.shape(config), level)
    inputs = lt.block_inputs(adapter, config, env, level)
    head_dim = adapter.shape(config).head_dim
    assert inputs["hidden_states"].shape == (1, 1, config.hidden_size) and inputs["attention_mask"].shape[-1] == 13
    assert inputs["past_key"].shape == inputs["past_value"].shape == (1, 2, 12, head_dim)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, inputs)
    with torch.no_grad():
        expected = lt.LayerBlock(adapter, layer)(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
    np.testing.assert_allclose(output, expected, atol=1e-5)
    (moved,) = session.run(None, {**inputs, "past_value": inputs["past_value"] + 1.0})
    assert not np.allclose(moved, output)  # the token reads the cache
    removed = lt.block_inputs(adapter, config, env, LayerStructure(0, 32))
    assert "past_key" not in removed and removed["attention_mask"].shape[-1] == 13


def test_a_decode_table_times_blocks_on_the_cache_and_the_generation_artifact_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    config = _FAMILIES["gpt2"].tiny_config()
    sequence = InferenceEnv(threads=1, sequence_length=16)
    decode = sequence.in_phase("decode", 24)
    table, cached = lt.get_or_build_table(config, decode, 32, QUICK, progress=lambda _: None)
    assert not cached and table.unit_levels == [0, 1, 2, 3, 4] and table.ffn_levels == [0, 32, 64, 96, 128]
    assert table.environment["phase"] == "decode" and table.environment["context_length"] == 24
    assert table.base_ms > 0 and table.max_speedup() > 1.0 and len(table.calibration) >= 5
    runtime = get_runtime(sequence)
    identities = [lt.table_fingerprint(_FAMILIES["gpt2"].shape(config), env, runtime, 32)
                  for env in (sequence, decode, sequence.in_phase("decode", 48), sequence.in_phase("prefill"))]
    assert "phase" not in identities[0] and len({json.dumps(i, sort_keys=True) for i in identities}) == 4


def test_a_generation_phase_table_of_an_encoder_is_refused(tiny_config):
    with pytest.raises(BadInputError, match="not a decoder: use phase sequence"):
        lt.build_table(tiny_config, InferenceEnv(threads=1, sequence_length=16).in_phase("prefill"), 32, QUICK)


@pytest.mark.parametrize("args", [["--phase", "decode"], ["--phase", "prefill", "--context-length", "64"],
                                  ["--phase", "request"], ["--new-tokens", "8"]])
def test_the_latency_table_command_wants_a_context_length_for_decode_and_new_tokens_for_a_request(args):
    result = CliRunner().invoke(app, ["latency-table", "--model", "gpt2-small", *args], catch_exceptions=False)
    assert result.exit_code == 2 and "give both or neither" in result.output


def test_a_request_environment_needs_its_new_tokens_and_decodes_at_its_mean_cache_length():
    request = InferenceEnv(sequence_length=100, phase="request", new_tokens=64)
    prefill, decode = request.request_phases()
    assert request.decode_steps == 63 and prefill.phase == "prefill" and prefill.new_tokens is None
    assert decode.context_length == request.decode_context == 100 + 31  # the steps' caches: 100 .. 162
    assert InferenceEnv(phase="request", new_tokens=1).decode_steps == 0
    assert InferenceEnv(sequence_length=100).decode_context == 100  # the first step after the prompt
    assert "the last of 64 tokens generated after 100 prompt tokens" in request.describe_phase()
    with pytest.raises(ValueError, match="set new_tokens"):
        InferenceEnv(phase="request")
    with pytest.raises(ValueError, match="new_tokens belongs to phase request"):
        InferenceEnv(phase="decode", context_length=8, new_tokens=4)


class CountingSession:
    """A session that counts its calls."""

    def __init__(self, session) -> None:
        self.session, self.calls = session, 0
        self.input_names, self.input_shapes = session.input_names, session.input_shapes

    def run(self, inputs):
        self.calls += 1
        return self.session.run(inputs)


def test_a_request_session_generates_its_new_tokens_greedily_from_the_fed_prompt(tmp_path):
    model = decoder("llama", "pruned")
    path = export_for_generation(model, tmp_path / "g.onnx")
    env = InferenceEnv(threads=1, sequence_length=9, phase="request", new_tokens=6)
    runtime = serving_runtime(env)
    assert runtime.info() == get_runtime(env).info() and isinstance(runtime.load(path), GenerationRequest)
    counting = CountingSession(OnnxRuntimeCPU(threads=1).load(path))
    feeds = phase_feeds(env, model.config.vocab_size)(counting)
    (tokens,) = GenerationRequest(counting, env.new_tokens).run(feeds)
    assert counting.calls == 6  # the prefill, then a step for each new token but the first
    expected = torch_greedy_generate(model, feeds["input_ids"], 6)
    np.testing.assert_array_equal(tokens, expected)
    assert serving_runtime(env.in_phase("prefill")).load(path).__class__ is not GenerationRequest


def table_of(levels: int, seed: int, correction: lt.Correction) -> lt.LatencyTable:
    """A table of made-up level costs (units 0..levels-1, FFN widths 0..64), with calibration entries."""
    rng = np.random.default_rng(seed)
    structures = [ModelStructure((LayerStructure(1, 32), LayerStructure(levels - 1, 0))),
                  ModelStructure((LayerStructure(levels - 1, 64), LayerStructure(levels - 1, 64)))]
    table = lt.LatencyTable("t", {"name": "onnxruntime", "phase": "prefill"}, {}, 32, list(range(levels)),
                            list(np.sort(rng.random(levels))), [0, 32, 64], list(np.sort(rng.random(3))),
                            float(rng.random()) + 0.5, correction, [], {"attention": [1.0]},
                            {"blocks": {"other_loads": [0.1], "retaken": 0, "disturbed": 0}})
    table.calibration = [{"name": f"s{i}", "structure": s.to_json(), "predicted_ms": table.predict_ms(s, False),
                          "measured_ms": table.predict_ms(s) + 0.01} for i, s in enumerate(structures)]
    return table


def test_a_request_table_predicts_the_prefill_and_the_decode_steps_together_exactly():
    prefill, decode = table_of(4, 0, lt.Correction(1.3, -0.2)), table_of(4, 1, lt.Correction(0.8, 0.05))
    env = InferenceEnv(sequence_length=16, phase="request", new_tokens=9)
    request = lt.request_table(prefill, decode, env)
    rng = np.random.default_rng(2)
    for _ in range(20):
        structure = ModelStructure(tuple(LayerStructure(int(rng.integers(0, 4)), int(rng.choice([0, 32, 64])))
                                         for _ in range(2)))
        assert request.predict_ms(structure) == pytest.approx(
            prefill.predict_ms(structure) + 8 * decode.predict_ms(structure))
    assert request.environment["phase"] == "request" and request.environment["new_tokens"] == 9
    assert request.calibration[0]["measured_ms"] == pytest.approx(
        prefill.calibration[0]["measured_ms"] + 8 * decode.calibration[0]["measured_ms"], abs=1e-4)
    assert set(request.machine_load) == {"prefill blocks", "decode blocks"} and request.block_p90_ms == {}
    with pytest.raises(ValueError, match="same levels"):
        lt.request_table(prefill, table_of(3, 1, lt.Correction()), env)


def test_a_request_table_is_built_from_its_phases_cached_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    config = _FAMILIES["gpt2"].tiny_config()
    request = InferenceEnv(threads=1, sequence_length=16, phase="request", new_tokens=5)
    table, cached = lt.get_or_build_table(config, request, 64, QUICK, progress=lambda _: None)
    assert not cached and table.max_speedup() > 1.0
    prefill, decode = (lt.get_or_build_table(config, env, 64, QUICK, progress=lambda _: None) for env in
                       request.request_phases())
    assert prefill[1] and decode[1] and decode[0].environment["context_length"] == 17
    assert table.dense_ms() == pytest.approx(prefill[0].dense_ms() + 4 * decode[0].dense_ms())
    with pytest.raises(ValueError, match="combined from its phases' tables"):
        lt.build_table(config, request, 64, QUICK)


def test_the_runtime_record_names_the_phase_and_reads_tables_that_predate_phases():
    env = {"name": "onnxruntime", "version": "1", "device": "CPU", "threads": 2, "batch_size": 1,
           "sequence_length": 16, "precision": "fp32", "options": {}}
    table = lt.LatencyTable("t", env, {}, 32, [0], [0.0], [0], [0.0], 1.0, lt.Correction(), [], {})
    assert runtime_json(table) == env  # a whole-sequence table of before phases: no phase keys
    table.environment = {**env, **InferenceEnv(phase="request", new_tokens=8).model_dump()}
    assert runtime_json(table)["new_tokens"] == 8 and runtime_json(table)["context_length"] is None
