"""Saving and loading models whose layers may have been shrunk (the per-layer shape lives in config.json).

A model too large for one worker can be loaded as a skeleton (`load_skeleton`): everything but its layers in memory,
each layer's weights read from the folder's safetensors when asked for and dropped after (layer-sequential
calibration, stages.calibrate).

Later stages may record a transformation of their own in config.json (INT8 fake-quant: `ziplm_quantization`); they
load such a model through `load_model` with a `restore` for their key (ziplm.stages.quantize.load_model).
"""

from __future__ import annotations

import copy
import ctypes
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
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
    records = _records(config)
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


class CheckpointLayers:
    """The layers of a skeleton (`load_skeleton`), each read from the folder's safetensors only while it is used."""

    def __init__(self, model: PreTrainedModel, files: dict[str, Path], source: Path) -> None:
        self.model, self.files, self.source = model, files, source
        self.names = {id(module): name for name, module in model.named_modules()}

    @contextmanager
    def loaded(self, layer: nn.Module) -> Iterator[nn.Module]:
        """`layer` with its weights read in; back on the meta device (its memory freed) afterwards."""
        missing = read_weights(layer, self.names[id(layer)] + ".", self.files, self.model.base_model_prefix)
        if missing:
            raise _no_weights_for(missing, self.source)
        try:
            yield layer
        finally:
            layer.to("meta")
            _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc's malloc_trim). glibc serves allocations below a threshold
    that rises with every large block freed from its heap and keeps the freed pages: without this, a layer-by-layer
    pass grows by about a layer's weights per layer (SmolLM2: 10 MB a layer). Elsewhere (no glibc) it does nothing."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except AttributeError:
        pass


def load_skeleton(name_or_path: str, head: str | None = None) -> tuple[PreTrainedModel, CheckpointLayers]:
    """A model directory's model with its layers' weights left on the meta device (no memory) and everything else
    (embeddings, final norm, head) read in; its `CheckpointLayers` read each layer's weights when asked.

    Reads safetensors weights (a GGUF file is de-quantised to a folder of them once, which reads it whole; a
    quantized folder is refused: calibration is of the float model)."""
    source = Path(resolve_model(name_or_path))
    config = load_config(str(source))
    if _records(config):
        raise BadInputError(f"{source} holds a quantized model: calibrate the float model it was made from")
    structure = recorded_structure(config)
    for key in (STRUCTURE_KEY, "auto_map"):
        if hasattr(config, key):
            delattr(config, key)
    with init_empty_weights(include_buffers=False):  # parameters on the meta device; buffers computed as usual
        model = build_model(config, head, structure)
    files = _tensor_files(source)
    layers = {id(layer) for layer in adapter_for(config).layers(model)}
    in_layers = tuple(f"{name}." for name, module in model.named_modules() if id(module) in layers)
    read_weights(model, "", files, model.base_model_prefix, skip=in_layers)
    model.tie_weights()  # an output embedding tied to the input embedding is stored once
    left = [name for name, parameter in model.named_parameters()
            if parameter.is_meta and not name.startswith(in_layers)]
    if left:
        raise _no_weights_for(left, source)
    return model.eval(), CheckpointLayers(model, files, source)


def _records(config: PretrainedConfig) -> dict[str, Any]:
    """The transformations other than the structure that stages recorded in a config (their config keys)."""
    return {key: value for key, value in config.to_dict().items()
            if key.startswith(RECORD_PREFIX) and key != STRUCTURE_KEY}


def _no_weights_for(names: list[str], source: Path) -> BadInputError:
    return BadInputError(f"{source} holds no weights for {', '.join(names[:5])}: save the model with save_model (or "
                         "save_pretrained) and load that folder")


def read_weights(module: nn.Module, prefix: str, files: dict[str, Path], base_prefix: str,
                 skip: tuple[str, ...] = ()) -> list[str]:
    """Read `module`'s parameters and persistent buffers (named `prefix + NAME` in the model, or without or with
    `base_prefix.`: a checkpoint of the bare model or of one with a head) from the folder's files, except those under
    a name in `skip`. Returns the names it found in no file."""
    by_file: dict[Path, dict[str, str]] = {}
    missing = []
    for name in module.state_dict(keep_vars=True):
        key = prefix + name
        if key.startswith(skip):
            continue
        stored = next((k for k in (key, key.removeprefix(base_prefix + "."), f"{base_prefix}.{key}") if k in files),
                      None)
        if stored is None:
            missing.append(key)
        else:
            by_file.setdefault(files[stored], {})[name] = stored
    state = {}
    for file, names in by_file.items():
        with safe_open(str(file), "pt") as tensors:  # a tensor read is a view of the file mapped whole: copy it out,
            state |= {name: tensors.get_tensor(stored).clone() for name, stored in names.items()}  # or the map stays
    module.load_state_dict(state, strict=False, assign=True)
    return missing


def _tensor_files(source: Path) -> dict[str, Path]:
    """The file that holds each tensor of a model folder (one safetensors file, or shards with their index)."""
    index = source / "model.safetensors.index.json"
    if index.exists():
        return {key: source / file for key, file in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise BadInputError(f"{source} holds no *.safetensors weights to read one layer at a time")
    names = {}
    for file in files:
        with safe_open(str(file), "pt") as tensors:
            names |= dict.fromkeys(tensors.keys(), file)
    return names
