"""The dense "teacher": a pretrained encoder fine-tuned for sequence classification on a task.

Recipe snippet::

    finetune:
      epochs: 3
      learning_rate: 5.0e-5
      batch_size: 32
      max_length: 128
      weight_decay: 0.01
      warmup_fraction: 0.1
      seed: 0

The teacher is cached under ``<cache_root()>/teachers/<key>``, keyed by the model (directory digest, or the hub id
as given), the task fingerprint and this config: a repeated call with the same inputs loads nothing and trains
nothing. The directory holds the model and tokenizer (``save_pretrained``) and ``teacher.json`` with the metrics.

``train`` is the one training loop of the project: the teacher fine-tune calls it with the task loss, distillation
(ziplm.stages.distill) with its own loss and an ``after_step`` that keeps pruned weights at zero.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase
from transformers import get_linear_schedule_with_warmup

from ziplm.assets import load_pretrained, resolve_model
from ziplm.cache import cache_root, cached_directory, directory_digest, fingerprint, write_json_atomic
from ziplm.errors import BadInputError
from ziplm.tasks.classification import Example, TaskData

TEACHER_KIND = "teachers"
METRICS_FILE = "teacher.json"


class FinetuneConfig(BaseModel):
    """Settings of the teacher fine-tune (AdamW, linear warm-up then linear decay to zero)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, ge=1)
    learning_rate: float = Field(5e-5, gt=0.0)
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(128, ge=8)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0


@dataclass
class TeacherResult:
    """A cached teacher. ``seconds`` is the wall-clock of the fine-tune that built it, also when ``cached``."""

    path: Path
    validation_accuracy: float
    validation_size: int
    fingerprint: str
    seconds: float
    cached: bool


def finetune_teacher(
    model_name_or_path: str,
    task: TaskData,
    config: FinetuneConfig,
    progress: Callable[[str], None] | None = None,
) -> TeacherResult:
    """Fine-tune ``model_name_or_path`` (a name ``resolve_model`` accepts) on ``task.train``, or reuse the cache.

    Accuracy is measured on ``task.validation``. While training, ``progress`` (default: print) receives one line
    per epoch and one with the validation accuracy; a cached call trains nothing and reports nothing.
    """
    source = resolve_model(model_name_or_path)
    key = fingerprint({"model": _model_identity(source), "task": task.fingerprint, "config": config.model_dump()})
    cached = (cache_root() / TEACHER_KIND / key).exists()
    path = cached_directory(TEACHER_KIND, key, lambda out: _build_teacher(source, task, config, out, progress or print))
    metrics = json.loads((path / METRICS_FILE).read_text())
    return TeacherResult(
        path=path,
        validation_accuracy=metrics["validation_accuracy"],
        validation_size=metrics["validation_size"],
        fingerprint=key,
        seconds=metrics["seconds"],
        cached=cached,
    )


def evaluate_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int = 128,
    batch_size: int = 64,
) -> float:
    """Fraction of ``examples`` whose argmax logit equals the label.

    Works for any module called with the tokenizer's outputs as keyword arguments that returns either an object
    with ``.logits`` or a logits tensor. Batches are formed from examples of similar length (less padding); the
    module is put in eval mode and its previous mode restored.
    """
    if not examples:
        raise BadInputError("cannot measure accuracy on an empty set of examples")
    order = sorted(examples, key=lambda e: len(e.text) + len(e.text_pair or ""))
    was_training, device = model.training, model_device(model)
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in batches(order, batch_size):
            logits = _logits(model(**encode_batch(tokenizer, batch, max_length, device)))
            labels = torch.tensor([e.label for e in batch], device=logits.device)
            correct += int((logits.argmax(dim=-1) == labels).sum())
    model.train(was_training)
    return correct / len(examples)


def _model_identity(source: str) -> str:
    path = Path(source)
    return directory_digest(path) if path.is_dir() else source


def _build_teacher(
    source: str, task: TaskData, config: FinetuneConfig, out: Path, progress: Callable[[str], None]
) -> None:
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, source)
    model = load_pretrained(
        AutoModelForSequenceClassification.from_pretrained,
        source,
        num_labels=len(task.label_names),
        id2label=dict(enumerate(task.label_names)),
        label2id={name: i for i, name in enumerate(task.label_names)},
        # Eager attention: ONNX Runtime fuses the Attention op only for eagerly exported models.
        attn_implementation="eager",
    )
    losses = train(model, tokenizer, task.train, config, progress)
    accuracy = evaluate_accuracy(model, tokenizer, task.validation, config.max_length)
    seconds = time.perf_counter() - start
    progress(f"teacher: validation accuracy {accuracy:.4f} on {len(task.validation)} examples, {seconds:.0f} s")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json_atomic(
        out / METRICS_FILE,
        {
            "validation_accuracy": accuracy,
            "validation_size": len(task.validation),
            "train_size": len(task.train),
            "seconds": seconds,
            "epoch_losses": losses,
            "label_names": task.label_names,
            "task": task.name,
            "task_fingerprint": task.fingerprint,
            "model": source,
            "config": config.model_dump(),
        },
    )


# (model, encoded batch, labels) -> scalar loss of one batch; the model is in train mode.
BatchLoss = Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
# Called with the number of optimizer steps taken so far, right after each step (masks, pruning, ...).
AfterStep = Callable[[int], None]


def task_loss(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """The model's own loss against the labels (cross-entropy for classification)."""
    return model(**inputs, labels=labels).loss


def train(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    config: FinetuneConfig,
    progress: Callable[[str], None],
    loss: BatchLoss = task_loss,
    after_step: AfterStep | None = None,
) -> list[float]:
    """The one training loop (teacher fine-tune and distillation): shuffled batches, dynamic padding, AdamW without
    decay on biases and norms, linear warm-up then linear decay. ``after_step`` runs after every optimizer step.
    Returns the mean loss per epoch.
    """
    if not examples:
        raise BadInputError("cannot train on an empty set of examples")
    optimizer = torch.optim.AdamW(_parameter_groups(model, config.weight_decay), lr=config.learning_rate)
    steps = config.epochs * math.ceil(len(examples) / config.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config.warmup_fraction * steps), steps)
    generator = torch.Generator().manual_seed(config.seed)
    device = model_device(model)
    model.train()
    losses, step = [], 0
    for epoch in range(1, config.epochs + 1):
        start, total = time.perf_counter(), 0.0
        shuffled = [examples[i] for i in torch.randperm(len(examples), generator=generator).tolist()]
        for batch in batches(shuffled, config.batch_size):
            labels = torch.tensor([e.label for e in batch], device=device)
            batch_loss = loss(model, encode_batch(tokenizer, batch, config.max_length, device), labels)
            batch_loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if after_step is not None:
                after_step(step)
            total += batch_loss.item() * len(batch)
        losses.append(total / len(examples))
        progress(f"epoch {epoch}/{config.epochs}: loss {losses[-1]:.4f}, {time.perf_counter() - start:.0f} s")
    return losses


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases and LayerNorm weights (1-D) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def batches(examples: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    """Consecutive slices of ``size`` examples (the last one may be shorter), in the given order."""
    for i in range(0, len(examples), size):
        yield examples[i : i + size]


def encode_batch(
    tokenizer: PreTrainedTokenizerBase, batch: Sequence[Example], max_length: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Tokenize one batch, padded to its longest member (pairs are passed as the tokenizer's second segment)."""
    pairs = [e.text_pair for e in batch] if batch[0].text_pair is not None else None
    encoded = tokenizer(
        [e.text for e in batch], pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    return {name: tensor.to(device) for name, tensor in encoded.items()}


def _logits(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
