"""Causal language modelling: texts cut into blocks of tokens; next-token cross-entropy; perplexity.

Recipe snippet::

    task:
      type: causal_lm
      data: shakespeare       # or a .txt file, a folder of .txt files, or a .csv / .tsv / .jsonl file (text_column)
      text_column: text       # CSV/JSONL only
      max_length: 256         # tokens per block; in a recipe, the environment's sequence_length (the default there)
      validation_fraction: 0.125
      calibration_fraction: 0.125
      max_examples: null      # keep only the first N blocks of the seeded order
      batch_size: 4           # blocks per batch wherever the task encodes
      seed: 0

Blocks need the model's tokenizer, so they are cut when the task is given its model (`Task.adopt`): each document
(a file, or a row) is tokenised, the documents are joined with the tokenizer's end-of-text token between them, and
the token stream is cut into consecutive blocks of `max_length` tokens (an incomplete last block is dropped). The
blocks are shuffled with the seed and split as ziplm.tasks.data splits examples (validation, then calibration, then
train). Perplexity is exp of the mean negative log-likelihood of every next token of the validation blocks (lower is
better). The given pretrained model is the dense reference: this task does not fine-tune it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ziplm.assets import TEXT_CORPORA, load_pretrained, resolve_model, resolve_text_source
from ziplm.cache import directory_digest, file_digest, fingerprint
from ziplm.errors import BadInputError
from ziplm.tasks.base import Example, Metric, Task, batches, model_device
from ziplm.tasks.data import CSV_DELIMITERS, JSONL_SUFFIXES, DataSpec, read_records, split, usable_rows

ATTENTION = "eager"  # ONNX Runtime fuses Attention only for eagerly exported models
TEXT_SUFFIXES = {".txt", ".text", ".md"}
CAUSAL_LM_CLASSES = ("ForCausalLM", "LMHeadModel")  # how transformers names a decoder with its language-model head


class CausalLMSpec(DataSpec):
    """A causal language-modelling task (see the module docstring)."""

    fine_tunes: ClassVar[bool] = False
    blocks_of_sequence_length: ClassVar[bool] = True
    type: Literal["causal_lm"]
    max_length: int = Field(256, ge=8, description="tokens per block")
    batch_size: int = Field(4, ge=1, description="blocks per batch wherever the task encodes")


class CausalLMTask(Task):
    """Next-token prediction on blocks of tokens, scored by perplexity. Until `adopt` gives it a model, it holds the
    documents and no blocks."""

    metric_name = "perplexity"
    higher_is_better = False
    head = "causal-lm"

    def __init__(self, spec: CausalLMSpec, documents: list[str], source: Path, **splits: object) -> None:
        super().__init__(**splits)
        self.spec, self.documents, self.source = spec, documents, source

    def new_model(self, source: str) -> tuple[PreTrainedModel, bool]:
        raise BadInputError("a causal-LM task uses the given pretrained model as it is: it has no fine-tune")

    def adopt(self, source: str) -> tuple[CausalLMTask, PreTrainedModel]:
        """The language model at `source`, and this task with its texts cut into blocks by that model's tokenizer."""
        folder = resolve_model(source)
        architectures = load_pretrained(AutoConfig.from_pretrained, folder).architectures or []
        if not any(name.endswith(CAUSAL_LM_CLASSES) for name in architectures):
            raise BadInputError(f"{source} is not a causal language model (its architectures: "
                                f"{', '.join(architectures) or 'none named'}): a causal_lm task needs a decoder with "
                                "its language-model head, such as GPT-2 or a Llama-style model")
        model = load_pretrained(AutoModelForCausalLM.from_pretrained, folder, attn_implementation=ATTENTION)
        return self.cut(load_pretrained(AutoTokenizer.from_pretrained, folder)), model.eval()

    def cut(self, tokenizer: PreTrainedTokenizerBase) -> CausalLMTask:
        """This task with its texts cut into blocks by `tokenizer` and split (see the module docstring)."""
        blocks = token_blocks(tokenizer, self.documents, self.spec.max_length, self.source)
        order = [Example("", None, None, block) for block in blocks]
        random.Random(self.spec.seed).shuffle(order)
        validation, calibration, train = split(order[: self.spec.max_examples], self.spec, self.source)
        key = fingerprint({"task": self.fingerprint, "tokenizer": tokenizer_identity(tokenizer)})
        return CausalLMTask(self.spec, self.documents, self.source, name=self.name, train=train,
                            validation=validation, calibration=calibration, fingerprint=key,
                            max_length=self.max_length, batch_size=self.batch_size)

    def encode(self, tokenizer: PreTrainedTokenizerBase, batch: Sequence[Example],
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The blocks' token ids as they are (every block has the same length: nothing to pad)."""
        input_ids = torch.tensor([example.token_ids for example in batch], dtype=torch.long, device=device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def targets(self, batch: Sequence[Example], device: torch.device) -> torch.Tensor:
        """The block's own tokens: position t is scored on predicting token t + 1."""
        return torch.tensor([example.token_ids for example in batch], dtype=torch.long, device=device)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy."""
        return next_token_nll(outputs, targets) / targets[:, 1:].numel()

    def output_distance(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """The logit distance per token: KL of every position's next-token distributions, averaged over tokens."""
        return super().output_distance(student.flatten(0, -2), teacher.flatten(0, -2), temperature)

    def evaluate(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 examples: Sequence[Example] | None = None) -> Metric:
        """Perplexity over every next token of `examples` (default: the validation blocks)."""
        examples = self.validation if examples is None else examples
        if not examples:
            raise ValueError("cannot score a model on an empty set of blocks")
        was_training, device = model.training, model_device(model)
        model.eval()
        nll, tokens = 0.0, 0
        with torch.no_grad():
            for batch in batches(examples, self.batch_size):
                inputs = self.encode(tokenizer, batch, device)
                targets = self.targets(batch, device)
                nll += float(next_token_nll(self.outputs(model(**inputs), inputs), targets))
                tokens += targets[:, 1:].numel()
        model.train(was_training)
        return Metric(self.metric_name, math.exp(nll / tokens), self.higher_is_better, len(examples))


def next_token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The summed negative log-likelihood of tokens[:, 1:] under logits[:, :-1] (in float32)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")


def token_blocks(tokenizer: PreTrainedTokenizerBase, documents: list[str], length: int,
                 source: Path) -> list[tuple[int, ...]]:
    """The documents' tokens, joined by the end-of-text token, cut into consecutive blocks of `length`."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for document in documents:
        stream += tokenizer(document, add_special_tokens=False)["input_ids"] + separator
    blocks = [tuple(stream[i: i + length]) for i in range(0, len(stream) - length + 1, length)]
    if not blocks:
        raise BadInputError(f"{source} holds {len(stream)} tokens: too few for one block of max_length={length}")
    return blocks


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> dict[str, object]:
    """What the blocks depend on of a tokenizer: its class, vocabulary size and end-of-text token."""
    return {"class": type(tokenizer).__name__, "vocab": len(tokenizer), "eos": tokenizer.eos_token_id}


def read_documents(path: Path, text_column: str) -> list[str]:
    """The texts at `path`: a text file (one document), a folder of text files (one each, by name), or the
    `text_column` of a CSV/JSONL file (one per row)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise BadInputError(f"{path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
        return [read_text(file) for file in files]
    suffix = path.suffix.lower()
    if suffix in CSV_DELIMITERS or suffix in JSONL_SUFFIXES:
        rows, _ = usable_rows(read_records(path), path, text_column, None)
        return [text for text, _, _ in rows]
    return [read_text(path)]


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise BadInputError(f"{path} is not UTF-8 text ({error}): pass text files, or a CSV/JSONL file") from error


def load_causal_lm(spec: CausalLMSpec) -> CausalLMTask:
    """Read the documents `spec` names; blocks are cut once the task is given its model (`adopt`)."""
    path = resolve_text_source(spec.data)
    documents = read_documents(path, spec.text_column)
    digest = directory_digest(path) if path.is_dir() else file_digest(path)
    return CausalLMTask(spec, documents, path, name=spec.data if spec.data in TEXT_CORPORA else path.stem, train=[],
                        validation=[], calibration=[], fingerprint=fingerprint({"data": digest,
                                                                                "spec": spec.model_dump()}),
                        max_length=spec.max_length, batch_size=spec.batch_size)
