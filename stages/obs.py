"""Structured Optimal Brain Surgeon for one linear layer (ALGORITHMS.md section 1). Pure functions, no I/O.

A structure is a group M of input columns of W (d_out x d_in): an attention unit's head_dim columns of the
output projection, or one FFN neuron's column of the down projection. Greedy removal, one structure at a time:

    rho_M = 1/2 tr(W[:, M] ((Hinv)_MM)^-1 W[:, M]^T)                    saliency (loss increase)
    W    <- W - W[:, M] ((Hinv)_MM)^-1 (Hinv)_M,:     then W[:, M] = 0   weight update of the rest
    Hinv <- Hinv - (Hinv)_:,M ((Hinv)_MM)^-1 (Hinv)_M,:                  inverse-Hessian downdate

Alongside the summed saliency, the path tracks the exact layer-output reconstruction error against the undamped
H = (2/n) sum x x^T of the calibration inputs:  E(dW) = tr(dW H dW^T) = (2/n) sum ||dW x||^2,  updated per step in
O(m d^2) as dW grows by delta:  E += 2 tr(P delta^T) + tr(delta H delta^T), with P = dW H kept alongside.

Each step's weight change is kept in its low-rank form delta_k = -A_k R_k (A_k: d_out x m, R_k: m x d_in), so the
weights after any number of removals are one matrix product away (`weights_after`): the database holds every
level's updated weights for O(steps * m * (d_out + d_in)) memory instead of a full matrix per level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch



class HessianNotPositiveDefinite(ArithmeticError):
    """Cholesky of the damped Hessian failed (the stage turns this into a message for the user)."""


@dataclass(frozen=True)
class ObsPath:
    """Greedy removal of one layer's structures. Index k of the lists = after k removals (index 0 = dense)."""

    order: list[int]  # structure indices in removal order
    saliency: list[float]  # summed rho after k removals
    reconstruction: list[float]  # E(dW) after k removals
    dead_columns: int  # columns with H_ii = 0 (never activated on the calibration data)
    damping: float  # the lambda added to the diagonal
    W0: torch.Tensor  # the starting weights (dead columns zeroed)
    A: torch.Tensor  # [d_out, steps * m]: the A_k side by side
    R: torch.Tensor  # [steps * m, d_in]: the R_k stacked


def weights_after(path: ObsPath, removals: int) -> torch.Tensor:
    """W after `removals` greedy steps: W0 - sum_k A_k R_k (the removed columns come out zero up to rounding)."""
    m = path.A.shape[1] // max(len(path.order), 1)
    return path.W0 - path.A[:, : removals * m] @ path.R[: removals * m, :]


def prepare_hessian(H: torch.Tensor, W: torch.Tensor, damping_frac: float) -> tuple[torch.Tensor, torch.Tensor, int,
                                                                                       float]:
    """Dead columns (H_ii = 0) get H_ii = 1 and W[:, i] = 0; then H += lambda I, lambda = damping_frac mean(diag H).

    Returns (damped H, W with dead columns zeroed, number of dead columns, lambda). Inputs are not modified.
    """
    H = H.clone()
    W = W.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damping = damping_frac * float(torch.mean(torch.diag(H)))
    H += damping * torch.eye(H.shape[0], dtype=H.dtype)
    return H, W, int(dead.sum()), damping


def inverse_hessian(H: torch.Tensor, damping_frac: float) -> torch.Tensor:
    """Hinv = cholesky_inverse(cholesky(H)); a failure says what to change."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise HessianNotPositiveDefinite(
            f"the damped Hessian is not positive definite (damping_frac={damping_frac}): raise damping_frac "
            "(for example to 0.1) or use more calibration samples"
        )
    return torch.cholesky_inverse(L)


def group_saliency(W: torch.Tensor, Hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """rho for every group at once; groups is a [n_groups, m] index tensor (all groups of equal size m)."""
    if groups.shape[1] == 1:  # single columns: rho_j = ||W[:, j]||^2 / (2 Hinv_jj)
        columns = groups[:, 0]
        return torch.sum(W[:, columns] ** 2, dim=0) / (2 * torch.diag(Hinv)[columns])
    block_inv = torch.linalg.inv(Hinv[groups[:, :, None], groups[:, None, :]])  # [n, m, m]
    W_blocks = W[:, groups]  # [d_out, n, m]
    return 0.5 * torch.einsum("rgi,gij,rgj->g", W_blocks, block_inv, W_blocks)


def remove_group(W: torch.Tensor, Hinv: torch.Tensor, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove columns M from W with the OBS update and downdate Hinv, in place.

    Returns the weight change in low-rank form (A, R): delta = -A @ R with A = W[:, M] (Hinv_MM)^-1, R = Hinv[M, :].
    """
    block_inv = torch.linalg.inv(Hinv[M[:, None], M[None, :]])
    R = Hinv[M, :].clone()
    A = W[:, M] @ block_inv
    W -= A @ R
    Hinv -= R.T @ block_inv @ R  # Hinv is symmetric: Hinv[:, M] = R^T
    return A, R


class _Surgeon:
    """W and Hinv of one layer while structures are removed; removed columns stay exactly zero."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor, damping_frac: float) -> None:
        H_damped, self.W, self.dead_columns, self.damping = prepare_hessian(H.double(), W.double(), damping_frac)
        self.Hinv = inverse_hessian(H_damped, damping_frac)
        self.removed = torch.zeros(W.shape[1], dtype=torch.bool)

    def remove(self, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        A, R = remove_group(self.W, self.Hinv, M)
        self.removed[M] = True
        self.W[:, self.removed] = 0.0  # later updates would otherwise leave rounding residue in removed columns
        return A, R


def greedy_path(W: torch.Tensor, H: torch.Tensor, groups: torch.Tensor, damping_frac: float = 0.01) -> ObsPath:
    """Remove every group, always the one of smallest saliency; record order, both errors and every update."""
    surgeon = _Surgeon(W, H, damping_frac)
    W0 = surgeon.W.clone()
    H_true = H.double()
    P = torch.zeros_like(surgeon.W)  # dW H
    removed = torch.zeros(len(groups), dtype=torch.bool)
    order, saliency, reconstruction, updates = [], [0.0], [0.0], []
    for _ in range(len(groups)):
        remaining = torch.nonzero(~removed).flatten()
        rho = group_saliency(surgeon.W, surgeon.Hinv, groups[remaining])
        best = int(torch.argmin(rho))
        g = int(remaining[best])
        A, R = surgeon.remove(groups[g])
        delta = -A @ R
        delta_H = -A @ (R @ H_true)  # low rank: O(m d^2), not O(d_out d^2)
        error = reconstruction[-1] + 2 * float(torch.sum(P * delta)) + float(torch.sum(delta_H * delta))
        P += delta_H
        removed[g] = True
        order.append(g)
        updates.append((A, R))
        saliency.append(saliency[-1] + float(rho[best]))
        reconstruction.append(max(error, 0.0))
    A_all = torch.cat([A for A, _ in updates], dim=1)
    R_all = torch.cat([R for _, R in updates], dim=0)
    return ObsPath(order, saliency, reconstruction, surgeon.dead_columns, surgeon.damping, W0, A_all, R_all)


def column_groups(num_groups: int, group_width: int) -> torch.Tensor:
    """Contiguous groups of columns: group i is columns [i * width, (i + 1) * width) (attention units)."""
    return torch.arange(num_groups * group_width).reshape(num_groups, group_width)


def saliency_groups(W: torch.Tensor, H: torch.Tensor, group_size: int, damping_frac: float = 0.01) -> torch.Tensor:
    """Groups of `group_size` FFN neurons of similar single-column saliency ||W[:, j]||^2 / (2 Hinv_jj).

    Neurons have no natural grouping, and a fixed contiguous one would force good and bad neurons out together;
    sorting by the dense model's saliency first lets the greedy path remove the least useful neurons first.
    """
    d_in = W.shape[1]
    if d_in % group_size:
        raise ValueError(f"group size {group_size} does not divide the {d_in} FFN neurons")
    H_damped, W, _, _ = prepare_hessian(H.double(), W.double(), damping_frac)
    rho = group_saliency(W, inverse_hessian(H_damped, damping_frac), column_groups(d_in, 1))
    return torch.argsort(rho).reshape(d_in // group_size, group_size)
