"""The dense "teacher": a pretrained model fine-tuned on a task with the task's head (or a trained model used as it
is, ``teacher: none``), and the one training loop.

Recipe snippet::

    teacher:
      epochs: 3
      learning_rate: 5.0e-5
      warmup_fraction: 0.1
      seed: 0

Batch size and sequence length are the task's (`task.batch_size`, `task.max_length`). The teacher is a cached stage
(ziplm.cache), keyed by the model (directory digest, or the hub id as given), the task fingerprint and these
settings: a repeated call with the same inputs loads nothing and trains nothing. Its folder holds the model and
tokenizer (``save_pretrained``) and ``teacher.json`` with the metric.

``train`` is the one training loop of the project: the teacher fine-tune calls it with the task loss, distillation
(ziplm.stages.distill) with its own loss and an ``after_step`` that keeps pruned weights at zero.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from ziplm.assets import load_pretrained, resolve_model
from ziplm.cache import StageCache, default_stages, directory_digest, write_json_atomic
from ziplm.errors import BadInputError
from ziplm.tasks import Example, Metric, Task, batches
from ziplm.tasks.base import model_device

METRICS_FILE = "teacher.json"
Progress = Callable[[str], None]


class FinetuneConfig(BaseModel):
    """Settings of a fine-tune (AdamW, linear warm-up then linear decay to zero)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, ge=1)
    learning_rate: float = Field(5e-5, gt=0.0)
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0


@dataclass
class TeacherResult:
    """A cached teacher. ``seconds`` is the wall-clock of the fine-tune that built it (or of scoring a given model),
    also when ``cached``; ``given`` when the model was used as it is (``teacher: none``), not fine-tuned here."""

    path: Path
    metric: Metric
    fingerprint: str
    seconds: float
    cached: bool
    given: bool = False


def finetune_teacher(model_name_or_path: str, task: Task, config: FinetuneConfig, progress: Progress | None = None,
                     stages: StageCache | None = None) -> TeacherResult:
    """Fine-tune ``model_name_or_path`` (a name ``resolve_model`` accepts) on ``task.train``, or reuse the cache.

    The metric is measured on ``task.validation``. While training, the stage's progress (``progress``, default:
    print, when no ``stages`` are given) receives the training progress and one line with the validation metric.
    """
    source = resolve_model(model_name_or_path)
    stages = stages or default_stages(progress)
    result = stages.run("teacher", {"model": _model_identity(source), "task": task.fingerprint,
                                    "config": config.model_dump()},
                        lambda out, report: _build_teacher(source, task, config, out, report), read_metrics)
    metric, seconds = result.value
    return TeacherResult(path=result.path, metric=metric, fingerprint=result.key, seconds=seconds,
                         cached=result.cached)


def given_teacher(model_name_or_path: str, task: Task, stages: StageCache) -> tuple[Task, TeacherResult]:
    """A trained model used as it is (``teacher: none``, and always for a task that does not fine-tune): the task as
    the model reads it (``Task.adopt``: a classifier's labels by name, an encoder's pooling) and the model as the
    teacher, scored on the validation split (a cached stage whose folder holds only the score; the model stays where
    it is, untouched)."""
    source = resolve_model(model_name_or_path)
    task, model = task.adopt(source)
    result = stages.run("teacher", {"model": _model_identity(source), "task": task.fingerprint, "config": "given"},
                        lambda out, report: _score_given(model, source, task, out, report), read_metrics)
    metric, seconds = result.value
    return task, TeacherResult(path=Path(source), metric=metric, fingerprint=result.key, seconds=seconds,
                               cached=result.cached, given=True)


def _score_given(model: nn.Module, source: str, task: Task, out: Path, progress: Progress) -> None:
    start = time.perf_counter()
    progress(f"{source} is used as it is (teacher: none): scoring it")
    metric = task.evaluate(model, load_pretrained(AutoTokenizer.from_pretrained, source))
    seconds = time.perf_counter() - start
    progress(f"given model: validation {metric.summary()} on {metric.size} examples")
    write_json_atomic(out / METRICS_FILE, {"metric": metric.to_json(), "seconds": seconds, "task": task.name,
                                           "task_fingerprint": task.fingerprint, "model": source, "given": True})


def read_metrics(folder: Path) -> tuple[Metric, float]:
    """A teacher folder's validation metric and the seconds its fine-tune took."""
    record = json.loads((folder / METRICS_FILE).read_text())
    return Metric.from_json(record["metric"]), record["seconds"]


def _model_identity(source: str) -> str:
    path = Path(source)
    return directory_digest(path) if path.is_dir() else source


def _build_teacher(source: str, task: Task, config: FinetuneConfig, out: Path, progress: Progress) -> None:
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, source)
    model, new_head = task.new_model(source)
    progress(f"a new {task.head} head is trained on top of {source}" if new_head else
             f"{source} is fine-tuned with its own {task.head} head")
    losses = train(model, tokenizer, task, task.train, config, progress)
    metric = task.evaluate(model, tokenizer)
    seconds = time.perf_counter() - start
    progress(f"teacher: validation {metric.summary()} on {metric.size} examples, {seconds:.0f} s")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json_atomic(out / METRICS_FILE, {"metric": metric.to_json(), "train_size": len(task.train),
                                           "seconds": seconds, "epoch_losses": losses, "task": task.name,
                                           "task_fingerprint": task.fingerprint, "model": source,
                                           "config": config.model_dump()})


# (model, encoded batch, targets) -> scalar loss of one batch; the model is in train mode.
BatchLoss = Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
# Called with the number of optimizer steps taken so far, right after each step (masks, pruning, ...).
AfterStep = Callable[[int], None]
WEIGHT_DECAY = 0.01  # AdamW decay of the weight matrices: the usual value for fine-tuning BERT-like models
PROGRESS_EVERY_S = 10.0  # a training progress line at most this often (and one per epoch)


def train(model: nn.Module, tokenizer: object, task: Task, examples: Sequence[Example], config: FinetuneConfig,
          progress: Progress, loss: BatchLoss | None = None, after_step: AfterStep | None = None) -> list[float]:
    """The one training loop (teacher fine-tune and distillation): shuffled batches of the task's size, dynamic
    padding, AdamW without decay on biases and norms, linear warm-up then linear decay. ``loss`` defaults to the
    task's; ``after_step`` runs after every optimizer step. Reports step, loss and time left while it trains, and
    returns the mean loss per epoch.
    """
    if not examples:
        raise BadInputError("cannot train on an empty set of examples")
    loss = loss or task.batch_loss
    optimizer = torch.optim.AdamW(_parameter_groups(model, WEIGHT_DECAY), lr=config.learning_rate)
    steps = config.epochs * math.ceil(len(examples) / task.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config.warmup_fraction * steps), steps)
    generator = torch.Generator().manual_seed(config.seed)
    device = model_device(model)
    model.train()
    losses, step, start, reported = [], 0, time.perf_counter(), time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        total = 0.0
        shuffled = [examples[i] for i in torch.randperm(len(examples), generator=generator).tolist()]
        for batch in batches(shuffled, task.batch_size):
            batch_loss = loss(model, task.encode(tokenizer, batch, device), task.targets(batch, device))
            batch_loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if after_step is not None:
                after_step(step)
            total += batch_loss.item() * len(batch)
            if time.perf_counter() - reported >= PROGRESS_EVERY_S:
                reported = time.perf_counter()
                progress(training_line(epoch, config.epochs, step, steps, batch_loss.item(), reported - start))
        losses.append(total / len(examples))
        progress(training_line(epoch, config.epochs, step, steps, losses[-1], time.perf_counter() - start))
    return losses


TRAINING_LINE = "epoch "  # how a training progress line starts (a terminal shows them as one live line)
BAR_WIDTH = 20


def training_line(epoch: int, epochs: int, step: int, steps: int, loss: float, elapsed_s: float) -> str:
    """e.g. "epoch 1/3 [###.................] step 40/282, loss 0.4123, 1:02 left" (time left from the pace so far)."""
    left = elapsed_s / step * (steps - step)
    done = round(BAR_WIDTH * step / steps)
    return (f"{TRAINING_LINE}{epoch}/{epochs} [{'#' * done}{'.' * (BAR_WIDTH - done)}] step {step}/{steps}, "
            f"loss {loss:.4f}, {int(left // 60)}:{int(left % 60):02d} left")


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases and LayerNorm weights (1-D) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
