"""Latency tables: levels, prediction, fingerprinting and caching (built for real, on a tiny shape)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import dataclasses

from tests.conftest import QUICK_UNGUARDED as QUICK
from tests.conftest import tiny_bert_config
from ziplm.errors import BadInputError
from ziplm.families import LayerStructure, ModelStructure, adapter_for
from ziplm.families.loading import RANDOM_SHAPES, load_config
from ziplm.runtimes import InferenceEnv, base, get_runtime
from ziplm.runtimes.timing import BusyMachineWarning
from ziplm.stages import latency_table as lt
from ziplm.stages.latency_table import anchored_fit

ENV = InferenceEnv(threads=1, sequence_length=16)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("name", sorted(RANDOM_SHAPES))
def test_a_named_random_shape_is_base_sized_and_its_blocks_export(name, tmp_path):
    """`--model bert-base|roberta-base|...`: the table needs only the config, served by its family. ModernBERT-base's
    gated FFN is 1152 wide (its fused up-and-gate projection 2304)."""
    config = load_config(name)
    adapter = adapter_for(config)
    shape = adapter.shape(config)
    ffn = 1152 if shape.family == "modernbert" else 3072
    assert (shape.family, shape.hidden_size, shape.num_units, shape.ffn_size) == (name.split("-")[0], 768, 12, ffn)
    assert adapter.max_sequence_length(config) >= 512
    session = get_runtime(ENV).load(lt.export_block(adapter, config, LayerStructure(3, 96), ENV, tmp_path))
    (output,) = session.run(adapter.block_inputs(config, 1, 16))
    assert output.shape == (1, 16, 768)


def test_ffn_levels_include_zero_and_full_width():
    assert lt.ffn_levels(128, 32) == [0, 32, 64, 96, 128]
    assert lt.ffn_levels(100, 32) == [0, 32, 64, 96, 100]


def test_table_is_built_cached_and_predicts(cache, tiny_config):
    messages: list[str] = []
    table, cached = lt.get_or_build_table(tiny_config, ENV, 32, QUICK, progress=messages.append)
    assert not cached and any("timing" in m for m in messages)
    assert table.unit_levels == [0, 1, 2, 3, 4] and table.ffn_levels == [0, 32, 64, 96, 128]
    assert table.attention_ms[0] == 0.0 and table.ffn_ms[0] == 0.0 and table.base_ms > 0
    assert len(table.calibration) == 6  # five uniform structures and one random one

    shape = adapter_for(tiny_config).shape(tiny_config)
    empty = ModelStructure.uniform(shape, 0, 0)
    dense = ModelStructure.dense(shape)
    assert table.predict_ms(empty, corrected=False) == table.base_ms
    assert table.predict_ms(dense, corrected=False) == pytest.approx(
        table.base_ms + 3 * (table.attention_ms[-1] + table.ffn_ms[-1]))
    assert table.predict_ms(dense) == pytest.approx(table.correction.apply(table.predict_ms(dense, corrected=False)))

    again, cached = lt.get_or_build_table(tiny_config, ENV, 32, QUICK, progress=messages.append)
    assert cached and again == table
    stored = json.loads(next((cache / "stages" / "table").glob("*/table.json")).read_text())  # a file, not a pickle
    assert stored["fingerprint"] == table.fingerprint and stored["schema_version"] == lt.SCHEMA_VERSION


def test_a_level_off_the_grid_is_rejected(cache, tiny_config):
    table, _ = lt.get_or_build_table(tiny_config, ENV, 64, QUICK, progress=lambda _: None)
    off_grid = ModelStructure((LayerStructure(4, 100),) * 3)
    with pytest.raises(BadInputError, match="FFN width 100 is not a level"):
        table.predict_ms(off_grid)


@pytest.mark.parametrize("change", [
    {"threads": 2}, {"batch_size": 2}, {"sequence_length": 32}, {"options": {"graph_optimization": "basic"}},
    {"sparsity": 0.8},
])
def test_fingerprint_changes_with_the_environment(tiny_config, change):
    shape = adapter_for(tiny_config).shape(tiny_config)
    other = ENV.model_copy(update=change)
    base_fp = lt.table_fingerprint(shape, ENV, get_runtime(ENV), 32)
    assert lt.table_fingerprint(shape, other, get_runtime(other), 32) != base_fp


def test_fingerprint_changes_with_shape_and_group(tiny_config):
    runtime = get_runtime(ENV)
    shape = adapter_for(tiny_config).shape(tiny_config)
    wider = tiny_bert_config(ffn=256)
    base_fp = lt.table_fingerprint(shape, ENV, runtime, 32)
    assert lt.table_fingerprint(adapter_for(wider).shape(wider), ENV, runtime, 32) != base_fp
    assert lt.table_fingerprint(shape, ENV, runtime, 16) != base_fp
    assert lt.table_fingerprint(shape, ENV, runtime, 32) == base_fp


def test_table_json_round_trips(cache, tiny_config):
    table, _ = lt.get_or_build_table(tiny_config, ENV, 64, QUICK, progress=lambda _: None)
    assert lt.LatencyTable.from_json(json.loads(json.dumps(table.to_json()))) == table


def test_a_stale_schema_asks_for_a_rebuild(tiny_config, cache):
    table, _ = lt.get_or_build_table(tiny_config, ENV, 64, QUICK, progress=lambda _: None)
    payload = table.to_json() | {"schema_version": 0}
    with pytest.raises(BadInputError, match="rebuild"):
        lt.LatencyTable.from_json(payload)


def test_fingerprint_changes_with_precision(tiny_config):
    shape = adapter_for(tiny_config).shape(tiny_config)
    int8 = ENV.model_copy(update={"precision": "int8"})
    assert lt.table_fingerprint(shape, int8, get_runtime(int8), 32) != lt.table_fingerprint(
        shape, ENV, get_runtime(ENV), 32)


def test_int8_table_builds_and_predicts_like_the_fp32_one(tiny_table, tiny_config):
    """Every block and calibration model is timed as its QDQ-quantized version; predictions stay positive and the
    dense model costs more than the empty one. (Not the steps between: the tiny model's blocks take 0.05-0.7 ms, and
    on a shared 2-core VM neighbouring steps of the ladder swap places within one build, in FP32 as well.)"""
    table = lt.build_table(tiny_config, ENV.model_copy(update={"precision": "int8"}), 32, QUICK,
                           progress=lambda _: None)
    assert table.environment["precision"] == "int8" and table.fingerprint != tiny_table.fingerprint
    shape = adapter_for(tiny_config).shape(tiny_config)
    ladder = [ModelStructure.uniform(shape, units, width) for units, width in ((0, 0), (1, 32), (2, 64), (4, 128))]
    predicted = [table.predict_ms(structure) for structure in ladder]
    assert all(ms > 0 for ms in predicted)
    assert predicted[-1] > predicted[0]  # 4-5x apart in each of 6 builds timed on the AVX2 EPYC


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_timed_blocks_are_exported_in_the_environments_precision(tiny_config, tmp_path, precision):
    import onnx

    adapter = adapter_for(tiny_config)
    env = ENV.model_copy(update={"precision": precision})
    path = lt.export_block(adapter, tiny_config, LayerStructure(2, 64), env, tmp_path)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ("QuantizeLinear" in ops and "DequantizeLinear" in ops) == (precision == "int8")


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_timed_blocks_have_the_environments_sparsity(tiny_config, tmp_path, precision):
    import onnx

    env = ENV.model_copy(update={"precision": precision, "sparsity": 0.8})
    path = lt.export_block(adapter_for(tiny_config), tiny_config, LayerStructure(4, 128), env, tmp_path)
    weights = [onnx.numpy_helper.to_array(w) for w in onnx.load(str(path)).graph.initializer]
    matrices = [w for w in weights if w.ndim == 2 and min(w.shape) >= 64]  # Q, K, V, O and the FFN's two
    assert len(matrices) == 6
    zeros = sum(int((w == 0).sum()) for w in matrices) / sum(w.size for w in matrices)
    assert zeros == pytest.approx(0.8, abs=0.01)  # int8: a zero weight quantizes to 0 exactly


def test_the_correction_passes_through_the_all_removed_model():
    """Noisy calibration points cannot tilt the fit into a negative time for the smallest model."""
    base = 2.0
    predicted = np.array([2.0, 5.0, 6.0, 14.0, 20.0])
    measured = np.array([2.0, 2.5, 3.0, 30.0, 33.0])  # noisy: a free affine fit puts the smallest model below 0 ms
    assert np.polyval(np.polyfit(predicted, measured, 1), base) < 0
    correction = anchored_fit(predicted, measured, base)
    assert correction.apply(base) == pytest.approx(base)
    x, y = predicted - base, measured - base
    assert correction.scale == pytest.approx(x @ y / (x @ x)) and correction.apply(20.0) > base


ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 1\nflags\t\t: fpu sse4_2 avx fma avx2\n"
ZEN4 = ("processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\n"
        "flags\t\t: fpu sse4_2 avx fma avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16\n")


def test_two_cpus_behind_one_masked_model_name_get_different_tables(tiny_config, tmp_path, monkeypatch):
    # both machines this project ran on say "AMD EPYC"; dense INT8 ran 1.9x dense FP32 on one and 1.43x on the other
    shape = adapter_for(tiny_config).shape(tiny_config)
    identities, fingerprints = [], []
    for index, cpuinfo in enumerate((ZEN3, ZEN4)):
        path = tmp_path / f"cpuinfo{index}"
        path.write_text(cpuinfo + "\nprocessor\t: 1\nmodel name\t: AMD EPYC\n")
        monkeypatch.setattr(base, "CPUINFO", path)
        identities.append(base.cpu_identity())
        fingerprints.append(lt.table_fingerprint(shape, ENV, get_runtime(ENV), 32))
    assert identities == ["AMD EPYC (cpu family 25, model 1; avx avx2 fma)",
                          "AMD EPYC (cpu family 25, model 17; avx avx2 fma avx512f avx512bw avx512vl avx512_vnni "
                          "avx512_bf16)"]
    assert fingerprints[0] != fingerprints[1]
    assert get_runtime(ENV).info().device == f"CPU ({identities[1]})"


def test_a_table_timed_while_other_work_kept_cores_busy_records_it_and_warns(tiny_config, monkeypatch):
    from ziplm.pipeline.report import _table_load_lines
    from ziplm.runtimes import timing

    monkeypatch.setattr(timing, "with_load", lambda measure: (measure(), 0.9))  # a neighbour busy throughout
    monkeypatch.setattr(timing, "RETAKE_PAUSE_S", 0.0)
    messages: list[str] = []
    with pytest.warns(BusyMachineWarning, match=r"latency table \(blocks\): 1 of 1 timing chunks .* 0.90 cores busy "
                                                r".*rebuild it"):
        table = lt.build_table(tiny_config, ENV, 32, dataclasses.replace(QUICK, retakes=1), progress=messages.append)
    assert table.machine_load["blocks"] == {"other_load": [0.9], "retaken": 1, "disturbed": 1}
    assert table.machine_load["calibration"]["disturbed"] == 1
    assert "latency table (blocks): 1 chunk taken again: the machine was busy; 1 of 1 measured while other work " \
           "kept cores busy" in messages
    assert lt.LatencyTable.from_json(json.loads(json.dumps(table.to_json()))) == table
    [_, line] = _table_load_lines({"latency_table_load": table.machine_load})
    assert line.startswith("The latency table was timed while other work kept cores busy (blocks: 1 chunk taken "
                           "again") and "rebuild it on a quiet machine" in line
    assert _table_load_lines({"latency_table_load": {}}) == []  # tables built before the guard record nothing
