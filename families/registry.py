"""The explicit registry of model families, looked up by `config.model_type`."""

from __future__ import annotations

from transformers import PretrainedConfig

from ziplm.families.base import FamilyAdapter
from ziplm.errors import BadInputError

_FAMILIES: dict[str, FamilyAdapter] = {}


def register_family(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    adapter = cls()
    for model_type in cls.model_types:
        if model_type in _FAMILIES:
            raise ValueError(f"model type {model_type!r} is already served by {_FAMILIES[model_type].name}")
        _FAMILIES[model_type] = adapter
    return cls


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def adapter_for(config: PretrainedConfig) -> FamilyAdapter:
    return adapter_for_type(getattr(config, "model_type", None), getattr(config, "architectures", None) or [])


def adapter_for_type(model_type: str | None, architectures: list[str] | None = None) -> FamilyAdapter:
    """The adapter serving `model_type`; BadInputError naming the supported types where none does."""
    if model_type not in _FAMILIES:
        raise BadInputError(
            f"unsupported architecture {model_type!r} ({', '.join(architectures or [])}); "
            f"supported model types: {', '.join(supported_model_types())}. "
            "Pass a model of a supported family, or add an adapter in families/ (docs/extending.md)."
        )
    return _FAMILIES[model_type]
