"""Distillation: the loss (zero against itself, blind to padding) and fine-tuning that keeps pruned weights at zero."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from tests.conftest import toy_examples, toy_task
from ziplm.families import LayerStructure, ModelStructure, adapter_for
from ziplm.families.loading import build_model, load_model
from ziplm.errors import BadInputError
from ziplm.stages.baselines import global_magnitude_masks
from ziplm.stages.distill import DistillSettings, distill, distillation_loss

QUICK = DistillSettings(epochs=1, learning_rate=1e-3)
TASK = toy_task()


def _outputs(model, tokenizer, texts):
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return inputs, model(**inputs, output_hidden_states=True)


def test_loss_is_zero_when_the_student_is_the_teacher(tiny_bert_dir: Path) -> None:
    model = load_model(str(tiny_bert_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    inputs, out = _outputs(model, tokenizer, ["a good film", "the plot was very dull and the actor poor"])
    task_loss = F.cross_entropy(out.logits, torch.tensor([1, 0]))
    distance = TASK.output_distance(out.logits, out.logits, DistillSettings().temperature)
    loss = distillation_loss(distance, out.hidden_states[1:], out.hidden_states[1:], inputs["attention_mask"],
                             task_loss, DistillSettings())
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    with_task = DistillSettings(task_weight=1.0)
    assert float(distillation_loss(distance, out.hidden_states[1:], out.hidden_states[1:],
                                   inputs["attention_mask"], task_loss, with_task)) > 0.1


def test_token_loss_ignores_padded_tokens(tiny_bert_dir: Path) -> None:
    model = load_model(str(tiny_bert_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    inputs, out = _outputs(model, tokenizer, ["a good film", "the plot was very dull and the actor poor"])
    mask, labels = inputs["attention_mask"], torch.tensor(0.0)  # L_task is weighted 0 here
    assert not mask.all()  # the short sentence is padded
    teacher_hidden = out.hidden_states[1:]
    student_hidden = [h + 0.1 for h in teacher_hidden]
    settings = DistillSettings(logit_weight=0.0, token_weight=1.0)
    base = distillation_loss(torch.tensor(0.0), student_hidden, teacher_hidden, mask, labels, settings)
    assert float(base) == pytest.approx(0.01 * len(teacher_hidden), rel=1e-4)  # MSE 0.1^2 summed over layers
    noisy_padding = [h.masked_fill(~mask.bool()[..., None], 100.0) for h in student_hidden]
    assert torch.equal(distillation_loss(torch.tensor(0.0), noisy_padding, teacher_hidden, mask, labels, settings),
                       base)


def test_the_output_distance_of_logits_is_the_temperature_scaled_kl() -> None:
    student, teacher = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    p, q = F.softmax(teacher / 2, dim=-1), F.softmax(student / 2, dim=-1)
    expected = float((p * (p.log() - q.log())).sum()) * 4
    assert float(TASK.output_distance(student, teacher, 2.0)) == pytest.approx(expected)
    assert float(TASK.output_distance(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-7)


def test_masks_stay_exactly_zero_on_a_structurally_pruned_student(tiny_bert_dir: Path) -> None:
    teacher = load_model(str(tiny_bert_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    student = copy.deepcopy(teacher)
    adapter = adapter_for(student.config)
    structure = ModelStructure((LayerStructure(0, 64), LayerStructure(1, 0)))  # one module of each kind removed
    adapter.apply_structure(student, structure)
    masks = global_magnitude_masks(student, adapter, 0.6)
    before = {name: linear.weight.detach().clone() for name, linear in adapter.prunable_linears(student).items()}
    lines: list[str] = []
    losses = distill(student, teacher, tokenizer, TASK, toy_examples(64), QUICK.model_copy(update={"epochs": 2}),
                     lines.append, masks)
    assert len(losses) == 2 and lines[-1].startswith("epoch 2/2")
    for name, linear in adapter.prunable_linears(student).items():
        assert torch.all(linear.weight[~masks[name]] == 0)
        assert not torch.equal(linear.weight[masks[name]], before[name][masks[name]])  # the kept weights trained
    assert not teacher.training


def test_distill_rejects_a_teacher_of_another_depth(tiny_bert_dir: Path, tiny_config) -> None:
    student = load_model(str(tiny_bert_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    with pytest.raises(BadInputError, match="layer l"):
        distill(student, build_model(tiny_config), tokenizer, TASK, toy_examples(16), QUICK, lambda _: None)


def test_distillation_reduces_the_loss_towards_the_teacher(tiny_bert_dir: Path) -> None:
    teacher = load_model(str(tiny_bert_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    student = copy.deepcopy(teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in student.bert.encoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    examples = toy_examples(64)
    batch = TASK.encode(tokenizer, examples)
    labels = TASK.targets(examples, torch.device("cpu"))

    def loss() -> float:
        with torch.no_grad():
            s = student(**batch, output_hidden_states=True)
            t = teacher(**batch, output_hidden_states=True)
        distance = TASK.output_distance(s.logits, t.logits, QUICK.temperature)
        return float(distillation_loss(distance, s.hidden_states[1:], t.hidden_states[1:],
                                       batch["attention_mask"], TASK.loss(s.logits, labels), QUICK))

    before = loss()
    distill(student, teacher, tokenizer, TASK, examples, QUICK.model_copy(update={"epochs": 3}), lambda _: None)
    student.eval()  # training leaves dropout on
    assert loss() < 0.7 * before


def test_distillation_repeats_exactly_with_the_same_seed(tiny_bert_dir: Path) -> None:
    teacher = load_model(str(tiny_bert_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    assert teacher.config.hidden_dropout_prob > 0  # otherwise there is nothing for the seed to fix

    def distilled(seed: int) -> torch.Tensor:
        student = copy.deepcopy(teacher)
        distill(student, teacher, tokenizer, TASK, toy_examples(32), QUICK.model_copy(update={"seed": seed}),
                lambda _: None)
        return torch.cat([p.detach().flatten() for p in student.parameters()])

    torch.manual_seed(123)
    first = distilled(0)
    torch.manual_seed(456)  # the global RNG state does not leak into the result
    assert torch.equal(first, distilled(0))
    assert not torch.equal(first, distilled(1))
