"""Saving and loading models whose layers may have been shrunk (the per-layer shape lives in config.json)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (AutoConfig, AutoModel, AutoModelForSequenceClassification, BertConfig, PretrainedConfig,
                          PreTrainedModel)

from ziplm.families.base import STRUCTURE_KEY, ModelStructure, recorded_structure
from ziplm.families.registry import adapter_for
from ziplm.assets import load_pretrained, resolve_model
from ziplm.errors import BadInputError
from ziplm.stages.quantize import QUANTIZATION_KEY, recorded_quantization, restore_quantization

_HEADS = {"sequence-classification": AutoModelForSequenceClassification, "base": AutoModel}


def model_class(head: str) -> type:
    if head not in _HEADS:
        raise BadInputError(f"unknown model head {head!r}; choose one of {', '.join(_HEADS)}")
    return _HEADS[head]


# Shapes by name, for latency work where weights do not matter (ASSETS.md: a random bert-base serves).
RANDOM_SHAPES = {"bert-base": BertConfig}


def load_config(name_or_path: str) -> PretrainedConfig:
    """The config of a named random shape, the embedded model, a local directory or a hub id."""
    if name_or_path in RANDOM_SHAPES:
        return RANDOM_SHAPES[name_or_path]()
    return load_pretrained(AutoConfig.from_pretrained, resolve_model(name_or_path))


def load_model(name_or_path: str, head: str = "sequence-classification", **kwargs: object) -> PreTrainedModel:
    """Load a Hugging Face model directory or hub id, rebuilding a ZipLM-shrunk or INT8 skeleton first when recorded."""
    source = resolve_model(name_or_path)
    config = load_config(source)
    adapter_for(config)  # fail early, and clearly, on an unsupported family
    if recorded_structure(config) is None and recorded_quantization(config) is None:
        loader = model_class(head).from_pretrained
        return load_pretrained(loader, source, attn_implementation="eager", **kwargs).eval()
    return _load_rebuilt(Path(source), config, head)


def build_model(config: PretrainedConfig, head: str = "sequence-classification",
                structure: ModelStructure | None = None) -> PreTrainedModel:
    """A randomly initialised model of `config`, shrunk to `structure` (latency work: weights do not matter).

    The model gets its own copy of `config` (from_config keeps the object it is given), so recording the structure
    in it leaves the caller's config, often a real model's, untouched."""
    model = model_class(head).from_config(copy.deepcopy(config), attn_implementation="eager")
    if structure is not None:
        adapter_for(config).apply_structure(model, structure)
    return model.eval()


def save_model(model: PreTrainedModel, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)


def _load_rebuilt(model_dir: Path, config: PretrainedConfig, head: str) -> PreTrainedModel:
    """Rebuild the recorded skeleton, load the float weights, re-apply INT8 fake-quant, then load its scales.

    Quantization is applied after the float weights are in, because it keeps the zeros it finds (sparsity masks).
    """
    structure, quantization = recorded_structure(config), recorded_quantization(config)
    for key in (STRUCTURE_KEY, QUANTIZATION_KEY):
        if hasattr(config, key):
            delattr(config, key)
    model = build_model(config, head, structure)
    state = _read_weights(model_dir)
    float_keys = set(model.state_dict())
    _load_state(model, {k: v for k, v in state.items() if quantization is None or k in float_keys}, model_dir)
    if quantization is not None:
        restore_quantization(model, adapter_for(config), quantization)
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
    if missing or unexpected:
        raise BadInputError(
            f"weights in {model_dir} do not fit its recorded structure: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
