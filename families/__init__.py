"""Model-family adapters. Importing this package registers every family."""

# importing each module registers its adapter
from ziplm.families import bert, distilbert, electra, gpt2, llama, modernbert, mpnet, roberta  # noqa: F401
from ziplm.families.base import FamilyAdapter, LayerStructure, ModelShape, ModelStructure
from ziplm.families.registry import adapter_for, supported_model_types

__all__ = [
    "FamilyAdapter",
    "LayerStructure",
    "ModelShape",
    "ModelStructure",
    "adapter_for",
    "supported_model_types",
]
