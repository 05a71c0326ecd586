"""Saving and loading models whose layers may have been shrunk (the per-layer shape lives in config.json)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from transformers import (AutoConfig, AutoModel, AutoModelForSequenceClassification, BertConfig, PretrainedConfig,
                          PreTrainedModel)

from ziplm.families.base import STRUCTURE_KEY, ModelStructure, recorded_structure
from ziplm.families.registry import adapter_for
from ziplm.pipeline.assets import load_pretrained, resolve_model
from ziplm.pipeline.errors import BadInputError

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
    """Load a Hugging Face model directory or hub id, rebuilding a ZipLM-shrunk skeleton first when recorded."""
    source = resolve_model(name_or_path)
    config = load_config(source)
    adapter_for(config)  # fail early, and clearly, on an unsupported family
    if recorded_structure(config) is None:
        loader = model_class(head).from_pretrained
        return load_pretrained(loader, source, attn_implementation="eager", **kwargs).eval()
    return _load_shrunk(Path(source), config, head)


def build_model(config: PretrainedConfig, head: str = "sequence-classification",
                structure: ModelStructure | None = None) -> PreTrainedModel:
    """A randomly initialised model of `config`, shrunk to `structure` (latency work: weights do not matter)."""
    model = model_class(head).from_config(config, attn_implementation="eager")
    if structure is not None:
        adapter_for(config).apply_structure(model, structure)
    return model.eval()


def save_model(model: PreTrainedModel, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)


def _load_shrunk(model_dir: Path, config: PretrainedConfig, head: str) -> PreTrainedModel:
    structure = recorded_structure(config)
    delattr(config, STRUCTURE_KEY)
    model = build_model(config, head, structure)
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise BadInputError(f"{model_dir} records a pruned structure but holds no *.safetensors weights")
    state = {}
    for file in weights:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BadInputError(
            f"weights in {model_dir} do not fit its recorded structure: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()
