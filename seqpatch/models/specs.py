"""What kind of model a spec names, decided without torch, transformers or the network.

``classify(spec)`` tells ``builtin``, a pretrained registry name, a local folder and a Hub id
apart, and raises ``ModelLoadError`` (one line, what to do) for a spec that can be none of them:
a path that does not exist, a string that is no Hub id, or a misspelling of a known name
(``smollm2-135m`` → "did you mean 'smollm2-135m-instruct'?"). ``load_model`` asks it first, and
the command line asks it before importing any heavy library, so a typo fails in a fraction of a
second instead of after torch loads and the Hub times out.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from seqpatch.models import pretrained
from seqpatch.models.errors import ModelLoadError
from seqpatch.models.names import nearest
from seqpatch.redact import MARKER

BUILTIN = "builtin"
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

SpecKind = Literal["builtin", "pretrained", "folder", "hub"]


def classify(spec: str) -> SpecKind:
    """The kind of model ``spec`` names; ``ModelLoadError`` when it can name none."""
    if spec == BUILTIN:
        return "builtin"
    if pretrained.is_pretrained(spec):
        return "pretrained"
    if Path(spec).expanduser().exists():
        return "folder"
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if MARKER in spec:
        raise ModelLoadError(
            f"no model folder at {spec!r}: the path held your Hugging Face token when it was "
            f"stored, and {MARKER} stands in its place; set HF_TOKEN again to use it"
        )
    if looks_like_path or not HUB_ID_RE.match(spec):
        raise ModelLoadError(
            f"no model folder at {spec!r} (and it is not a Hub id like 'org/name'); check the "
            f"path, or use {BUILTIN!r} for the built-in organism or a pretrained name "
            "(`seqpatch models list`)"
        )
    near = near_name(spec)
    if near is not None:
        raise ModelLoadError(
            f"{spec!r} is neither {BUILTIN!r}, a pretrained name nor a local folder; did you mean "
            f"{near!r}? (`seqpatch models list` shows the pretrained names)"
        )
    return "hub"


def near_name(spec: str) -> str | None:
    """The built-in or pretrained name a Hub-less ``spec`` (no ``org/``) is a misspelling of
    (``names.nearest``). Asked before any network request, so a typo fails at once offline
    instead of after the Hub's timeout."""
    if "/" in spec:
        return None
    return nearest(spec, [BUILTIN, *pretrained.REGISTRY])
