"""Sparsity masks: the module name of a prunable linear -> a bool tensor of its weight's shape, True where kept.

oBERT (ziplm.stages.obert) and the global magnitude baseline produce them over the family adapter's
`prunable_linears`; distillation re-applies them after every optimizer step so pruned weights stay exactly zero.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ziplm.errors import BadInputError

Masks = dict[str, torch.Tensor]


def check_masks(model: nn.Module, masks: Masks) -> None:
    """Every mask names a linear of `model` and has its weight's shape."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise BadInputError(f"mask {name!r} names no linear layer of the model: masks are keyed by module name, "
                                "as FamilyAdapter.prunable_linears returns them")
        if mask.shape != module.weight.shape or mask.dtype != torch.bool:
            raise BadInputError(f"mask {name!r} is {mask.dtype} {tuple(mask.shape)}; the weight is "
                                f"{tuple(module.weight.shape)}: build masks on the model they are applied to")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero every weight whose mask entry is False, in place."""
    for name, mask in masks.items():
        model.get_submodule(name).weight.mul_(mask)


def masks_sparsity(masks: Masks) -> float:
    """Fraction of masked (pruned) entries over all masks together."""
    total = sum(mask.numel() for mask in masks.values())
    return sum(int((~mask).sum()) for mask in masks.values()) / max(total, 1)


def global_lowest_masks(scores: dict[str, torch.Tensor], sparsity: float) -> Masks:
    """Prune exactly round(sparsity * total) entries, those with the lowest scores across all tensors together.

    Ties are broken by position, so the count is exact; a score of -inf forces an entry into the pruned set.
    """
    names = list(scores)
    flat = torch.cat([scores[name].reshape(-1) for name in names])
    kept = torch.ones_like(flat, dtype=torch.bool)
    kept[torch.argsort(flat, stable=True)[: round(sparsity * flat.numel())]] = False
    sizes = [scores[name].numel() for name in names]
    return {name: part.view_as(scores[name]) for name, part in zip(names, torch.split(kept, sizes))}


def magnitude_masks(linears: Mapping[str, nn.Linear], sparsity: float) -> Masks:
    """Prune the `sparsity` fraction of the linears' weights with the smallest |w|, one threshold across all of them,
    no weight update (the model is untouched: apply with `apply_masks`)."""
    return global_lowest_masks({name: linear.weight.detach().abs() for name, linear in linears.items()}, sparsity)


@torch.no_grad()
def at_sparsity(module: nn.Module, find_linears: Callable[[nn.Module], Mapping[str, nn.Linear]],
                sparsity: float) -> nn.Module:
    """`module` itself where its linears (`find_linears`) already have `sparsity` zeros, else a copy with the
    smallest-magnitude weights zeroed to that fraction, one threshold over all of them as oBERT prunes: a file that
    is timed for a chain's final sparsity runs on the sparse kernels the final file will (the kernels' speed depends
    on how many weights are zero per matrix, not on which)."""
    linears = find_linears(module)
    total = sum(linear.weight.numel() for linear in linears.values())
    zeros = sum(int((linear.weight == 0).sum()) for linear in linears.values())
    if not total or zeros >= round(sparsity * total):
        return module
    sparse = copy.deepcopy(module)
    apply_masks(sparse, magnitude_masks(find_linears(sparse), sparsity))
    return sparse
