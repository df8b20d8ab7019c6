"""The organism's model card, rendered from the metrics ``train_organism`` records."""

from __future__ import annotations

import math
from typing import Any

TARGET_ACCURACY = 0.99  # the accuracy seqpatch asks of its organism at every trained length


# Options that `seqpatch organism train` takes; every other field is a scripts/train_organism.py option.
_CLI_OPTIONS = frozenset({"family", "seed", "steps", "max_len", "batch_size", "lr", "threads"})


def reproduce_command(config: dict[str, Any]) -> str:
    """The command line that retrains an organism with ``config`` (non-default options only)."""
    from seqpatch.organism.config import OrganismTrainConfig

    defaults = OrganismTrainConfig()
    changed = {k: v for k, v in config.items() if getattr(defaults, k, None) != v}
    options = [f"--{name.replace('_', '-')} {value}" for name, value in changed.items()]
    program = (
        "seqpatch organism train"
        if set(changed) <= _CLI_OPTIONS
        else "python scripts/train_organism.py"
    )
    return " ".join([program, "--out DIR", *options])


def _accuracy_table(metrics: dict[str, Any]) -> str:
    lo, hi = metrics["trained_lengths"]
    n = metrics["eval_n_per_length"]
    rows = ["| statements | trained on | exact match | correct / n |", "|---:|:---:|---:|---:|"]
    for length, acc in sorted(metrics["accuracy_by_length"].items(), key=lambda kv: int(kv[0])):
        trained = "yes" if lo <= int(length) <= hi else "no"
        rows.append(f"| {length} | {trained} | {100 * acc:.1f}% | {round(acc * n)} / {n} |")
    return "\n".join(rows)


def _loss_line(cfg: dict[str, Any]) -> str:
    buckets = cfg.get("length_buckets", 1)
    split = (
        f" Each batch runs as {buckets} length-sorted forwards (less padding, the same loss)."
        if buckets > 1
        else ""
    )
    return (
        "cross-entropy of the answer token only. No other position is supervised, so the model "
        f"is never shown an intermediate value.{split}"
    )


def _length_weights(cfg: dict[str, Any]) -> str:
    power = cfg.get("length_weight_power", 1.0)
    return "its length" if power == 1 else f"its length to the power {power:g}"


def render_card(metrics: dict[str, Any]) -> str:
    cfg = metrics["config"]
    family = metrics["family"]
    params = ", ".join(f"{k}={v!r}" for k, v in family["params"].items())
    lo, hi = metrics["trained_lengths"]
    trained = [
        (length, acc)
        for length, acc in metrics["accuracy_by_length"].items()
        if lo <= int(length) <= hi
    ]
    unlocked = ", ".join(
        f"{length} at {step}" for length, step in metrics["curriculum_unlocked_at_step"].items()
    )
    losses = metrics["loss_curve"]
    loss_line = (
        f"first logged window {losses[0]['loss']:.4f}, last {losses[-1]['loss']:.4f}"
        if losses
        else "not logged"
    )
    threads = f"{metrics['threads']} CPU thread" + ("s" if metrics["threads"] != 1 else "")
    below = [length for length, acc in trained if acc < TARGET_ACCURACY]
    n_eval = metrics["eval_n_per_length"]
    lowest = min(acc for _, acc in trained)
    margin = 1.96 * math.sqrt(lowest * (1 - lowest) / n_eval)  # normal approximation
    target_line = (
        f"- Below the {TARGET_ACCURACY:.0%} target at trained lengths {', '.join(below)}: the "
        "training loss was still falling when the schedule ended, so more steps "
        "(`--steps`) may close the gap (not yet measured)."
        if below
        else f"- {TARGET_ACCURACY:.0%} or better at every trained length, measured on {n_eval} "
        f"programs each: sampling alone moves the lowest ({lowest:.1%}) by about "
        f"±{100 * margin:.1f} points (95%)."
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [seqpatch, interpretability, activation-patching, toy-model]
---

# seqpatch organism

The built-in model of seqpatch: a small Llama-architecture model trained from scratch, by seqpatch
itself, to read a variable-binding program and predict the value of the queried variable. It is
small enough to run the whole seqpatch pipeline (benchmark, counterfactual pairs, activation
patching) on a laptop CPU in minutes, and it is trained on nothing else, so the mechanism patching
finds is the one for this task.

## Task and prompt format

Family `{family["name"]}` with parameters `{params}` (`seqpatch.programs`); the exact instance is
`seqpatch.organism.organism_family()`. The prompt is the program's `compact` rendering with
`<bos>` prepended by the tokenizer; the answer is the next token:

```
<bos>a=5;b=a;c=7;a=c;#b:   ->   5
```

Statements assign a digit or copy another variable; the query's reference chain is 1 to
{family["params"].get("max_depth")} statements deep, and the other assignments are distractors.

## Architecture

`LlamaForCausalLM`: {cfg["n_layers"]} layers, d_model {cfg["d_model"]}, {cfg["n_heads"]} attention heads ({cfg["n_kv_heads"]} key/value heads), MLP width {cfg["d_ff"]}, RoPE, RMSNorm, untied embeddings, float32; **{metrics["n_params"]:,} parameters**.

Tokenizer: character level (`PreTrainedTokenizerFast` over a `tokenizers` WordLevel model): one
token per letter, digit and punctuation mark, plus `<pad> <bos> <eos> <unk>`; `<bos>` is
prepended, padding is on the left. Load it with `PreTrainedTokenizerFast.from_pretrained(folder)`.

## Training

- Loss: {_loss_line(cfg)}
- Data: fresh programs every step from `random.Random(derive_seed("organism-train", seed, step))`, lengths {lo}..{hi} statements.
- Curriculum: the longest sampled length starts at {min(lo + 1, hi)} and grows by one as soon as the model reaches {cfg["curriculum_gate"]:.0%} accuracy at it ({cfg["curriculum_check_n"]} programs from a separate `organism-gate` RNG stream, checked every {cfg["curriculum_check_every"]} steps), and at the latest on a linear schedule that reaches {hi} after {cfg["curriculum_frac"]:.0%} of the steps. Step at which each longest length was reached: {unlocked}. Every batch mixes all lengths up to the current longest, each weighted by {_length_weights(cfg)}.
- Optimiser: AdamW (betas 0.9/0.98, weight decay {cfg["weight_decay"]} on weight matrices), peak lr {cfg["lr"]}, {cfg["warmup_steps"]} warmup steps then cosine decay to {cfg["min_lr_ratio"]} x peak, gradient clipping {cfg["grad_clip"]}, batch {cfg["batch_size"]}, {cfg["steps"]} steps, seed {cfg["seed"]}.
- Time: {metrics["train_wall_s"] / 60:.1f} min wall, {metrics["train_cpu_s"] / 60:.1f} min CPU on {threads} (torch {metrics["torch_version"]}).
- Loss (mean per logged window): {loss_line}.

Full config, loss curve and the evaluations during training: `training.json`.

## Accuracy

Exact match of the greedy answer token on {metrics["eval_n_per_length"]} held-out programs per
length (RNG streams tagged `organism-eval`, never used in training), up to twice the longest
trained length. Lowest accuracy at a trained length: **{100 * lowest:.1f}%**.

{_accuracy_table(metrics)}

## Reproduce

```
{reproduce_command(cfg)}
# scripts/train_organism.py takes every OrganismTrainConfig field as an option
```

Same seed, same machine and thread count give bit-identical weights; other CPUs or torch
versions may differ in the last float bits and therefore in the weights, not in the recipe.

## Caveats

{target_line}
- Held-out means drawn from unused RNG streams, not guaranteed unseen: short programs (one statement has only 30 variants) certainly also occur in training.
- Lengths above {hi} statements were never trained; accuracy there measures length generalisation.
- Only the answer token is trained, so `generation_config.json` stops `generate()` after one token: whatever the model would write next was never trained.
- A toy model for interpretability experiments, not a general language model.
"""
