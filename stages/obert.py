"""oBERT unstructured pruning: the Optimal BERT Surgeon with a block-wise empirical Fisher (ALGORITHMS.md s. 5).

Math (pure functions, paper symbols): `fisher_inverse` / `fisher_inverse_update` build Finv per block of B
consecutive weights from (1/lambda) I by Sherman-Morrison, `rho` is the saliency, `obs_update` the weight update,
`cubic_sparsity` the schedule. Orchestration: `oneshot` ramps to the target over k Fisher recomputations; `gradual`
follows the cubic schedule with distillation (ziplm.stages.distill) between pruning steps. Both prune the family
adapter's `prunable_linears` with one global threshold and return masks (ziplm.stages.masks) that only grow.

Settings (the chain's `obert` stage adds `pruning_steps` and `distillation`, stages/chain.py)::

    obert:
      sparsity: 0.8             # of the prunable weights (attention Q/K/V/O and FFN of every layer)
      block_size: 50            # B
      gradients: 256            # m, each the gradient of one mini-batch
      gradient_batch_size: 8
      damping: 1.0e-7           # lambda
      chunk: 16                 # gradients folded into Finv at once
      seed: 0

Memory does not grow with m: Finv holds d * B float64 values per linear (see `initial_fisher_inverse` for why not
float32) and a chunk of c gradients c * d float32 values; time grows linearly with m and with k. The defaults (m=256,
the low end of the paper's 256..2048) keep one Fisher at minutes on a CPU for MiniLM-sized models.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ziplm.families import adapter_for
from ziplm.errors import BadInputError, ZipLMError
from ziplm.stages.distill import DistillSettings, distill
from ziplm.tasks import Example, Task, batches
from ziplm.tasks.base import model_device
from ziplm.stages.masks import Masks, global_lowest_masks, masks_sparsity


class FisherError(ZipLMError):
    """The Fisher inverse lost positive definiteness (raise the damping)."""


class OBertSettings(BaseModel):
    """oBERT settings; see the module docstring for the defaults' cost on MiniLM."""

    model_config = ConfigDict(extra="forbid")

    sparsity: float = Field(0.8, gt=0.0, lt=1.0, description="final fraction of prunable weights set to zero")
    block_size: int = Field(50, ge=1, description="B: consecutive weights sharing one Fisher block")
    gradients: int = Field(256, ge=1, description="m: mini-batch gradients per Fisher")
    gradient_batch_size: int = Field(8, ge=1, description="examples per gradient")
    damping: float = Field(1e-7, gt=0.0, description="lambda in F = lambda I + (1/m) sum g g^T")
    chunk: int = Field(16, ge=1, description="gradients folded into Finv at once (held as chunk x weights floats)")
    seed: int = 0


# --- math (ALGORITHMS.md section 5) --------------------------------------------------------------------------------


def as_blocks(x: torch.Tensor, B: int) -> torch.Tensor:
    """The last dimension of x (... x d) as ... x nb x B, zero-padded when B does not divide d."""
    d = x.shape[-1]
    return F.pad(x, (0, -d % B)).reshape(*x.shape[:-1], -1, B)


def initial_fisher_inverse(d: int, B: int, damping: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Finv of F = lambda I: (1/lambda) I for each of ceil(d / B) blocks (padding coordinates included).

    float64 by default: with lambda = 1e-7 the eigenvalues of F span lambda .. |g|^2 / m, and in float32 the
    cancellation in the updates made Finv indefinite on MiniLM after 32 gradients.
    """
    Finv = torch.zeros(-(-d // B), B, B, dtype=dtype)
    Finv.diagonal(dim1=1, dim2=2).fill_(1.0 / damping)
    return Finv


def fisher_inverse_update(Finv: torch.Tensor, G: torch.Tensor, m: int) -> torch.Tensor:
    """Fold the gradients G (c x d) into Finv (nb x B x B), IN PLACE (Finv is the large accumulator), and return it.

    c = 1 is Sherman-Morrison, Finv <- Finv - (Finv g)(Finv g)^T / (m + g^T Finv g); c > 1 applies the same c
    steps at once by the Woodbury identity, Finv <- Finv - U (m I + G^T U)^-1 U^T with U = Finv G.
    """
    Gb = as_blocks(G.to(Finv.dtype), Finv.shape[-1]).permute(1, 2, 0)  # nb x B x c
    U = torch.bmm(Finv, Gb)
    S = torch.bmm(Gb.transpose(1, 2), U)
    S.diagonal(dim1=1, dim2=2).add_(m)
    L, info = torch.linalg.cholesky_ex(S)
    if bool((info != 0).any()):
        raise FisherError("the Fisher inverse is no longer positive definite: raise obert.damping (e.g. 1e-6)")
    return Finv.baddbmm_(U, torch.bmm(torch.cholesky_inverse(L), U.transpose(1, 2)), alpha=-1.0)


def fisher_inverse(G: torch.Tensor, damping: float, B: int, chunk: int = 1) -> torch.Tensor:
    """Finv = (lambda I + (1/m) sum g g^T)^-1 per block of B weights, from all m gradients G (m x d)."""
    Finv = initial_fisher_inverse(G.shape[1], B, damping, G.dtype)
    for start in range(0, G.shape[0], chunk):
        fisher_inverse_update(Finv, G[start : start + chunk], G.shape[0])
    return Finv


def rho(W: torch.Tensor, Finv: torch.Tensor) -> torch.Tensor:
    """Saliency of every weight, W in blocks (nb x B): rho_q = w_q^2 / (2 [Finv]_qq)."""
    return W**2 / (2 * Finv.diagonal(dim1=1, dim2=2))


def obs_update(W: torch.Tensor, Finv: torch.Tensor, pruned: torch.Tensor, newly_pruned: torch.Tensor) -> torch.Tensor:
    """The weights after pruning `newly_pruned` (all nb x B): dw = -Finv (w * newly_pruned / diag(Finv)) per block,
    then every `pruned` weight (old and new) set to zero."""
    step = W * newly_pruned / Finv.diagonal(dim1=1, dim2=2)
    W = W - torch.bmm(Finv, step.unsqueeze(-1)).squeeze(-1)
    return W.masked_fill(pruned, 0.0)


def cubic_sparsity(x: float, s_i: float, s_f: float) -> float:
    """s(x) = s_f + (s_i - s_f)(1 - x)^3 for progress x in [0, 1]: large steps first, small ones near s_f."""
    return s_f + (s_i - s_f) * (1.0 - x) ** 3


# --- orchestration -----------------------------------------------------------------------------------------------


def oneshot(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task,
            settings: OBertSettings, progress: Callable[[str], None] = print, masks: Masks | None = None,
            recomputations: int = 1) -> Masks:
    """Prune `model` in place to `settings.sparsity` of its prunable weights; returns the masks.

    The sparsity ramps along the cubic schedule over k = `recomputations` steps, each with a Fisher computed on the
    current weights from the task's training examples (the task's loss). Given `masks` are kept pruned (masks only
    grow).
    """
    masks = _start_masks(model, settings, masks)
    for sparsity in _schedule(recomputations, masks_sparsity(masks), settings.sparsity):
        masks = prune_step(model, tokenizer, task, settings, sparsity, masks, progress)
    return masks


def gradual(student: PreTrainedModel, teacher: nn.Module, tokenizer: PreTrainedTokenizerBase,
            task: Task, settings: OBertSettings, distill_settings: DistillSettings,
            progress: Callable[[str], None] = print, masks: Masks | None = None, pruning_steps: int = 4) -> Masks:
    """Gradual oBERT: `pruning_steps` steps along the cubic schedule to `settings.sparsity`, each an oBERT step
    followed by distillation from `teacher` with the masks held fixed (a fresh learning-rate schedule per step, as
    the paper fine-tunes between steps). Prunes and trains `student` in place; returns the final masks."""
    masks = _start_masks(student, settings, masks)
    for step, sparsity in enumerate(_schedule(pruning_steps, masks_sparsity(masks), settings.sparsity), 1):
        masks = prune_step(student, tokenizer, task, settings, sparsity, masks, progress)
        progress(f"gradual step {step}/{pruning_steps}: distillation at sparsity {sparsity:.4f}")
        distill(student, teacher, tokenizer, task, task.train, distill_settings, progress, masks)
    return masks


def prune_step(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task,
               settings: OBertSettings, sparsity: float, masks: Masks,
               progress: Callable[[str], None] = print) -> Masks:
    """One oBERT step: Fisher on the current weights, global lowest-rho selection to `sparsity`, OBS update."""
    start = time.perf_counter()
    linears = adapter_for(model.config).prunable_linears(model)
    Finvs = empirical_fisher_inverses(model, linears, tokenizer, task, settings, masks)
    B = settings.block_size
    with torch.no_grad():
        blocks = {name: as_blocks(linear.weight.reshape(-1), B) for name, linear in linears.items()}
        scores = {name: rho(blocks[name], Finvs[name]).reshape(-1)[: masks[name].numel()].view_as(masks[name])
                  .masked_fill(~masks[name], float("-inf")) for name in linears}  # pruned stay pruned
        new_masks = global_lowest_masks(scores, sparsity)
        for name, linear in linears.items():
            pruned = as_blocks(~new_masks[name].reshape(-1), B)
            newly_pruned = as_blocks((masks[name] & ~new_masks[name]).reshape(-1), B)
            W = obs_update(blocks[name].to(Finvs[name].dtype), Finvs[name], pruned, newly_pruned)
            linear.weight.copy_(W.reshape(-1)[: linear.weight.numel()].view_as(linear.weight))
    progress(f"oBERT: sparsity {masks_sparsity(new_masks):.4f} of {sum(m.numel() for m in masks.values())} "
             f"prunable weights, {time.perf_counter() - start:.0f} s")
    return new_masks


def empirical_fisher_inverses(model: PreTrainedModel, linears: dict[str, nn.Linear],
                              tokenizer: PreTrainedTokenizerBase, task: Task,
                              settings: OBertSettings, masks: Masks) -> dict[str, torch.Tensor]:
    """Finv per prunable linear from `settings.gradients` mini-batch gradients of the task loss (model in eval mode,
    gradients of pruned weights masked out so their Fisher stays lambda I), folded in `settings.chunk` at a time."""
    B, m = settings.block_size, settings.gradients
    Finvs = {name: initial_fisher_inverse(linear.weight.numel(), B, settings.damping) for name, linear in
             linears.items()}
    weights = [linear.weight for linear in linears.values()]
    was_training, device = model.training, model_device(model)
    model.eval()
    batches_of_examples = _gradient_batches(task.train, settings)
    for start in range(0, m, settings.chunk):
        chunk = [next(batches_of_examples) for _ in range(min(settings.chunk, m - start))]
        G = [torch.empty(len(chunk), w.numel()) for w in weights]
        for row, batch in enumerate(chunk):
            loss = task.batch_loss(model, task.encode(tokenizer, batch, device), task.targets(batch, device))
            for g_all, g, name in zip(G, torch.autograd.grad(loss, weights), linears):
                g_all[row] = (g * masks[name]).reshape(-1).cpu()
        for name, g_all in zip(linears, G):
            fisher_inverse_update(Finvs[name], g_all, m)
    model.train(was_training)
    return Finvs


def _gradient_batches(examples: Sequence[Example], settings: OBertSettings) -> Iterator[Sequence[Example]]:
    """Endless mini-batches: seeded shuffles of `examples`, one after another."""
    if not examples:
        raise BadInputError("oBERT needs examples (with labels) for its gradients; got none")
    generator = torch.Generator().manual_seed(settings.seed)
    while True:
        order = [examples[i] for i in torch.randperm(len(examples), generator=generator).tolist()]
        yield from batches(order, settings.gradient_batch_size)


def _start_masks(model: PreTrainedModel, settings: OBertSettings, masks: Masks | None) -> Masks:
    linears = adapter_for(model.config).prunable_linears(model)
    if not linears:
        raise BadInputError("the model has no prunable linear layers left (every attention and FFN module removed)")
    masks = masks or {name: torch.ones_like(linear.weight, dtype=torch.bool) for name, linear in linears.items()}
    if masks.keys() != linears.keys():
        raise BadInputError("the masks do not name the model's prunable linears: build them on this model")
    if masks_sparsity(masks) > settings.sparsity:
        raise BadInputError(f"the masks already prune {masks_sparsity(masks):.4f} of the weights, more than the target "
                            f"{settings.sparsity}: masks only grow, so ask for a higher sparsity")
    return masks


def _schedule(steps: int, s_i: float, s_f: float) -> list[float]:
    """Sparsity after each of `steps` steps along the cubic schedule; the last is exactly s_f."""
    return [cubic_sparsity(step / steps, s_i, s_f) for step in range(1, steps + 1)]
