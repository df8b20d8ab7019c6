"""The built-in organism: a small Llama trained by seqpatch on one program family.

- ``WEIGHTS_DIR`` — the shipped model folder (``LlamaForCausalLM.from_pretrained`` and
  ``PreTrainedTokenizerFast.from_pretrained`` load it; ``seqpatch.models.load_model("builtin")``
  does both).
- ``organism_family()`` — the exact ``Family`` instance the shipped model was trained on (read
  from ``training.json``); generate benchmark programs and counterfactual pairs from it.
- ``train_organism(cfg, out_dir)`` / ``OrganismTrainConfig`` — retrain it (``seqpatch.organism.train``).
- ``build_tokenizer()`` — its character-level tokenizer (``seqpatch.organism.tokenizer``).

Importing this package does not import torch and reads no file.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seqpatch.organism.config import OrganismTrainConfig, OrganismTrainError, family_from_params
from seqpatch.organism.tokenizer import build_tokenizer
from seqpatch.organism.train import TRAINING_JSON, evaluate_organism, train_organism

if TYPE_CHECKING:
    from seqpatch.programs import Family

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"

__all__ = [
    "WEIGHTS_DIR",
    "OrganismTrainConfig",
    "OrganismTrainError",
    "build_tokenizer",
    "evaluate_organism",
    "organism_family",
    "train_organism",
    "training_record",
]


def training_record(weights_dir: str | Path = WEIGHTS_DIR) -> dict[str, Any]:
    """The ``training.json`` of a trained organism folder (the shipped one by default)."""
    path = Path(weights_dir) / TRAINING_JSON
    if not path.is_file():
        raise OrganismTrainError(
            f"{path} is missing: {weights_dir} is not a folder written by train_organism; "
            "reinstall seqpatch or retrain with `seqpatch organism train --out DIR`"
        )
    return json.loads(path.read_text())


@cache
def _shipped_family() -> Family:
    from seqpatch.programs import FAMILIES

    family = training_record()["family"]
    trained = family_from_params(family["name"], family["params"])
    stock = FAMILIES.get(family["name"])
    return stock if stock is not None and vars(stock) == vars(trained) else trained


def organism_family(weights_dir: str | Path | None = None) -> Family:
    """The family instance an organism was trained on: the stock ``FAMILIES`` entry when its
    parameters match, else a new instance with the recorded parameters."""
    if weights_dir is None:
        return _shipped_family()
    family = training_record(weights_dir)["family"]
    return family_from_params(family["name"], family["params"])
