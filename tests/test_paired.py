"""Paired verification: measurements taken again under load, verdicts that settle, the precision factor, and the
measurement policies behind the recipe's `effort`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ziplm.runtimes.paired import LatencyCheck, SpeedFactor
from ziplm.runtimes.policy import POLICIES
from ziplm.runtimes.timing import BusyMachineWarning, Speedup, TimingStats, WideIntervalWarning

class BlocksVerifier:
    """Stands in for a PairedVerifier beside dense FP32: the blocks it measures the dense INT8 model in."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def measure_blocks(self, member_onnx: Path, blocks: int) -> list[LatencyCheck]:
        assert blocks == len(self.values)
        return [LatencyCheck(Speedup(v, v, v, 0.95, 60), TimingStats((10.0,)), TimingStats((10.0 / v,)))
                for v in self.values]


def test_the_precision_factor_is_the_median_block_and_keeps_their_range():
    factor = SpeedFactor.measure(BlocksVerifier([1.78, 2.27, 1.89, 1.88, 2.07]), Path("int8.onnx"), 5)
    assert factor.value == 1.89
    assert factor.to_json() == {"value": 1.89, "blocks": 5, "min": 1.78, "max": 2.27}


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


def test_a_verdict_whose_measurements_agree_stops_at_its_first_measurements(tiny_verifier, speedups):
    verifier, onnx, _ = tiny_verifier
    speedups.extend([4.00, 4.02, 3.99, 4.01, 4.03, 3.98, 4.00, 4.01, 3.99])  # within 1% of each other
    check = verifier.verdict(onnx)
    assert len(check.blocks) == 9 and check.speedup.value == 4.00
    assert (check.speedup.ci_low, check.speedup.ci_high) == (3.99, 4.02)  # 2nd and 8th of 9: 96% (median_ci)
    assert check.speedup.confidence == 0.9609


def test_a_verdict_whose_measurements_disagree_measures_on_two_at_a_time_up_to_the_limit(tiny_verifier, speedups):
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


def test_a_verdict_settles_as_soon_as_its_median_is_known_within_the_width(tiny_verifier, speedups):
    verifier, onnx, _ = tiny_verifier
    speedups.extend([3.6, 3.7, 4.9, 4.8] + [4.0] * 9 + [9.0] * 14)
    check = verifier.verdict(onnx)
    # the interval of 9 and of 11 is the 2nd to the next-to-last (3.7 to 4.8), of 13 the 3rd to the 11th (4.0)
    assert len(check.blocks) == 13 and check.speedup.value == 4.0 and check.speedup.ci_high == 4.0


def test_a_single_measurement_keeps_its_own_interval_and_several_get_their_medians(tiny_verifier, speedups):
    verifier, onnx, _ = tiny_verifier
    speedups.extend([2.2, 1.8, 2.0, 2.1])
    one = verifier.measure(onnx)
    assert (one.speedup.ci_low, one.speedup.ci_high, one.speedup.confidence) == (1.9, 2.1, 0.95)
    three = verifier.measure(onnx, 3)
    assert (three.speedup.value, three.speedup.ci_low, three.speedup.ci_high) == (2.0, 1.8, 2.1)
    assert three.speedup.confidence == 0.75  # the range of 3 holds their median 75% of the time


def test_every_effort_measures_at_least_as_much_as_the_one_below_it():
    """A verdict never caps below its first measurements, and `thorough` never measures less than `standard`, nor
    `standard` than `quick`, in any count."""
    counts = ("timing_rounds", "round_repeats", "verdict_repeats", "max_verdict_repeats", "precision_blocks",
              "block_rounds", "calibration_rounds", "random_calibration_models", "retakes")
    for policy in POLICIES.values():
        assert policy.max_verdict_repeats >= policy.verdict_repeats
    for lower, higher in (("quick", "standard"), ("standard", "thorough")):
        assert all(getattr(POLICIES[lower], c) <= getattr(POLICIES[higher], c) for c in counts), (lower, higher)
