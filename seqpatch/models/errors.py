"""Errors of loading and reading models; each message says what failed and what to do."""

from __future__ import annotations

from seqpatch.errors import SeqpatchError


class ModelLoadError(SeqpatchError, RuntimeError):
    """A model could not be loaded; the message says what failed and what to do."""


class UnsupportedArchitectureError(ModelLoadError):
    """The checkpoint's ``model_type`` has no ``ArchitectureAdapter``."""


class AnswerTokenizationError(SeqpatchError, ValueError):
    """An answer text cannot be tokenized as a separate suffix of the prompt."""
