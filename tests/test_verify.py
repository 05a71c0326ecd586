"""The closed loop: the next aim (the target over the table's offset, pooled over every reading so far), and which
round a member is and which structure the chain fine-tunes next."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from ziplm.families import ModelShape, ModelStructure
from ziplm.runtimes.timing import BusyMachineWarning, Speedup, TimingStats, WideIntervalWarning
from ziplm.stages.verify import LatencyCheck, Member, PrecisionFactor, Round, next_aim, table_offset

SHAPE = ModelShape("bert", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=4, head_dim=8, ffn_size=64,
                   vocab_size=100)


def measured_round(solved_for: float, measured: float, blocks: int = 1, predicted: float | None = None) -> Round:
    check = LatencyCheck(Speedup(measured, measured * 0.99, measured * 1.01, 0.95, 30), TimingStats((10.0,)),
                         TimingStats((10.0 / measured,)), blocks=(measured,) * blocks)
    predicted = solved_for if predicted is None else predicted
    return Round(solved_for, ModelStructure.uniform(SHAPE, 2, round(solved_for * 10)), predicted, check)


def test_one_reading_re_aims_by_measured_over_predicted():
    assert next_aim(2.0, [measured_round(2.0, 1.9)]) == pytest.approx(2.0 * 2.0 / 1.9)
    # the structure the solver found for 2.0x is predicted at 2.05x: the table is off by 1.9 / 2.05 there
    assert next_aim(2.0, [measured_round(2.0, 1.9, predicted=2.05)]) == pytest.approx(2.0 * 2.05 / 1.9)


def test_the_offset_is_pooled_over_every_reading_weighted_by_its_measurements():
    # compound run 2 on the AVX2 EPYC (benchmarks/results/compound.md, commit 4ade37d), the 4x loop: six rounds of 3
    # measurements each, then the round-4 structure fine-tuned and read on 27
    predicted = [4.004, 4.3658, 4.1925, 4.2373, 4.2888, 4.339]
    measured = [3.6718, 4.3019, 3.8822, 3.911, 3.8164, 3.8912]
    rounds = [measured_round(p, m, blocks=3) for p, m in zip(predicted, measured)]
    pooled = np.exp(np.mean(np.log(np.array(measured) / predicted)))
    assert table_offset(rounds) == pytest.approx(pooled)
    assert next_aim(4.0, rounds) == pytest.approx(4.0 / pooled)
    # the finished file's offset (27 measurements) is within 1% of the pooled one; the last round alone was 2% off
    finished_offset = 3.8841 / 4.2373
    assert abs(pooled / finished_offset - 1) < 0.01 < abs(measured[-1] / predicted[-1] / finished_offset - 1)
    finished = measured_round(4.2373, 3.8841, blocks=27)
    weighted = np.exp((3 * np.log(np.array(measured) / predicted).sum() + 27 * np.log(finished_offset)) / (18 + 27))
    assert table_offset([*rounds, finished]) == pytest.approx(weighted)


def test_a_confirmed_round_counts_its_screening_and_its_verdict():
    # compound run 2, 3x: a round screened at 3.056x on 3 measurements; a verdict of 19 read its structure at 2.794x
    confirmed = measured_round(2.9886, 2.7941, blocks=19, predicted=2.9924)
    confirmed.screening = measured_round(2.9886, 3.0559, blocks=3, predicted=2.9924).check
    offset = np.exp((3 * np.log(3.0559 / 2.9924) + 19 * np.log(2.7941 / 2.9924)) / 22)
    assert table_offset([confirmed]) == pytest.approx(offset)
    assert next_aim(3.0, [confirmed]) > 3.0 * 2.9924 / 2.9


def test_a_member_chooses_among_finished_rounds_and_finishes_the_closest_new_structure():
    member = Member(2.0, rounds=[measured_round(2.0, 1.90), measured_round(2.1, 1.98)], models=["a", "b"],
                    onnx_paths=[Path("a"), Path("b")])
    assert member.chosen == 1 and member.to_finish is member.rounds[1]
    member.finish("b-finished", "b-structured", Path("b-finished"), measured_round(2.1, 1.90).check, {})
    assert member.chosen == 2 and member.model == "b-finished" and member.structured == "b-structured"
    assert member.rounds[2].stage == "finished" and member.rounds[2].structure == member.rounds[1].structure
    assert not member.passed(0.03)
    # the loop goes on: every closed-loop structure not fine-tuned yet is a candidate, earlier ones included
    member.rounds += [measured_round(2.2, 2.07), measured_round(2.15, 2.01)]
    member.models += ["c", "d"]
    member.onnx_paths += [Path("c"), Path("d")]
    assert member.to_finish is member.rounds[4]
    member.rounds[0] = measured_round(2.0, 2.005)  # an earlier structure closer still (not fine-tuned yet)
    assert member.to_finish is member.rounds[0]
    member.rounds[0] = measured_round(2.0, 1.90)
    member.finish("d-finished", "d-structured", Path("d-finished"), measured_round(2.15, 2.02).check, {})
    assert member.chosen == 5 and member.structured == "d-structured" and member.passed(0.03)


def test_nothing_is_left_to_finish_when_every_new_structure_was_fine_tuned():
    member = Member(2.0, rounds=[measured_round(2.1, 1.98)], models=["a"], onnx_paths=[Path("a")])
    member.finish("a-finished", "a-structured", Path("a-finished"), measured_round(2.1, 1.90).check, {})
    assert member.to_finish is None
    member.rounds.append(measured_round(2.1, 1.95))  # the loop went on, but came back to the same structure
    assert member.to_finish is None
    with pytest.raises(ValueError, match="no closed-loop round"):
        member.finish("again", "again", Path("again"), measured_round(2.1, 1.9).check, {})


class BlocksVerifier:
    """Stands in for a PairedVerifier beside dense FP32: the blocks it measures the dense INT8 model in."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def measure_blocks(self, member_onnx: Path, blocks: int) -> list[LatencyCheck]:
        assert blocks == len(self.values)
        return [LatencyCheck(Speedup(v, v, v, 0.95, 60), TimingStats((10.0,)), TimingStats((10.0 / v,)))
                for v in self.values]


def test_the_precision_factor_is_the_median_block_and_keeps_their_range():
    factor = PrecisionFactor.measure(BlocksVerifier([1.78, 2.27, 1.89, 1.88, 2.07]), Path("int8.onnx"), 5)
    assert factor.value == 1.89
    assert factor.to_json() == {"value": 1.89, "blocks": 5, "min": 1.78, "max": 2.27}


@pytest.fixture
def tiny_verifier(tmp_path, monkeypatch):
    """A real PairedVerifier beside a tiny exported model, whose paired timings report the other loads it is given."""
    import ziplm.stages.verify as verify
    import ziplm.runtimes.timing as timing
    from tests.conftest import tiny_bert_config
    from ziplm.families.loading import build_model
    from ziplm.runtimes import InferenceEnv, get_runtime
    from ziplm.stages.export import export_model

    env = InferenceEnv(threads=1, sequence_length=16)
    onnx = export_model(build_model(tiny_bert_config()), tmp_path / "model.onnx", 1, 16)
    loads: list[float | None] = []

    def time_paired(*_, **__):
        load = loads.pop(0) if loads else 0.0
        value = speedups.pop(0) if speedups else 2.0 + (load or 0.0)
        return Speedup(value, 1.9, 2.1, 0.95, 60, load), TimingStats((10.0,)), TimingStats((5.0,))

    monkeypatch.setattr(verify, "time_paired", time_paired)
    monkeypatch.setattr(timing, "RETAKE_PAUSE_S", 0.0)
    settings = verify.VerificationSettings(max_other_load=0.1, retakes=3)
    return verify.PairedVerifier(get_runtime(env), env, onnx, 1000, settings), onnx, loads


speedups: list[float] = []  # tiny_verifier's scripted speedups (after them: 2 + the load), emptied by each test


@pytest.fixture(autouse=True)
def _no_scripted_speedups():
    yield
    speedups.clear()


def test_a_measurement_taken_while_other_work_kept_a_core_busy_is_taken_again(tiny_verifier):
    verifier, onnx, loads = tiny_verifier
    loads += [0.9, 0.8, 0.02]  # a neighbour's burst over two measurements, then quiet
    [check] = verifier.measure_blocks(onnx, 1)
    assert check.speedup.other_load == 0.02 and check.retaken == 2 and check.disturbed == 0 and not loads
    loads += [None]  # where the load cannot be read (no /proc, or too short a span) nothing is taken again
    assert verifier.measure_blocks(onnx, 1)[0].retaken == 0


def test_a_machine_busy_through_every_retake_keeps_the_least_disturbed_reading_and_says_so(tiny_verifier):
    verifier, onnx, loads = tiny_verifier
    loads += [0.0, 0.9, 0.7, 0.8, 0.95, 0.05]  # quiet, then four tries all busy, then quiet
    with pytest.warns(BusyMachineWarning, match="1 of 3 paired measurements.*0.70 cores busy"):
        check = verifier.measure(onnx, 3)
    assert check.blocks == (2.0, 2.7, 2.05) and check.other_loads == (0.0, 0.7, 0.05)
    assert check.retaken == 3 and check.disturbed == 1 and check.speedup.value == 2.05  # the median block
    assert check.load_json() == {"other_load": [0.0, 0.7, 0.05], "retaken": 3, "disturbed": 1}


def test_a_check_says_what_other_work_did_to_it_only_when_it_did_something():
    quiet = LatencyCheck(Speedup(2.0, 1.9, 2.1, 0.95, 60), TimingStats((10.0,)), TimingStats((5.0,)), (2.0, 2.1))
    assert quiet.load_note() == ""
    busy = dataclasses.replace(quiet, other_loads=(0.02, 0.4), retaken=5, disturbed=1)
    assert busy.load_note() == (" [5 measurements taken again: the machine was busy; 1 of 2 measured while other work "
                                "kept cores busy: the speedup may be off either way]")


def test_a_verdict_whose_measurements_agree_stops_at_finished_repeats(tiny_verifier):
    verifier, onnx, _ = tiny_verifier
    speedups.extend([4.00, 4.02, 3.99, 4.01, 4.03, 3.98, 4.00, 4.01, 3.99])  # within 1% of each other
    check = verifier.verdict(onnx)
    assert len(check.blocks) == 9 and check.speedup.value == 4.00
    assert (check.speedup.ci_low, check.speedup.ci_high) == (3.99, 4.02)  # 2nd and 8th of 9: 96% (median_ci)
    assert check.speedup.confidence == 0.9609


def test_a_verdict_whose_measurements_disagree_measures_on_two_at_a_time_up_to_the_limit(tiny_verifier):
    """A host whose speed shifts between regimes for minutes: 9 measurements split wherever the shifts fall (a
    compound 4x verdict read these), so the verdict takes more, and says so when they still disagree."""
    verifier, onnx, _ = tiny_verifier
    regimes = [4.168, 4.881, 4.946, 4.878, 4.929, 3.556, 3.584, 3.709, 4.124]
    speedups.extend(regimes + [3.6, 4.9] * 9 + [4.0] * 5)
    with pytest.warns(WideIntervalWarning, match="the 27 paired measurements of model.onnx disagree"):
        check = verifier.verdict(onnx)
    assert check.blocks == tuple(regimes + [3.6, 4.9] * 9) and check.speedup.value == 4.168
    assert (check.speedup.ci_low, check.speedup.ci_high, check.speedup.confidence) == (3.6, 4.9, 0.9808)
    assert check.interval_note() == "median of 27 measurements, 98% interval [3.600, 4.900]"


def test_a_verdict_settles_as_soon_as_its_median_is_known_within_the_width(tiny_verifier):
    verifier, onnx, _ = tiny_verifier
    speedups.extend([3.6, 3.7, 4.9, 4.8] + [4.0] * 9 + [9.0] * 14)
    check = verifier.verdict(onnx)
    # the interval of 9 and of 11 is the 2nd to the next-to-last (3.7 to 4.8), of 13 the 3rd to the 11th (4.0)
    assert len(check.blocks) == 13 and check.speedup.value == 4.0 and check.speedup.ci_high == 4.0


def test_a_single_measurement_keeps_its_own_interval_and_several_get_their_medians(tiny_verifier):
    verifier, onnx, _ = tiny_verifier
    speedups.extend([2.2, 1.8, 2.0, 2.1])
    one = verifier.measure(onnx)
    assert (one.speedup.ci_low, one.speedup.ci_high, one.speedup.confidence) == (1.9, 2.1, 0.95)
    three = verifier.measure(onnx, 3)
    assert (three.speedup.value, three.speedup.ci_low, three.speedup.ci_high) == (2.0, 1.8, 2.1)
    assert three.speedup.confidence == 0.75  # the range of 3 holds their median 75% of the time


def test_a_verdict_cannot_be_capped_below_its_first_measurements():
    from pydantic import ValidationError

    from ziplm.stages.verify import VerificationSettings

    with pytest.raises(ValidationError, match=r"max_verdict_repeats \(5\) is below finished_repeats \(9\)"):
        VerificationSettings(max_verdict_repeats=5)


def test_a_round_read_within_the_tolerance_gets_a_verdict_which_must_land_within_half_of_it(tiny_verifier, tiny_table,
                                                                                           tmp_path):
    """The screen is the whole tolerance even where a chain that fine-tunes accepts within half of it: a reading of
    +2% is measured again; a verdict of +2.5% aims the next round, and one of +0.5% stops the loop."""
    from tests.conftest import tiny_bert_config
    from ziplm.families.loading import build_model
    from ziplm.stages.verify import closed_loop

    verifier, _, _ = tiny_verifier
    shape = tiny_table.model_shape
    structures = iter([ModelStructure.uniform(shape, 3, 96), ModelStructure.uniform(shape, 2, 64)])
    speedups.extend([2.04] * 3 + [2.05] * 9 + [2.02] * 3 + [2.01] * 9)  # reading, verdict; reading, verdict
    member = closed_loop(2.0, lambda _: next(structures), lambda s: build_model(tiny_bert_config(), structure=s),
                         tiny_table, verifier, tmp_path, lambda _: None, accept=0.015, confirm=True)
    assert [(r.screening.speedup.value, r.check.speedup.value) for r in member.rounds] == [(2.04, 2.05), (2.02, 2.01)]
    assert [len(r.check.blocks) for r in member.rounds] == [9, 9]
    assert member.rounds[1].solved_for < 2.0  # the first verdict read high: the next round aimed lower
