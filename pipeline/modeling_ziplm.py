"""Loads a ZipLM Deploy member folder with plain transformers:

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)   # a classifier member
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)                 # a decoder member
    AutoModel.from_pretrained(folder, trust_remote_code=True)                            # a sentence-encoder member

A pruned member's layers have their own head counts and FFN widths (recorded in config.json as `ziplm_structure`),
which the family's stock class, built from the dense shape the config still names, cannot hold. The member folder
carries a copy of this file and names its classes in config.json's `auto_map`; they hand the folder to ZipLM Deploy,
which rebuilds the pruned skeleton (and an INT8 member's fake quantization) and loads the weights into it. The model
returned is the family's own transformers class. ZipLM Deploy (the `ziplm` package) must be installed where this
runs; a runtime without it serves the folder's `model.onnx`, which needs nothing but ONNX Runtime.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

# a ZipLM head -> (the transformers Auto class a user calls, the class of this file it resolves to)
AUTO_CLASSES = {"sequence-classification": ("AutoModelForSequenceClassification", "ZipLMForSequenceClassification"),
                "causal-lm": ("AutoModelForCausalLM", "ZipLMForCausalLM"),
                "base": ("AutoModel", "ZipLMModel")}


def _load(folder: Any, head: str) -> PreTrainedModel:
    try:
        from ziplm.stages.quantize import load_model
    except ImportError as error:
        raise ImportError(f"{folder} holds a model pruned by ZipLM Deploy: install ziplm to load it with transformers "
                          "(pip install ziplm), or serve its model.onnx with ONNX Runtime") from error
    return load_model(str(folder), head)


class ZipLMForSequenceClassification(PreTrainedModel):
    """Resolves `AutoModelForSequenceClassification` for a pruned classifier member."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> PreTrainedModel:
        return _load(pretrained_model_name_or_path, "sequence-classification")


class ZipLMForCausalLM(PreTrainedModel):
    """Resolves `AutoModelForCausalLM` for a pruned decoder member."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> PreTrainedModel:
        return _load(pretrained_model_name_or_path, "causal-lm")


class ZipLMModel(PreTrainedModel):
    """Resolves `AutoModel` for a pruned encoder member (a sentence-embedding member's model)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> PreTrainedModel:
        return _load(pretrained_model_name_or_path, "base")
