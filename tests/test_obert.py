"""oBERT: the block Fisher inverse, the OBS update, the cubic schedule, one-shot and gradual pruning on tiny models."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer

from tests.conftest import TINY_VOCAB, toy_task
from ziplm.families import LayerStructure, ModelStructure, adapter_for
from ziplm.families.loading import build_model, load_model
from ziplm.errors import BadInputError
from ziplm.stages.baselines import global_magnitude_masks
from ziplm.stages.distill import DistillSettings
from ziplm.stages.masks import masks_sparsity
from ziplm.stages.obert import (OBertSettings, as_blocks, cubic_sparsity, fisher_inverse, gradual, obs_update,
                                oneshot, rho)

QUICK = OBertSettings(sparsity=0.5, gradients=12, gradient_batch_size=4, chunk=5, damping=1e-4)
TASK = toy_task(96)  # 48 training examples


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_fisher_inverse_is_the_inverse_of_the_damped_block_fisher(chunk: int) -> None:
    torch.manual_seed(0)
    m, d, B, damping = 7, 23, 5, 1e-2  # 23 is not a multiple of 5: the last block is padded
    G = torch.randn(m, d, dtype=torch.float64)
    Finv = fisher_inverse(G, damping, B, chunk)
    assert Finv.shape == (5, B, B)
    Gb = as_blocks(G, B)  # m x nb x B
    for block in range(5):
        F = damping * torch.eye(B, dtype=torch.float64) + Gb[:, block].T @ Gb[:, block] / m
        assert torch.allclose(Finv[block], torch.linalg.inv(F), rtol=1e-9, atol=1e-9)


def test_obs_update_of_one_weight_is_the_closed_form_and_beats_zeroing() -> None:
    torch.manual_seed(1)
    B, q = 6, 2
    G = torch.randn(20, B, dtype=torch.float64)
    Finv = fisher_inverse(G, 1e-3, B)
    F = torch.linalg.inv(Finv[0])
    W = torch.randn(1, B, dtype=torch.float64)
    pruned = torch.zeros(1, B, dtype=torch.bool)
    pruned[0, q] = True
    updated = obs_update(W, Finv, pruned, pruned)
    closed_form = W[0] - W[0, q] / Finv[0, q, q] * Finv[0, :, q]
    assert torch.allclose(updated[0], closed_form.masked_fill(pruned[0], 0.0))
    assert updated[0, q] == 0.0
    quadratic_loss = lambda dw: 0.5 * dw @ F @ dw  # noqa: E731  (loss increase of the local quadratic model)
    obs_loss = quadratic_loss(updated[0] - W[0])
    zeroing_loss = quadratic_loss(W[0].masked_fill(pruned[0], 0.0) - W[0])
    assert obs_loss == pytest.approx(float(rho(W, Finv)[0, q]), rel=1e-6)  # rho is the predicted increase
    assert obs_loss < zeroing_loss


def test_cubic_schedule_endpoints_and_monotonicity() -> None:
    assert cubic_sparsity(0.0, 0.1, 0.8) == pytest.approx(0.1)
    assert cubic_sparsity(1.0, 0.1, 0.8) == pytest.approx(0.8)
    values = [cubic_sparsity(x / 20, 0.0, 0.9) for x in range(21)]
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(step > 0 for step in steps)
    assert all(later < earlier for earlier, later in zip(steps, steps[1:]))  # large steps first


def _prunable_and_rest(model) -> tuple[dict, dict]:
    names = {f"{name}.weight" for name in adapter_for(model.config).prunable_linears(model)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {k: v for k, v in state.items() if k in names}, {k: v for k, v in state.items() if k not in names}


@pytest.mark.parametrize("structure", [None, ModelStructure((LayerStructure(0, 64), LayerStructure(2, 0),
                                                              LayerStructure(4, 128)))],
                         ids=["dense", "structurally-pruned"])
@pytest.mark.parametrize("recomputations", [1, 3])
def test_oneshot_reaches_the_exact_sparsity_and_touches_only_prunable_weights(tiny_config, tiny_bert_dir: Path,
                                                                                structure, recomputations) -> None:
    torch.manual_seed(0)
    config = copy.deepcopy(tiny_config)
    config.vocab_size = len(TINY_VOCAB)
    model = build_model(config, structure=structure)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    linears = adapter_for(config).prunable_linears(model)
    if structure is not None:
        assert not any(name.startswith("bert.encoder.layer.0.attention") for name in linears)
        assert not any(name.startswith("bert.encoder.layer.1.output") for name in linears)
    before_prunable, before_rest = _prunable_and_rest(model)
    settings = QUICK.model_copy(update={"sparsity": 0.6})
    masks = oneshot(model, tokenizer, TASK, settings, progress=lambda _: None, recomputations=recomputations)
    total = sum(mask.numel() for mask in masks.values())
    assert sum(int((~mask).sum()) for mask in masks.values()) == round(0.6 * total)
    after_prunable, after_rest = _prunable_and_rest(model)
    assert all(torch.equal(before_rest[k], after_rest[k]) for k in before_rest)
    for name, mask in masks.items():
        weight = after_prunable[f"{name}.weight"]
        assert torch.all(weight[~mask] == 0)
    changed_kept = [not torch.equal(after_prunable[f"{n}.weight"][m], before_prunable[f"{n}.weight"][m])
                    for n, m in masks.items()]
    assert any(changed_kept)  # the OBS update moved the weights it kept


def test_oneshot_keeps_given_masks_and_rejects_shrinking_them(tiny_bert_dir: Path) -> None:
    model = load_model(str(tiny_bert_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    first = oneshot(model, tokenizer, TASK, QUICK.model_copy(update={"sparsity": 0.3}), lambda _: None)
    second = oneshot(model, tokenizer, TASK, QUICK, lambda _: None, masks=first)
    assert all(torch.all(second[name][~first[name]] == False) for name in first)  # noqa: E712
    assert masks_sparsity(second) == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(BadInputError, match="only grow"):
        oneshot(model, tokenizer, TASK, QUICK.model_copy(update={"sparsity": 0.2}), lambda _: None,
                masks=second)


def test_global_magnitude_masks_prune_the_smallest_weights_across_layers(tiny_config) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config)
    adapter = adapter_for(tiny_config)
    masks = global_magnitude_masks(model, adapter, 0.7)
    linears = adapter.prunable_linears(model)
    kept = torch.cat([linears[n].weight.detach().abs()[m] for n, m in masks.items()])
    pruned = torch.cat([linears[n].weight.detach().abs()[~m] for n, m in masks.items()])
    assert pruned.max() <= kept.min()
    assert masks_sparsity(masks) == pytest.approx(0.7, abs=1e-4)
    per_layer = [1 - float(m.float().mean()) for m in masks.values()]
    assert max(per_layer) - min(per_layer) > 0.01  # one global threshold, not a uniform per-layer sparsity


def test_gradual_reaches_the_final_sparsity_with_masks_that_only_grow(tiny_bert_dir: Path) -> None:
    student, teacher = load_model(str(tiny_bert_dir)), load_model(str(tiny_bert_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    settings = QUICK.model_copy(update={"sparsity": 0.7})
    lines: list[str] = []
    masks = gradual(student, teacher, tokenizer, TASK, settings, DistillSettings(epochs=1), lines.append,
                    pruning_steps=3)
    assert masks_sparsity(masks) == pytest.approx(0.7, abs=1e-3)
    assert sum(line.startswith("gradual step") for line in lines) == 3
    linears = adapter_for(student.config).prunable_linears(student)
    assert all(torch.all(linears[name].weight[~mask] == 0) for name, mask in masks.items())


def test_settings_reject_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValidationError):
        OBertSettings(sparsty=0.5)
    with pytest.raises(ValidationError):
        OBertSettings(sparsity=1.0)
