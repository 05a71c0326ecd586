"""The runtime registry, the timing harness and paired speedups on real ONNX Runtime sessions."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from tests.conftest import tiny_bert_config
from ziplm.families.loading import build_model
from ziplm.pipeline.errors import BadInputError
from ziplm.runtimes import InferenceEnv, available_runtimes, get_runtime
from ziplm.runtimes.timing import (TimingStats, WideIntervalWarning, median_ci, speedup_of, time_interleaved, time_paired,
                                   warn_if_wide)
from ziplm.stages.export import encoder_inputs, export_model


def test_unknown_runtime_lists_the_available_ones():
    with pytest.raises(BadInputError, match=r"unknown runtime 'tensorrt-typo'; available runtimes: .*onnxruntime"):
        get_runtime(InferenceEnv(runtime="tensorrt-typo"))


def test_unknown_runtime_option_names_the_allowed_ones():
    with pytest.raises(BadInputError, match=r"unknown option\(s\) fast_mode.*allowed: allow_spinning, graph_optimization"):
        get_runtime(InferenceEnv(options={"fast_mode": True}))
    with pytest.raises(BadInputError, match="unknown graph_optimization 'max'"):
        get_runtime(InferenceEnv(options={"graph_optimization": "max"}))


def test_onnxruntime_describes_itself():
    info = get_runtime(InferenceEnv(threads=1)).info()
    assert info.name == "onnxruntime" and info.threads == 1 and info.version.count(".") >= 1
    assert info.device.startswith("CPU")
    assert "onnxruntime" in available_runtimes()


def test_corrupt_onnx_file_is_a_clear_error(tmp_path):
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"not an onnx model")
    with pytest.raises(BadInputError, match="onnxruntime cannot load"):
        get_runtime(InferenceEnv()).load(corrupt)


def test_median_interval_uses_order_statistics():
    assert median_ci(np.arange(1, 21)) == (6.0, 15.0)  # the textbook 95% ranks for n = 20


def test_speedup_pairs_rounds():
    baseline = TimingStats((10.0, 20.0, 10.0, 20.0, 10.0))
    candidate = TimingStats((5.0, 10.0, 5.0, 10.0, 5.0))  # every round exactly twice as fast
    speedup = speedup_of(baseline, candidate)
    assert speedup.value == 2.0 and speedup.ci_low == 2.0 and speedup.ci_high == 2.0


def test_wide_interval_warns():
    wide = speedup_of(TimingStats((10.0, 30.0, 10.0, 30.0)), TimingStats((10.0, 10.0, 10.0, 10.0)))
    with pytest.warns(WideIntervalWarning, match="wide"):
        warn_if_wide(wide, 0.05)


def test_paired_timing_finds_the_smaller_model_faster(tmp_path):
    """Two real ONNX models of clearly different size (about 50x the compute), timed interleaved."""
    env = InferenceEnv(threads=1, sequence_length=64)
    runtime = get_runtime(env)
    torch.manual_seed(0)
    large = export_model(build_model(tiny_bert_config(hidden=256, layers=4, heads=4, ffn=1024)), tmp_path / "l.onnx")
    small = export_model(build_model(tiny_bert_config(hidden=32, layers=1, heads=2, ffn=64)), tmp_path / "s.onnx")
    inputs = encoder_inputs(100, env.batch_size, env.sequence_length)
    large_session, small_session = runtime.load(large), runtime.load(small)
    speedup, large_stats, small_stats = time_paired(lambda: large_session.run(inputs),
                                                    lambda: small_session.run(inputs), rounds=15,
                                                    max_relative_width=10.0)
    assert speedup.ci_low > 1.5, speedup
    assert small_stats.median_ms < large_stats.median_ms
    assert speedup.rounds == 15


def test_paired_timing_adds_rounds_while_the_interval_is_wide():
    """A noisy pair gets more rounds, and then a warning."""
    import itertools
    import time

    jitter = itertools.cycle([0.001, 0.008])  # the candidate alternates 1 ms and 8 ms: a very wide interval
    with pytest.warns(WideIntervalWarning):
        speedup, baseline, candidate = time_paired(lambda: time.sleep(0.01), lambda: time.sleep(next(jitter)),
                                                   rounds=6, warmup=0, max_relative_width=0.01, extra_batches=2)
    assert speedup.rounds == 18 and len(baseline.samples_ms) == len(candidate.samples_ms) == 18


def test_the_garbage_collector_is_off_while_timing_and_restored_after():
    seen: list[bool] = []
    stats = time_interleaved({"a": lambda: seen.append(gc.isenabled())}, rounds=4, warmup=0)
    assert seen == [False] * 4 and len(stats["a"].samples_ms) == 4
    assert gc.isenabled()
