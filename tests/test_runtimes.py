"""The runtime registry, the timing harness and paired speedups on real ONNX Runtime sessions."""

from __future__ import annotations

import gc
import time
from dataclasses import astuple

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import skip_missing_engine, tiny_bert_config
from ziplm.families.loading import build_model
from ziplm.errors import BadInputError, MissingEngineError
from ziplm.runtimes import InferenceEnv, available_runtimes, get_runtime
from ziplm.runtimes.base import runtime_class
from ziplm.runtimes import timing
from ziplm.runtimes.timing import (CpuSnapshot, LoadGuard, MachineLoad, TimingStats, WideIntervalWarning, cpu_snapshot,
                                   median_ci, median_ci_coverage, median_half_width, other_load, speedup_of,
                                   time_interleaved, time_interleaved_guarded, time_paired, TimingSpan, warn_if_wide)
from ziplm.runtimes.policy import policy
from ziplm.families import adapter_for
from ziplm.pipeline.cli import app
from ziplm.stages.export import export_model


def test_unknown_runtime_lists_the_available_ones():
    with pytest.raises(BadInputError, match=r"unknown runtime 'tensorrt-typo'; available runtimes: .*onnxruntime"):
        get_runtime(InferenceEnv(runtime="tensorrt-typo"))


def test_unknown_runtime_option_names_the_allowed_ones():
    with pytest.raises(BadInputError,
                       match=r"unknown option\(s\) fast_mode.*allowed: allow_spinning, graph_optimization"):
        get_runtime(InferenceEnv(options={"fast_mode": True}))
    with pytest.raises(BadInputError, match="unknown graph_optimization 'max'"):
        get_runtime(InferenceEnv(options={"graph_optimization": "max"}))


def test_onnxruntime_describes_itself():
    info = get_runtime(InferenceEnv(threads=1)).info()
    assert info.name == "onnxruntime" and info.threads == 1 and info.version.count(".") >= 1
    assert info.device.startswith("CPU")
    assert "onnxruntime" in available_runtimes()


@pytest.mark.parametrize("runtime", available_runtimes())
def test_every_registered_runtime_runs_the_tiny_model_as_onnx_runtime_does(runtime, tmp_path):
    """A runtime registered without being able to load and run our files fails here."""
    config = tiny_bert_config()
    torch.manual_seed(0)
    path = export_model(build_model(config), tmp_path / "model.onnx", 1, 16, program=runtime_class(runtime).program)
    inputs = adapter_for(config).example_inputs(config, 1, 16)
    env = InferenceEnv(runtime=runtime, threads=1, sequence_length=16)
    try:
        session = get_runtime(env).load(path)
    except MissingEngineError as missing:  # only a missing engine skips (or fails where required)
        skip_missing_engine(runtime, str(missing))
    assert set(session.input_names) == set(inputs) and get_runtime(env).info().name == runtime
    (expected,) = get_runtime(InferenceEnv(threads=1)).load(path).run(inputs)
    np.testing.assert_allclose(session.run(inputs)[0], expected, rtol=1e-4, atol=1e-5)


CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(CUDA, reason="this onnxruntime has the CUDA provider: the refusal cannot happen here")
def test_the_gpu_runtime_without_cuda_names_what_to_install():
    with pytest.raises(MissingEngineError, match=r"needs ONNX Runtime's CUDAExecutionProvider.*install "
                                                 r"onnxruntime-gpu==.*CUDA 13 and cuDNN 9"):
        get_runtime(InferenceEnv(runtime="onnxruntime-gpu"))
    result = CliRunner().invoke(app, ["latency-table", "--model", "bert-base", "--runtime", "onnxruntime-gpu"])
    assert result.exit_code == 2 and "install onnxruntime-gpu" in " ".join(result.output.split())


@pytest.mark.parametrize("options, message", [({"provider": "rocm"}, "unknown provider 'rocm'"),
                                              ({"fp16": True}, "fp16 builds TensorRT engines")])
def test_the_gpu_runtime_refuses_settings_it_cannot_honour(options, message):
    with pytest.raises(BadInputError, match=message):
        get_runtime(InferenceEnv(runtime="onnxruntime-gpu", options=options))


def test_corrupt_onnx_file_is_a_clear_error(tmp_path):
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"not an onnx model")
    with pytest.raises(BadInputError, match="onnxruntime cannot load"):
        get_runtime(InferenceEnv()).load(corrupt)


def test_median_interval_uses_order_statistics():
    assert median_ci(np.arange(1, 21)) == (6.0, 15.0)  # the textbook 95% ranks for n = 20
    assert round(median_ci_coverage(20, 0.95), 4) == 0.9586  # 1 - 2 P(Bin(20, 1/2) <= 5)
    assert median_ci_coverage(3, 0.95) == 0.75  # too few for 95%: their range, 1 - 2 / 2^3
    assert median_half_width([3.9, 4.0, 4.2]) == pytest.approx(0.05)  # the larger side: 4.2 / 4.0 - 1


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
    config = tiny_bert_config()
    inputs = adapter_for(config).example_inputs(config, env.batch_size, env.sequence_length)
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


def write_proc(root, busy_and_idle: tuple[int, int], own: int, steal: int = 0) -> None:
    """A /proc with a 2-CPU /proc/stat (user, nice, system, idle, iowait, irq, softirq, steal) and /proc/self/stat."""
    busy, idle = busy_and_idle
    (root / "self").mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 {steal} 0 0\ncpu0 1 0 0 1\ncpu1 1 0 0 1\nintr 5\n")
    (root / "self" / "stat").write_text(f"42 (python (odd name)) R 1 1 1 0 -1 0 0 0 0 0 {own} 0 0 0 20 0 3 0\n")


def test_other_load_counts_every_busy_tick_but_this_process_s(tmp_path):
    write_proc(tmp_path, (1000, 3000), own=400)
    before = cpu_snapshot(tmp_path)
    # 200 ticks later on each of 2 CPUs (2 s at 100 Hz): 300 busy ticks, 180 of them this process's, 40 stolen
    write_proc(tmp_path, (1260, 3100), own=580, steal=40)
    after = cpu_snapshot(tmp_path)
    assert before == CpuSnapshot(busy=1000, elapsed=4000, own=400, cpus=2)
    assert other_load(before, after) == pytest.approx((300 - 180) / 200)
    assert other_load(before, None) is None and cpu_snapshot(tmp_path / "absent") is None


def test_an_engine_workers_cpu_time_is_this_processs_own(tmp_path, monkeypatch):
    write_proc(tmp_path, (1000, 3000), own=400)
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "stat").write_text("77 (python) S 42 1 1 0 -1 0 0 0 0 0 150 30 0 0 20 0 9 0\n")
    monkeypatch.setattr(timing, "OWN_WORKERS", {77, 78})  # 78 has ended: nothing of it is read
    assert cpu_snapshot(tmp_path).own == 400 + 150 + 30


def test_other_load_is_unknown_over_a_span_too_short_to_count():
    before = CpuSnapshot(busy=0, elapsed=0, own=0, cpus=2)
    assert other_load(before, CpuSnapshot(busy=10, elapsed=2 * 20, own=0, cpus=2)) is None  # 0.2 s
    assert other_load(before, CpuSnapshot(busy=10, elapsed=2 * 100, own=0, cpus=2)) == pytest.approx(0.1)


def test_a_busy_process_beside_a_paired_timing_is_read_as_load():
    import subprocess
    import sys
    import time

    def sleepers() -> float | None:  # the timed calls sleep, so a busy loop gets a whole core
        speedup, _, _ = time_paired(lambda: time.sleep(0.005), lambda: time.sleep(0.005), rounds=80, warmup=0,
                                    max_relative_width=10.0)
        return speedup.other_load

    assert sleepers() < 0.5
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        assert sleepers() > 0.5
    finally:
        busy.kill()
        busy.wait()


@pytest.fixture
def scripted_loads(monkeypatch):
    """Guarded timings read the other loads they are given, one per chunk taken, with no pause between retakes."""
    loads: list[float | None] = []
    monkeypatch.setattr(timing, "with_load", lambda measure: (measure(), loads.pop(0)))
    monkeypatch.setattr(timing, "RETAKE_PAUSE_S", 0.0)
    monkeypatch.setattr(timing, "GUARD_CHUNK_S", 0.0)  # chunks of two rounds
    return loads


def test_a_guarded_timing_takes_a_busy_chunk_again_and_keeps_the_least_disturbed(scripted_loads):
    calls = {"a": 0, "b": 0}
    runners = {name: (lambda n=name: calls.__setitem__(n, calls[n] + 1)) for name in calls}
    # chunk 1 quiet; chunk 2 busy, then quiet; chunk 3 busy through all four tries (the 0.6 one counts)
    scripted_loads += [0.0, 0.9, 0.05, 0.9, 0.6, 0.8, 0.7]
    stats, load = time_interleaved_guarded(runners, rounds=6, warmup=1, guard=LoadGuard(0.1, retakes=3))
    assert load == MachineLoad(other_loads=(0.0, 0.05, 0.6), retaken=4, disturbed=1) and not scripted_loads
    assert [len(stats[name].samples_ms) for name in runners] == [6, 6]
    assert calls == {"a": 1 + 2 * 7, "b": 1 + 2 * 7}  # warm-up, then seven chunks of two rounds were timed
    assert load.note("chunks") == "4 chunks taken again: the machine was busy; 1 of 3 measured while other work " \
                                  "kept cores busy"
    assert load.to_json() == {"other_load": [0.0, 0.05, 0.6], "retaken": 4, "disturbed": 1}


def test_a_load_that_cannot_be_read_is_not_taken_again(scripted_loads):
    scripted_loads += [None, None, None]
    _, load = time_interleaved_guarded({"a": lambda: None}, rounds=5, warmup=0, guard=LoadGuard(0.1, retakes=3))
    assert load == MachineLoad((None, None, None), 0, 0) and load.note("chunks") == ""


def test_a_timing_given_seconds_stops_at_an_even_round_after_them():
    stats = time_interleaved({"a": lambda: time.sleep(0.02), "b": lambda: None}, rounds=1000, warmup=0,
                             max_seconds=0.5)
    assert 10 <= len(stats["a"].samples_ms) <= 26 and len(stats["a"].samples_ms) % 2 == 0


def test_a_paired_timing_with_a_span_stops_after_its_seconds_but_not_before_its_minimum_of_rounds():
    slow, fast = (lambda: time.sleep(0.02)), (lambda: time.sleep(0.01))  # sleeps: a speedup near 2x, never wide
    _, short, _ = time_paired(slow, fast, rounds=1000, warmup=0, max_relative_width=10.0,
                              span=TimingSpan(seconds=0.2, min_rounds=4))
    _, floored, _ = time_paired(slow, fast, rounds=1000, warmup=0, max_relative_width=10.0,
                                span=TimingSpan(seconds=0.01, min_rounds=12))
    _, unbounded, _ = time_paired(slow, fast, rounds=14, warmup=0, max_relative_width=10.0)
    assert 4 <= len(short.samples_ms) <= 14
    assert len(floored.samples_ms) == 12
    assert len(unbounded.samples_ms) == 14


def test_the_standard_policy_times_a_slow_model_for_seconds_and_a_fast_one_for_all_its_rounds():
    standard = policy("standard")
    slow = time_interleaved({"a": lambda: time.sleep(0.16)}, standard.timing_rounds, 0, *astuple(standard.span))
    fast = time_interleaved({"a": lambda: None}, standard.timing_rounds, 0, *astuple(standard.span))
    assert len(slow["a"].samples_ms) == standard.min_timing_rounds < standard.timing_rounds
    assert len(fast["a"].samples_ms) == standard.timing_rounds
