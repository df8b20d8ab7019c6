"""The organism's training config: everything that determines its trained weights.

Its own module, below the trainer and the model card (the card names the options that differ
from these defaults), so that neither imports the other for it. ``seqpatch.organism.train``
re-exports every name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from seqpatch.bounds import check_finite
from seqpatch.errors import SeqpatchError
from seqpatch.programs import BindingFamily, Family, ModularFamily

SUPPORTED_FAMILIES = ("binding", "modular")


class OrganismTrainError(SeqpatchError, ValueError):
    """An organism training config that cannot work; the message says what to change."""


@dataclass(frozen=True)
class OrganismTrainConfig:
    """Everything that determines the trained weights (with the machine's float arithmetic)."""

    # --- task ---
    family: str = "binding"  # one-digit answers; "modular" also works, "arithmetic" does not
    variables: str = "abc"  # three names: copies between variables and distractor chains
    max_operand: int = 9  # constants 0..9, so every answer is one token
    copy_prob: float = 0.7  # stock BindingFamily: long reference chains are common
    max_depth: int = 4  # stock BindingFamily: the query's chain has 1..4 statements
    update_prob: float = 0.3  # modular family only (stock ModularFamily value)
    min_len: int = 1
    max_len: int = 8
    length_weight_power: float = 2.0  # length n is sampled with weight n ** power
    curriculum_frac: float = 0.3  # deadline: max_len is reached by then even without the gate
    curriculum_gate: float = 0.95  # accuracy at the current longest length that unlocks the next
    curriculum_check_every: int = 50
    curriculum_check_n: int = 128
    # --- model (Llama) ---
    n_layers: int = 4  # enough with 8 heads; 6 layers with 4 heads learned slower per minute
    d_model: int = 128
    n_heads: int = 8  # head_dim 16: more heads was the largest single gain in accuracy
    n_kv_heads: int = 8  # plain multi-head attention: per-head patching sees whole heads
    d_ff: int = 256  # 2 x d_model: the MLP is most of the compute, the task needs little of it
    max_positions: int = 512  # RoPE has no position parameters; this only caps prompt length
    # --- optimisation ---
    steps: int = 3600
    batch_size: int = 128
    length_buckets: int = 4  # forwards per batch, grouped by prompt length (less padding)
    lr: float = 5e-4
    warmup_steps: int = 100  # avoids early Adam blow-ups with a fresh, small model
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    # The weights depend on the thread count (float reduction order): a retrain reproduces them
    # bit for bit only with the same count. Two threads fit the 30-minute budget on 2 cores.
    threads: int = 2
    # --- monitoring ---
    eval_every: int = 250
    eval_n: int = 200  # per length, during training (the final evaluation uses final_eval_n)
    final_eval_n: int = 1000
    loss_log_every: int = 50

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise OrganismTrainError(
                f"family {self.family!r} cannot train the organism: its answers must be one "
                f"digit; use one of {SUPPORTED_FAMILIES}"
            )
        if not 1 <= self.min_len <= self.max_len:
            raise OrganismTrainError(
                f"need 1 <= min_len <= max_len, got min_len={self.min_len}, max_len={self.max_len}"
            )
        if self.max_operand > 9:
            raise OrganismTrainError("max_operand must be <= 9 so that answers are one token")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise OrganismTrainError(
                f"d_model ({self.d_model}) must divide by n_heads ({self.n_heads}) and n_heads "
                f"by n_kv_heads ({self.n_kv_heads})"
            )
        if self.steps < 1 or self.batch_size < 1:
            raise OrganismTrainError("steps and batch_size must be >= 1")
        for option in fields(self):
            if option.type == "float":  # nan and inf pass every range test: refused here
                check_finite(option.name, getattr(self, option.name), OrganismTrainError)
        check_finite("lr", self.lr, OrganismTrainError, above=0)

    def family_params(self) -> dict[str, Any]:
        """The constructor arguments of the family instance (recorded in ``training.json``)."""
        params: dict[str, Any] = {
            "variables": self.variables,
            "max_operand": self.max_operand,
            "copy_prob": self.copy_prob,
            "max_depth": self.max_depth,
        }
        if self.family == "modular":
            params["update_prob"] = self.update_prob
        return params

    def make_family(self) -> Family:
        return family_from_params(self.family, self.family_params())


def family_from_params(name: str, params: dict[str, Any]) -> Family:
    """The family instance ``name(**params)``; ``seqpatch.organism.organism_family`` uses it."""
    classes: dict[str, type[Family]] = {"binding": BindingFamily, "modular": ModularFamily}
    if name not in classes:
        raise OrganismTrainError(f"unknown organism family {name!r}; use one of {sorted(classes)}")
    return classes[name](**params)
