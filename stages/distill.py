"""Distillation fine-tuning from the dense teacher (ALGORITHMS.md section 4), for pruned students.

    L = l1 * L_task + l2 * L_logit + l3 * L_token

L_task is the task's own loss (cross-entropy with the labels for classification), L_logit the task's distance between
the student's and the teacher's outputs (Task.output_distance: for logits, the KL divergence of the output
distributions at temperature T, scaled by T^2 so its gradients keep their size as T changes; for sentence
embeddings, one minus their cosine), and L_token the mean squared error between student and teacher hidden states
over the real (unpadded) tokens, summed over every layer output. Structured pruning keeps depth and hidden size, so
layer l of the student learns from layer l of the teacher.

Recipe snippet (the fields of FinetuneConfig plus the loss weights)::

    distillation:
      task_weight: 0.0        # l1
      logit_weight: 0.5       # l2
      token_weight: 0.5       # l3
      temperature: 2.0
      epochs: 2
      learning_rate: 8.0e-5
      warmup_fraction: 0.0
      seed: 0

Defaults: the paper's GLUE weights and learning rate (l1=0, l2=0.5, l3=0.5, lr 8e-5 with linear decay; seeds/002,
Table 7), and T=2, the value the oBERT recipes use. The paper fine-tunes 8 epochs between pruning steps; 2 is the
default here because every epoch also runs the teacher, and CPUs are the target (raise it where there is a GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers import PreTrainedTokenizerBase

from ziplm.errors import BadInputError
from ziplm.stages.finetune import FinetuneConfig, train
from ziplm.tasks import Example, Task
from ziplm.stages.masks import Masks, apply_masks, check_masks


class DistillSettings(FinetuneConfig):
    """Loss weights and temperature on top of the shared training settings (unknown keys are rejected)."""

    task_weight: float = Field(0.0, ge=0.0, description="l1: the task's loss (cross-entropy with the labels)")
    logit_weight: float = Field(0.5, ge=0.0, description="l2: the task's output distance (logits: KL at temperature)")
    token_weight: float = Field(0.5, ge=0.0, description="l3: hidden-state MSE at every layer output")
    temperature: float = Field(2.0, gt=0.0)
    epochs: int = Field(2, ge=1)
    learning_rate: float = Field(8e-5, gt=0.0)
    warmup_fraction: float = Field(0.0, ge=0.0, lt=1.0)


def distillation_loss(
    output: torch.Tensor,
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    task_loss: torch.Tensor | float,
    settings: DistillSettings,
) -> torch.Tensor:
    """L = l1 L_task + l2 L_output + l3 L_token for one batch (`output`: the task's distance between the student's and
    the teacher's outputs, Task.output_distance; hidden states: one [b, s, h] tensor per layer output; `task_loss`:
    L_task, computed by the task)."""
    real = attention_mask.bool()
    token = sum(F.mse_loss(s[real], t[real]) for s, t in zip(student_hidden, teacher_hidden))
    return settings.task_weight * task_loss + settings.logit_weight * output + settings.token_weight * token


def distill(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
    settings: DistillSettings,
    progress: Callable[[str], None] = print,
    masks: Masks | None = None,
) -> list[float]:
    """Fine-tune `student` in place against the frozen `teacher` (left in eval mode); mean loss per epoch.

    Shuffling and dropout both follow `settings.seed`: the same student, data and settings give the same weights.

    `masks` (see ziplm.stages.masks) are applied before the first step and after every optimizer step, so pruned
    weights stay exactly zero. The student may be structurally pruned (modules removed, fewer heads or neurons).
    """
    _check_depth(student, teacher)
    if masks:
        check_masks(student, masks)
        apply_masks(student, masks)
    teacher.eval()

    def loss(model: nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(**inputs, output_hidden_states=True)
        output = model(**inputs, output_hidden_states=True)
        student_outputs = task.outputs(output, inputs)
        distance = task.output_distance(student_outputs, task.outputs(target, inputs), settings.temperature)
        task_loss = task.loss(student_outputs, targets) if settings.task_weight else 0.0  # some tasks have none
        return distillation_loss(distance, output.hidden_states[1:], target.hidden_states[1:],
                                 inputs["attention_mask"], task_loss, settings)

    after_step = (lambda _: apply_masks(student, masks)) if masks else None
    try:
        with torch.random.fork_rng():  # seeded dropout, so a member's fine-tuning repeats; the caller's RNG untouched
            torch.manual_seed(settings.seed)
            return train(student, tokenizer, task, examples, settings, progress, loss, after_step)
    finally:
        drop_output_hooks(student)
        drop_output_hooks(teacher)


def drop_output_hooks(model: nn.Module) -> None:
    """Remove the forward hooks transformers installs on the first `output_hidden_states` call.

    They are local functions, so a model holding them cannot be deep-copied or pickled; transformers installs them
    again on the next such call.
    """
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") == "output_capturing_hook":
                del module._forward_hooks[key]
        if getattr(module, "_output_capturing_hooks_installed", False):
            module._output_capturing_hooks_installed = False


def _check_depth(student: nn.Module, teacher: nn.Module) -> None:
    s, t = student.config, teacher.config
    if (s.num_hidden_layers, s.hidden_size) != (t.num_hidden_layers, t.hidden_size):
        raise BadInputError(
            f"student has {s.num_hidden_layers} layers of width {s.hidden_size}, teacher {t.num_hidden_layers} of "
            f"{t.hidden_size}: token distillation pairs layer l with layer l; distil from the dense model the "
            "student was pruned from"
        )
