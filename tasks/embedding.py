"""Sentence embeddings: a trained encoder used as it is, with its own pooling; a member is scored by how close its
embeddings stay to the dense model's, and by a linear probe where the data has labels.

Recipe snippet::

    task:
      type: embedding
      data: mr                  # or rotten_tomatoes, or a path to a .csv / .tsv / .jsonl file
      text_column: text
      text_pair_column: null    # sentence pairs: the label column then holds their similarity score
      label_column: label       # null: no labels, no probe
      pooling: null             # mean | cls | max; null: the model folder's own (sentence-transformers 1_Pooling)
      validation_fraction: 0.125
      calibration_fraction: 0.125
      max_examples: null
      max_length: 128
      batch_size: 32
      seed: 0

The examples are read and split by the rules of ziplm.tasks.data. The dense model is the given checkpoint (the task
never fine-tunes it) with its pooling: a sentence-transformers folder names it in ``modules.json`` and
``1_Pooling/config.json`` (mean, CLS or max; a ``Normalize`` module normalises); a plain model folder needs
``pooling`` set here, and is then normalised. The metric, ``cosine_to_dense``, is the mean cosine similarity
between a model's and the dense model's embeddings of the validation texts (and pairs; 1 for the dense model). Beside
it, where the data has labels, ``probe_accuracy`` is the accuracy of a logistic regression on the frozen validation
embeddings, cross-validated over PROBE_FOLDS stratified folds: how well the embeddings still separate the classes,
which is what a retrieval user cares about. Where the data has sentence pairs (``text_pair_column``) with numeric
labels, ``spearman`` is the rank correlation of each pair's cosine similarity with its score (STS-style), and, where
those labels are two classes, ``pair_accuracy`` is the accuracy of the best cosine threshold between them. Every text
is embedded on its own (a pair's texts separately). The deployed file outputs the pooled embedding
(``sentence_embedding``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from scipy.stats import spearmanr
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from ziplm.assets import TASK_FILES, load_pretrained, resolve_model, resolve_task_file
from ziplm.cache import file_digest, fingerprint
from ziplm.errors import BadInputError
from ziplm.tasks.base import Example, Metric, Task, batches, model_device
from ziplm.tasks.data import DataSpec, read_records, split, stratified_order, usable_rows

PoolingMode = Literal["mean", "cls", "max"]
ST_POOLING_MODES: dict[str, PoolingMode] = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                                            "pooling_mode_max_tokens": "max"}  # sentence-transformers' keys
ATTENTION = "eager"  # ONNX Runtime fuses Attention only for eagerly exported models
PROBE_FOLDS = 5
PROBE_SEED = 0


class EmbeddingSpec(DataSpec):
    """A sentence-embedding task (see the module docstring)."""

    fine_tunes: ClassVar[bool] = False
    type: Literal["embedding"]
    text_pair_column: str | None = None
    label_column: str | None = "label"
    pooling: PoolingMode | None = None


@dataclass(frozen=True)
class Pooling:
    """How token states become one sentence embedding: `mode` over the real (unpadded) tokens, then optionally
    L2-normalised."""

    mode: PoolingMode
    normalize: bool

    def __call__(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.mode == "cls":
            pooled = hidden[:, 0]
        elif self.mode == "max":
            pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    @classmethod
    def of_model(cls, folder: Path, mode: PoolingMode | None) -> Pooling:
        """The pooling a sentence-transformers folder declares, or `mode` (normalised) where it declares none; a
        folder that declares one and a different `mode` is an error, not a silent override."""
        declared = _declared_pooling(folder)
        if declared is None:
            if mode is None:
                raise BadInputError(
                    f"{folder} declares no sentence pooling (no modules.json with a Pooling module): set the task's "
                    "pooling to mean, cls or max")
            return cls(mode, normalize=True)
        if mode not in (None, declared.mode):
            raise BadInputError(f"{folder} pools by {declared.mode} (its 1_Pooling/config.json), but the task asks "
                                f"for {mode}: remove the task's pooling to use the model's own")
        return declared


def _declared_pooling(folder: Path) -> Pooling | None:
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    pooling = next((m for m in modules if m["type"].endswith(".Pooling")), None)
    if pooling is None:
        return None
    config = json.loads((folder / pooling["path"] / "config.json").read_text())
    modes = [mode for key, mode in ST_POOLING_MODES.items() if config.get(key)]
    if len(modes) != 1:
        raise BadInputError(f"{folder / pooling['path']}/config.json asks for pooling "
                            f"{[key for key, value in config.items() if key.startswith('pooling_mode') and value]}: "
                            "one of mean, CLS or max tokens is supported")
    return Pooling(modes[0], normalize=any(m["type"].endswith(".Normalize") for m in modules))


@dataclass
class SentenceEmbeddingOutput(ModelOutput):
    sentence_embedding: torch.Tensor | None = None


class SentenceEmbedder(nn.Module):
    """An encoder with its pooling on top: the module a sentence-embedding member is exported and deployed as."""

    def __init__(self, encoder: nn.Module, pooling: Pooling) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling

    @property
    def config(self) -> Any:
        return self.encoder.config

    def forward(self, **inputs: torch.Tensor) -> SentenceEmbeddingOutput:
        hidden = self.encoder(**inputs).last_hidden_state
        return SentenceEmbeddingOutput(sentence_embedding=self.pooling(hidden, inputs["attention_mask"]))


class EmbeddingTask(Task):
    """Sentence embeddings, scored by cosine similarity to the dense model's (and a probe, given labels)."""

    metric_name = "cosine_to_dense"
    higher_is_better = True
    head = "base"

    def __init__(self, spec: EmbeddingSpec, pooling: Pooling | None = None, reference: torch.Tensor | None = None,
                 **splits: Any) -> None:
        super().__init__(**splits)
        self.spec = spec
        self.pooling = pooling
        self.reference = reference  # the dense model's embeddings of the validation texts, in their order

    def new_model(self, source: str) -> tuple[PreTrainedModel, bool]:
        raise BadInputError("the embedding task uses the given encoder as it is (teacher: none): training a sentence "
                            "encoder needs pairs and a contrastive loss, which this task does not have")

    def adopt(self, source: str) -> tuple[EmbeddingTask, PreTrainedModel]:
        """The encoder at `source` with its pooling; the task keeps the dense embeddings of its validation texts."""
        folder = Path(resolve_model(source))
        model = load_pretrained(AutoModel.from_pretrained, str(folder), attn_implementation=ATTENTION).eval()
        adopted = self.with_pooling(Pooling.of_model(folder, self.spec.pooling))
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, str(folder))
        adopted.reference = torch.cat(adopted.embed_validation(model, tokenizer))
        return adopted, model

    def with_pooling(self, pooling: Pooling) -> EmbeddingTask:
        key = fingerprint({"task": self.fingerprint, "pooling": dataclasses.asdict(pooling)})
        return EmbeddingTask(self.spec, pooling, None, name=self.name, train=self.train, validation=self.validation,
                             calibration=self.calibration, fingerprint=key, max_length=self.max_length,
                             batch_size=self.batch_size)

    def served(self, model: nn.Module) -> nn.Module:
        return SentenceEmbedder(model, self._pooling())

    def outputs(self, model_output: object, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The sentence embedding: a deployed file's output as it is, an encoder's last hidden state pooled."""
        if isinstance(model_output, torch.Tensor):
            return model_output
        if isinstance(model_output, SentenceEmbeddingOutput):
            return model_output.sentence_embedding
        return self._pooling()(model_output.last_hidden_state, inputs["attention_mask"])

    def output_distance(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """One minus the mean cosine similarity of the student's and the teacher's embeddings (no temperature)."""
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1).mean()

    def targets(self, batch: Sequence[Example], device: torch.device) -> torch.Tensor:
        return torch.tensor([-1 if e.label is None else e.label for e in batch], device=device)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise BadInputError("the embedding task has no loss of its own: distil it (chain: [{distill: {}}] with "
                            "task_weight 0); oBERT's gradients need a task loss and do not apply to it")

    def encode(self, tokenizer: PreTrainedTokenizerBase, batch: Sequence[Example],
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Each example's text on its own (a pair's second text is embedded separately, `embed_validation`)."""
        return super().encode(tokenizer, [Example(e.text, None, e.label) for e in batch], device)

    def embed_validation(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[torch.Tensor]:
        """The embeddings of the validation texts, and of their pair texts where there are pairs."""
        texts = [self.embed(model, tokenizer, self.validation)]
        if self.spec.text_pair_column is None:
            return texts
        return texts + [self.embed(model, tokenizer, [Example(e.text_pair, None, None) for e in self.validation])]

    def embed(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
              examples: Sequence[Example]) -> torch.Tensor:
        """The embeddings of `examples`, in their order ([n, dim], float32 on the CPU)."""
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].text))
        was_training, device = model.training, model_device(model)
        model.eval()
        parts = []
        with torch.no_grad():
            for chunk in batches(order, self.batch_size):
                inputs = self.encode(tokenizer, [examples[i] for i in chunk], device)
                parts.append(self.outputs(model(**inputs), inputs).float().cpu())
        model.train(was_training)
        embeddings = torch.empty(len(examples), parts[0].shape[-1])
        embeddings[order] = torch.cat(parts)
        return embeddings

    def evaluate(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 examples: Sequence[Example] | None = None) -> Metric:
        """Mean cosine to the dense model's embeddings of the validation texts (and pairs), and beside it the probe
        accuracy (labelled texts) or the pairs' Spearman correlation and pair accuracy (scored pairs)."""
        if examples is not None and list(examples) != list(self.validation):
            raise ValueError("the embedding task scores its validation split, whose dense embeddings it holds")
        if self.reference is None:
            raise ValueError("the task has no dense embeddings yet: adopt the dense model first")
        embeddings = self.embed_validation(model, tokenizer)
        cosine = float(F.cosine_similarity(torch.cat(embeddings), self.reference, dim=-1).mean())
        labels = [e.label for e in self.validation]
        if None in labels:
            extra = {}
        elif len(embeddings) == 2:
            extra = pair_scores(F.cosine_similarity(*embeddings, dim=-1).numpy(), np.array(labels, dtype=float))
        else:
            probe = probe_accuracy(embeddings[0].numpy(), np.array(labels))
            extra = {} if probe is None else {"probe_accuracy": probe}
        return Metric(self.metric_name, cosine, self.higher_is_better, len(self.validation), extra)

    def _pooling(self) -> Pooling:
        if self.pooling is None:
            raise ValueError("the task has no pooling yet: adopt the dense model first")
        return self.pooling


def probe_accuracy(embeddings: np.ndarray, labels: np.ndarray) -> float | None:
    """Cross-validated accuracy of a logistic regression on frozen embeddings (PROBE_FOLDS stratified folds); None
    where the labels cannot be split so (one class, or a class of a single example)."""
    counts = np.bincount(labels)
    if np.count_nonzero(counts) < 2 or counts[counts > 0].min() < 2:
        return None
    folds = StratifiedKFold(n_splits=min(PROBE_FOLDS, int(counts[counts > 0].min())), shuffle=True,
                            random_state=PROBE_SEED)
    return float(cross_val_score(LogisticRegression(max_iter=1000), embeddings, labels, cv=folds).mean())


def pair_scores(cosines: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Spearman's rank correlation of the pairs' cosines with their scores; where the scores are two classes, also
    the accuracy of the best threshold on the cosine between them (the higher class above it)."""
    result = {"spearman": float(spearmanr(cosines, scores).statistic)}
    classes = np.unique(scores)
    if len(classes) == 2:
        positive = scores == classes[1]
        result["pair_accuracy"] = max(float(np.mean((cosines >= threshold) == positive)) for threshold in cosines)
    return result


def load_embedding(spec: EmbeddingSpec) -> EmbeddingTask:
    """Read and split the texts (and pairs, and labels, where those columns are set) described by ``spec``."""
    path = resolve_task_file(spec.data)
    rows, _ = usable_rows(read_records(path), path, spec.text_column, spec.label_column, spec.text_pair_column)
    examples = [Example(text, pair, label) for text, pair, label in _labelled(rows, spec, path)]
    validation, calibration, train = split(stratified_order(examples, spec.seed)[: spec.max_examples], spec, path)
    return EmbeddingTask(spec, name=spec.data if spec.data in TASK_FILES else path.stem, train=train,
                         validation=validation, calibration=calibration,
                         fingerprint=fingerprint({"file": file_digest(path), "spec": spec.model_dump()}),
                         max_length=spec.max_length, batch_size=spec.batch_size)


def _labelled(rows: list[tuple[str, str | None, str | None]], spec: EmbeddingSpec,
              path: Path) -> list[tuple[str, str | None, int | float | None]]:
    """Rows with their labels as class ids (texts) or as numbers (pairs, whose labels are similarity scores)."""
    if spec.label_column is None:
        return [(text, pair, None) for text, pair, _ in rows]
    if spec.text_pair_column is None:
        ids = {name: i for i, name in enumerate(sorted({label for _, _, label in rows}))}
        return [(text, pair, ids[label]) for text, pair, label in rows]
    try:
        return [(text, pair, float(label)) for text, pair, label in rows]
    except ValueError as error:
        raise BadInputError(f"{path}: the pairs' labels in column '{spec.label_column}' must be numbers (a similarity "
                            f"score, or 0/1 for pair classes): {error}") from error
