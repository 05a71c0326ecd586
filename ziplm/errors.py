"""Errors the user can act on. Each carries the exit status the CLI returns (see DESIGN.md)."""

from __future__ import annotations


class ZipLMError(Exception):
    """Base class: a failure with a message that says what is wrong and how to fix it."""

    exit_code = 2


class BadInputError(ZipLMError):
    """The user's input (recipe, model, data, runtime name, file) cannot be used as given."""


class AssetMissingError(BadInputError):
    """An embedded asset has not been fetched; the message names the set-up command."""


class UnreachableTargetError(BadInputError):
    """A requested speedup lies beyond what the latency table can reach."""


class MissingEngineError(BadInputError):
    """A registered runtime's engine (its package, or the GPU libraries it needs) is not on this machine; the message
    names what to install."""
