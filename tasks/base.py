"""The task contract: what a model is trained, distilled, calibrated and scored on, so that stages never know which
task they serve.

A Task holds its three splits (train, validation, calibration), encodes a batch of examples for a model (with the
task's `max_length`), names the model head it needs, computes its loss from a model's outputs, and scores a model
as a `Metric` that knows which direction is better. `load_task` builds the task a recipe's `task:` section names.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Example:
    """One example: a text (and an optional second segment) and its label id, or a score where the task's labels are
    scores (a sentence pair's similarity); None where the task has none. A language-modelling block is its token
    ids instead (its text left empty)."""

    text: str
    text_pair: str | None
    label: int | float | None
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Metric:
    """A model's score on a task's validation split."""

    name: str
    value: float
    higher_is_better: bool
    size: int  # examples scored
    extra: dict[str, float] = field(default_factory=dict)  # secondary scores, by name (an embedding's probe accuracy)

    def summary(self) -> str:
        """e.g. "cosine_to_dense 0.9712 (probe_accuracy 0.7820)"."""
        extra = ", ".join(f"{name} {value:.4f}" for name, value in self.extra.items())
        return f"{self.name} {self.value:.4f}" + (f" ({extra})" if extra else "")

    def loss_from(self, reference: float) -> float:
        """How much worse than `reference` this value is (positive = worse), whichever direction is better."""
        return reference - self.value if self.higher_is_better else self.value - reference

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "higher_is_better": self.higher_is_better,
                "validation_size": self.size, "extra": dict(self.extra)}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> Metric:
        return cls(payload["name"], payload["value"], payload["higher_is_better"], payload["validation_size"],
                   payload.get("extra", {}))


class Task(ABC):
    """A loaded task: its splits, how it encodes, trains and scores (see the module docstring)."""

    metric_name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    head: ClassVar[str]  # the model head it trains and scores (a key of families.loading.HEADS)

    def __init__(self, name: str, train: list[Example], validation: list[Example], calibration: list[Example],
                 fingerprint: str, max_length: int, batch_size: int) -> None:
        self.name = name
        self.train, self.validation, self.calibration = train, validation, calibration
        self.fingerprint = fingerprint
        self.max_length = max_length
        self.batch_size = batch_size

    @abstractmethod
    def new_model(self, source: str) -> tuple[PreTrainedModel, bool]:
        """The pretrained model at `source` with this task's head, to fine-tune, and whether that head is new (the
        checkpoint had none of this task's shape)."""

    @abstractmethod
    def adopt(self, source: str) -> tuple[Task, PreTrainedModel]:
        """The trained model at `source`, used as it is (`teacher: none`), and this task as that model reads it (a
        classifier's label order, an encoder's pooling); BadInputError where the model cannot serve the task as it
        is."""

    def served(self, model: nn.Module) -> nn.Module:
        """The module that is exported and deployed for this task: the model itself, or the model with the task's
        output computation on top (an embedding's pooling)."""
        return model

    @abstractmethod
    def targets(self, batch: Sequence[Example], device: torch.device) -> torch.Tensor:
        """What the loss compares a batch's outputs with (label ids for classification)."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The task loss of one batch's outputs (see `outputs`)."""

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The metric's sum over one batch (e.g. the number of correct predictions). A task whose metric is not a sum
        over batches overrides `evaluate` instead."""
        raise NotImplementedError(f"{type(self).__name__} scores in evaluate, not per batch")

    def outputs(self, model_output: object, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tensor a model's output (on the encoded `inputs`) is scored and distilled on: its logits (or the
        tensor a session returns)."""
        return model_output if isinstance(model_output, torch.Tensor) else model_output.logits

    def output_distance(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """How far a student's outputs are from the teacher's, for distillation: KL(teacher || student) of the output
        distributions at `temperature`, times its square (Hinton et al.), for tasks whose outputs are logits."""
        return F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                        reduction="batchmean", log_target=True) * temperature**2

    def encode(self, tokenizer: PreTrainedTokenizerBase, batch: Sequence[Example],
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Tokenize one batch, padded to its longest member (pairs as the tokenizer's second segment)."""
        pairs = [e.text_pair for e in batch] if batch[0].text_pair is not None else None
        encoded = tokenizer([e.text for e in batch], pairs, truncation=True, max_length=self.max_length, padding=True,
                            return_tensors="pt")
        return {name: tensor.to(device) for name, tensor in encoded.items()}

    def batch_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """The task loss of `model` on one encoded batch."""
        return self.loss(self.outputs(model(**inputs), inputs), targets)

    def evaluate(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 examples: Sequence[Example] | None = None) -> Metric:
        """The metric on `examples` (default: the validation split). Works for any module called with the
        tokenizer's outputs as keyword tensors (a PyTorch model, or an ONNX session as runtimes.SessionModule);
        batches are formed from examples of similar length, and the module's train/eval mode is restored."""
        examples = self.validation if examples is None else examples
        if not examples:
            raise ValueError("cannot score a model on an empty set of examples")
        order = sorted(examples, key=lambda e: len(e.text) + len(e.text_pair or ""))
        was_training, device = model.training, model_device(model)
        model.eval()
        total = 0.0
        with torch.no_grad():
            for batch in batches(order, self.batch_size):
                inputs = self.encode(tokenizer, batch, device)
                outputs = self.outputs(model(**inputs), inputs)
                total += self.score(outputs, self.targets(batch, outputs.device))
        model.train(was_training)
        return Metric(self.metric_name, total / len(examples), self.higher_is_better, len(examples))


def batches(examples: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    """Consecutive slices of `size` examples (the last one may be shorter), in the given order."""
    for i in range(0, len(examples), size):
        yield examples[i: i + size]


def batch_count(examples: Sequence[Example], size: int) -> int:
    return math.ceil(len(examples) / size)


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
