"""Load a model once, and name the places ("sites") where its activations are read and patched.

``load_model(spec)`` returns a ``ModelHandle``: the ``transformers`` model (eval mode), the nnsight
wrapper around that same module, its tokenizer, a prompt format, and an ``ArchitectureAdapter``
that knows where each architecture keeps its embeddings, decoder layers, attention, MLP, final
norm and unembedding. ``spec`` is ``"builtin"`` (the shipped organism), a local folder, or a Hub
id; ``identify(spec)`` gives the identity ``load_model`` would record, without loading weights.

- ``sites`` — ``SiteRef`` and the site table (``seqpatch.site_table``, re-exported);
- ``adapters`` — one ``ArchitectureAdapter`` per architecture (supporting one more is one entry);
- ``handle`` — ``ModelHandle``: modules by site, traces, tokenization of prompts and answers;
- ``loading`` — ``load_model``, ``load_tokenizer``, ``identify``, Hub and NDIF handling;
- ``specs`` — what kind of model a spec names (and did-you-mean), without torch;
- ``batching`` — left-padded batches and teacher forcing of answers after prompts;
- ``errors`` — what loading and reading can fail with, each saying what to do.

Importing the package loads no submodule: each public name is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from seqpatch.models.adapters import ADAPTERS, ArchitectureAdapter, adapter_for
    from seqpatch.models.batching import TeacherForced, pad_left, teacher_forced
    from seqpatch.models.errors import (
        AnswerTokenizationError,
        ModelLoadError,
        UnsupportedArchitectureError,
    )
    from seqpatch.models.handle import ModelHandle
    from seqpatch.models.loading import (
        ORGANISM_ID,
        identify,
        load_model,
        load_tokenizer,
        require_ndif_key,
        resolve_device,
    )
    from seqpatch.models.sites import (
        SITE_TABLE,
        SITES,
        Site,
        SiteError,
        SiteInfo,
        SiteRef,
        site_info,
    )
    from seqpatch.models.specs import BUILTIN

# Where each public name lives: importing the package imports none of them (torch loads only
# when a name that needs it is first used, so `seqpatch.models.specs` and the pretrained
# registry answer the command line before any heavy import).
_HOMES = {
    "seqpatch.models.adapters": ("ADAPTERS", "ArchitectureAdapter", "adapter_for"),
    "seqpatch.models.batching": ("TeacherForced", "pad_left", "teacher_forced"),
    "seqpatch.models.errors": (
        "AnswerTokenizationError",
        "ModelLoadError",
        "UnsupportedArchitectureError",
    ),
    "seqpatch.models.handle": ("ModelHandle",),
    "seqpatch.models.loading": (
        "ORGANISM_ID",
        "identify",
        "load_model",
        "load_tokenizer",
        "require_ndif_key",
        "resolve_device",
    ),
    "seqpatch.models.sites": (
        "SITE_TABLE",
        "SITES",
        "Site",
        "SiteError",
        "SiteInfo",
        "SiteRef",
        "site_info",
    ),
    "seqpatch.models.specs": ("BUILTIN",),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ADAPTERS",
    "BUILTIN",
    "ORGANISM_ID",
    "SITES",
    "SITE_TABLE",
    "AnswerTokenizationError",
    "ArchitectureAdapter",
    "ModelHandle",
    "ModelLoadError",
    "Site",
    "SiteError",
    "SiteInfo",
    "SiteRef",
    "TeacherForced",
    "UnsupportedArchitectureError",
    "adapter_for",
    "identify",
    "load_model",
    "load_tokenizer",
    "pad_left",
    "require_ndif_key",
    "resolve_device",
    "site_info",
    "teacher_forced",
]
