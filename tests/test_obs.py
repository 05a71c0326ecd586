"""Structured OBS on tiny synthetic layers: the oracle check against measured output error, and the edge cases."""

from __future__ import annotations

import pytest
import torch

from ziplm.stages import obs


@pytest.fixture
def layer():
    torch.manual_seed(0)
    d_out, d_in, n = 12, 24, 400
    mixing = torch.randn(d_in, 8, dtype=torch.float64)  # correlated inputs, as real activations are
    X = mixing @ torch.randn(8, n, dtype=torch.float64) + 0.3 * torch.randn(d_in, n, dtype=torch.float64)
    X[5] = 0.0  # a dead input column: never activated on the calibration data
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    return W, X, 2.0 / n * X @ X.T


def measured_error(W0: torch.Tensor, W: torch.Tensor, X: torch.Tensor) -> float:
    """(2/n) sum ||(W - W0) x||^2 on the calibration inputs themselves."""
    return float(2.0 / X.shape[1] * ((W - W0) @ X).pow(2).sum())


@pytest.mark.parametrize("width", [1, 4], ids=["single-columns", "groups-of-4"])
def test_path_errors_equal_measured_output_error(layer, width):
    W, X, H = layer
    groups = obs.column_groups(24 // width, width)
    path = obs.greedy_path(W, H, groups, damping_frac=1e-10)
    W0 = W.clone()
    W0[:, 5] = 0.0
    for k in range(len(groups) + 1):
        W_k = obs.weights_after(path, k)
        assert path.reconstruction[k] == pytest.approx(measured_error(W0, W_k, X), rel=1e-6, abs=1e-9)
        # with (almost) no damping, OBS's predicted loss is half the measured squared error: rho has the 1/2
        assert path.saliency[k] == pytest.approx(path.reconstruction[k] / 2, rel=1e-4, abs=1e-9)
    assert path.dead_columns == 1
    assert sorted(path.order) == list(range(len(groups)))


def test_removed_columns_are_zero_and_errors_grow(layer):
    W, _, H = layer
    groups = obs.column_groups(6, 4)
    path = obs.greedy_path(W, H, groups)
    snapshot = obs.weights_after(path, 3)
    for g in path.order[:3]:
        assert torch.allclose(snapshot[:, groups[g]], torch.zeros(12, 4, dtype=torch.float64), atol=1e-12)
    assert all(b >= a for a, b in zip(path.reconstruction, path.reconstruction[1:]))


def test_obs_update_beats_plain_removal(layer):
    """The weight update of the remaining columns must lower the output error versus just zeroing."""
    W, X, H = layer
    groups = obs.column_groups(24, 1)
    path = obs.greedy_path(W, H, groups, damping_frac=1e-10)
    removed = groups[path.order[:8]].flatten()
    zeroed = W.clone()
    zeroed[:, 5] = 0.0
    W0 = zeroed.clone()
    zeroed[:, removed] = 0.0
    assert path.reconstruction[8] < 0.5 * measured_error(W0, zeroed, X)


def test_greedy_removes_the_cheapest_first():
    W = torch.eye(3, dtype=torch.float64) * torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    path = obs.greedy_path(W, torch.eye(3, dtype=torch.float64), obs.column_groups(3, 1), damping_frac=1e-12)
    assert path.order == [1, 2, 0]


def test_saliency_groups_sort_neurons_by_importance():
    W = torch.diag(torch.tensor([4.0, 1.0, 3.0, 2.0], dtype=torch.float64))
    groups = obs.saliency_groups(W, torch.eye(4, dtype=torch.float64), group_size=2)
    assert groups.tolist() == [[1, 3], [2, 0]]
    with pytest.raises(ValueError, match="does not divide"):
        obs.saliency_groups(W, torch.eye(4, dtype=torch.float64), group_size=3)


def test_indefinite_hessian_says_what_to_change():
    H = -torch.eye(4, dtype=torch.float64)
    H[0, 0] = 1.0
    with pytest.raises(obs.HessianNotPositiveDefinite, match="raise damping_frac"):
        obs.greedy_path(torch.ones(2, 4, dtype=torch.float64), H, obs.column_groups(4, 1), damping_frac=0.01)
