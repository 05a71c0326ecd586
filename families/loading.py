"""Saving and loading models whose layers may have been shrunk (the per-layer shape lives in config.json).

Later stages may record a transformation of their own in config.json (INT8 fake-quant: `ziplm_quantization`); they
load such a model through `load_model` with a `restore` for their key (ziplm.stages.quantize.load_model).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig,
                          DistilBertConfig, GPT2Config, ModernBertConfig, PretrainedConfig, PreTrainedModel,
                          RobertaConfig)

from ziplm.assets import gguf_architecture, is_gguf, load_pretrained, resolve_model
from ziplm.errors import BadInputError
from ziplm.families.base import STRUCTURE_KEY, FamilyAdapter, ModelStructure, recorded_structure
from ziplm.families.registry import adapter_for, adapter_for_type

RECORD_PREFIX = "ziplm_"  # config.json keys the pipeline writes
# Re-applies one recorded transformation to a rebuilt model whose float weights are loaded: (model, adapter, record).
Restore = Callable[[PreTrainedModel, FamilyAdapter, Any], None]

HEADS = {"sequence-classification": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM,
         "base": AutoModel}


def model_class(head: str) -> type:
    if head not in HEADS:
        raise BadInputError(f"unknown model head {head!r}; choose one of {', '.join(HEADS)}")
    return HEADS[head]


# Shapes by name, for latency work where weights do not matter (ASSETS.md: a random bert-base serves). roberta-base
# has 514 position rows (512 tokens after the padding offset) and one token type.
RANDOM_SHAPES: dict[str, Callable[[], PretrainedConfig]] = {
    "bert-base": BertConfig,
    "roberta-base": partial(RobertaConfig, max_position_embeddings=514, type_vocab_size=1),
    "distilbert-base": DistilBertConfig,
    "modernbert-base": ModernBertConfig,
    "gpt2-small": GPT2Config,
}


def load_config(name_or_path: str) -> PretrainedConfig:
    """The config of a named random shape, an embedded model, a local directory, a GGUF file (whose architecture must
    have an adapter before it is de-quantised) or a hub id."""
    if name_or_path in RANDOM_SHAPES:
        return RANDOM_SHAPES[name_or_path]()
    if is_gguf(name_or_path):
        architecture = gguf_architecture(Path(name_or_path).expanduser())
        adapter_for_type(architecture, [f"GGUF {architecture}"])
    return load_pretrained(AutoConfig.from_pretrained, resolve_model(name_or_path))


def load_model(name_or_path: str, head: str | None = None,
               restore: Mapping[str, Restore] | None = None) -> PreTrainedModel:
    """Load a Hugging Face model directory or hub id with `head` (default: its family's), rebuilding a ZipLM-shrunk
    skeleton first when recorded, and re-applying each recorded transformation that `restore` knows (by its config
    key)."""
    source = resolve_model(name_or_path)
    config = load_config(source)
    head = head or adapter_for(config).default_head  # also fails early, and clearly, on an unsupported family
    restore = dict(restore or {})
    records = {key: value for key, value in config.to_dict().items()
               if key.startswith(RECORD_PREFIX) and key != STRUCTURE_KEY}
    unknown = sorted(set(records) - set(restore))
    if unknown:
        raise BadInputError(f"{source} records {unknown[0]} in its config.json, which this loader cannot rebuild: load "
                            "it with ziplm.stages.quantize.load_model")
    if recorded_structure(config) is None and not records:
        loader = model_class(head).from_pretrained
        return load_pretrained(loader, source, attn_implementation="eager").eval()
    return _load_rebuilt(Path(source), config, head, {key: (restore[key], records[key]) for key in records})


def build_model(config: PretrainedConfig, head: str | None = None,
                structure: ModelStructure | None = None) -> PreTrainedModel:
    """A randomly initialised model of `config` with `head` (default: its family's), shrunk to `structure` (latency
    work: weights do not matter).

    The model gets its own copy of `config` (from_config keeps the object it is given), so recording the structure
    in it leaves the caller's config, often a real model's, untouched."""
    model = model_class(head or adapter_for(config).default_head).from_config(copy.deepcopy(config),
                                                                           attn_implementation="eager")
    if structure is not None:
        adapter_for(config).apply_structure(model, structure)
    return model.eval()


def save_model(model: PreTrainedModel, out_dir: Path) -> None:
    """Save weights and config.json, with what the family records for other tools (a decoder: head_dim, KV heads)."""
    for key, value in adapter_for(model.config).config_record(model.config).items():
        setattr(model.config, key, value)
    model.save_pretrained(out_dir, safe_serialization=True)


def _load_rebuilt(model_dir: Path, config: PretrainedConfig, head: str,
                  records: Mapping[str, tuple[Restore, Any]]) -> PreTrainedModel:
    """Rebuild the recorded skeleton and load the float weights; then re-apply each recorded transformation and load
    the whole state (their own buffers, such as INT8 scales)."""
    structure = recorded_structure(config)
    for key in (STRUCTURE_KEY, *records, "auto_map"):  # auto_map: the folder's own loader resolves to this function
        if hasattr(config, key):
            delattr(config, key)
    model = build_model(config, head, structure)
    state = _read_weights(model_dir)
    float_keys = set(model.state_dict())
    _load_state(model, {k: v for k, v in state.items() if k in float_keys}, model_dir)
    for restore, record in records.values():
        restore(model, adapter_for(config), record)
    if records:
        _load_state(model, state, model_dir)
    return model.eval()


def _read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise BadInputError(f"{model_dir} records a pruned or quantized model but holds no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in weights:
        state.update(load_file(str(file)))
    return state


def _load_state(model: PreTrainedModel, state: dict[str, torch.Tensor], model_dir: Path) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if name not in _tied_to(model, state)]
    if missing or unexpected:
        raise BadInputError(
            f"weights in {model_dir} do not fit its recorded structure: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def _tied_to(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> set[str]:
    """Names of the model's parameters that are one tensor with a parameter in `state` (a language model's output
    embedding tied to its input embedding: saved once, under one name)."""
    names_by_tensor: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_by_tensor.setdefault(id(parameter), []).append(name)
    return {name for names in names_by_tensor.values() if set(names) & set(state) for name in names}
