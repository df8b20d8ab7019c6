"""Train the organism: a small Llama that reads a ``compact`` program and predicts its answer.

The task is next-token prediction of the answer digit: the model reads ``<bos>a=5;b=a;#b:`` and
must put its top logit on ``5``. The loss is the cross-entropy of that one answer token; no other
position is supervised, so the model is never shown an intermediate value and has to work out
the whole chain itself (which is what activation patching then looks for).

Training is deterministic on one machine: the weights are initialised under
``torch.manual_seed(seed)``, batch ``i`` is sampled from ``random.Random(derive_seed(..., i))``
in this process, and the thread count is fixed. Held-out evaluation draws programs from seeds
derived with another tag (``"organism-eval"``), so evaluation programs come from RNG streams that
training never uses (short programs can still coincide by chance: there are only 30 programs of
one statement).

Lengths follow a curriculum. The longest sampled length starts at ``min_len + 1`` and grows by
one whenever the model reaches ``curriculum_gate`` accuracy at it (checked every
``curriculum_check_every`` steps on programs from a third RNG stream, ``"organism-gate"``, so the
reported held-out accuracy never steers training), and at the latest on a linear schedule that
reaches ``max_len`` after ``curriculum_frac`` of the steps. Every batch mixes all lengths up to
the current one, each weighted by a power of its length, so short lengths are never forgotten.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seqpatch.organism.config import OrganismTrainConfig, OrganismTrainError
from seqpatch.organism.config import family_from_params as family_from_params  # re-exported
from seqpatch.organism.output import MODEL_CARD, TRAINING_JSON, check_out, save
from seqpatch.programs import (
    Family,
    Program,
    derive_seed,
    make_sequence,
)

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast


@dataclass
class _History:
    losses: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


def build_model(cfg: OrganismTrainConfig, vocab_size: int) -> LlamaForCausalLM:
    """A freshly initialised organism (initialised under ``torch.manual_seed(cfg.seed)``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from seqpatch.organism.tokenizer import SPECIAL_TOKENS, VOCAB

    ids = {
        f"{k.removesuffix('_token')}_token_id": VOCAB.index(v) for k, v in SPECIAL_TOKENS.items()
    }
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.d_model // cfg.n_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=False,
        pad_token_id=ids["pad_token_id"],
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    # The answer is one token and nothing after it is trained: generate() should stop there.
    model.generation_config.max_new_tokens = 1
    return model.float()


def deadline_length(cfg: OrganismTrainConfig, step: int) -> int:
    """The curriculum's longest length at ``step`` if the accuracy gate never opens early."""
    curriculum_steps = max(1, round(cfg.curriculum_frac * cfg.steps))
    span = cfg.max_len - cfg.min_len + 1
    return cfg.min_len + min(span - 1, step * span // curriculum_steps)


def length_weights(cfg: OrganismTrainConfig, longest: int) -> dict[int, float]:
    """Sampling weight of each length up to ``longest``: ``n ** length_weight_power``, since
    longer programs are harder and need more examples."""
    return {n: float(n) ** cfg.length_weight_power for n in range(cfg.min_len, longest + 1)}


def training_batch(
    cfg: OrganismTrainConfig, family: Family, step: int, longest: int
) -> list[Program]:
    """The programs of batch ``step``: a pure function of (config, step, longest length)."""
    rng = random.Random(derive_seed("organism-train", cfg.seed, step))
    weights = length_weights(cfg, longest)
    lengths = rng.choices(list(weights), weights=list(weights.values()), k=cfg.batch_size)
    return [make_sequence(family, n, rng) for n in lengths]


def eval_programs(
    family: Family, seq_len: int, n: int, seed: int, stream: str = "organism-eval"
) -> list[Program]:
    """Held-out programs: RNG streams tagged ``stream``, never used by training."""
    return [
        make_sequence(family, seq_len, random.Random(derive_seed(stream, seed, seq_len, i)))
        for i in range(n)
    ]


def answer_token_ids(tokenizer: PreTrainedTokenizerFast, programs: Sequence[Program]) -> list[int]:
    ids = []
    for program in programs:
        token_id = tokenizer.convert_tokens_to_ids(str(program.answer))
        if token_id == tokenizer.unk_token_id:
            raise OrganismTrainError(
                f"answer {program.answer!r} of {program.render('compact')!r} is not one token"
            )
        ids.append(token_id)
    return ids


def answer_loss(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    programs: Sequence[Program],
    buckets: int = 1,
) -> torch.Tensor:
    """Summed cross-entropy of the answer token, reading each prompt right-padded.

    Right padding needs no attention mask here: under causal attention the last prompt token
    never sees the pads after it. With ``buckets > 1`` the prompts are sorted by length and run
    in that many forwards, each padded only to its own longest prompt: the loss is the same sum
    (up to float summation order), with less compute spent on pads. ``buckets=1`` keeps the
    batch order, so older organisms retrain bit for bit.
    """
    import torch
    import torch.nn.functional as F

    encoded = tokenizer([p.render("compact") for p in programs])["input_ids"]
    targets = answer_token_ids(tokenizer, programs)
    order = list(range(len(encoded)))
    if buckets > 1:
        order.sort(key=lambda i: len(encoded[i]))
    size = -(-len(order) // max(1, buckets))
    total = torch.zeros(())
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        for row, i in enumerate(rows):
            input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
        last = torch.tensor([len(encoded[i]) - 1 for i in rows])
        hidden = model.model(input_ids=input_ids).last_hidden_state  # (B, T, d)
        logits = model.lm_head(hidden[torch.arange(len(rows)), last])  # (B, vocab)
        wanted = torch.tensor([targets[i] for i in rows])
        total = total + F.cross_entropy(logits, wanted, reduction="sum")
    return total


def _lr_factor(cfg: OrganismTrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def predict_answers(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    batch_size: int = 256,
) -> list[str]:
    """Greedy next token after each prompt, decoded (batched, left-padded with a mask)."""
    import torch

    predictions: list[str] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                list(prompts[start : start + batch_size]), return_tensors="pt", padding=True
            )
            logits = model(**batch, logits_to_keep=1).logits[:, -1]  # (B, vocab)
            predictions += tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    model.train(was_training)
    return predictions


def evaluate_organism(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    family: str | Family,
    lengths: Iterable[int],
    n: int,
    seed: int,
    stream: str = "organism-eval",
) -> dict[int, float]:
    """Exact-match accuracy of the greedy answer token per length on ``n`` held-out programs
    (drawn from RNG streams tagged ``stream``; training draws from ``"organism-train"``)."""
    from seqpatch.programs import get_family

    fam = get_family(family)
    accuracy: dict[int, float] = {}
    for seq_len in lengths:
        programs = eval_programs(fam, seq_len, n, seed, stream)
        predicted = predict_answers(model, tokenizer, [p.render("compact") for p in programs])
        accuracy[seq_len] = sum(
            pred == str(p.answer) for pred, p in zip(predicted, programs, strict=True)
        ) / len(programs)
    return accuracy


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]organism"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        disable=not enabled,
    )


@dataclass
class _Curriculum:
    """The longest length sampled so far and when each length was unlocked (see module doc)."""

    cfg: OrganismTrainConfig
    family: Family
    longest: int = 0
    unlocked_at: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.longest = min(self.cfg.min_len + 1, self.cfg.max_len)
        self.unlocked_at[self.longest] = 0

    def advance(
        self, step: int, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
    ) -> bool:
        """Update ``longest`` before batch ``step``; True when it grew."""
        cfg = self.cfg
        if deadline_length(cfg, step) > self.longest:
            self.longest = deadline_length(cfg, step)
        elif self.longest < cfg.max_len and step and step % cfg.curriculum_check_every == 0:
            gate = evaluate_organism(
                model,
                tokenizer,
                self.family,
                [self.longest],
                cfg.curriculum_check_n,
                cfg.seed,
                stream="organism-gate",
            )
            if gate[self.longest] < cfg.curriculum_gate:
                return False
            self.longest += 1
        else:
            return False
        self.unlocked_at[self.longest] = step
        return True


def _optimizer(cfg: OrganismTrainConfig, model: LlamaForCausalLM) -> torch.optim.Optimizer:
    """AdamW with weight decay on the weight matrices only (not embeddings, norms)."""
    import torch

    def decays(name: str, param: torch.Tensor) -> bool:
        return param.ndim >= 2 and "embed" not in name

    params = list(model.named_parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in params if decays(n, p)], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )


def _fit(
    cfg: OrganismTrainConfig,
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    family: Family,
    progress: bool,
) -> tuple[_History, _Curriculum]:
    """The training loop; returns the logged losses and evaluations, and the curriculum."""
    import torch

    model.train()
    optimizer = _optimizer(cfg, model)
    history = _History()
    curriculum = _Curriculum(cfg, family)
    window_loss, window_n = 0.0, 0
    status = ""
    with _progress(progress) as bar:
        task = bar.add_task("train", total=cfg.steps, status=status)
        for step in range(cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * _lr_factor(cfg, step)
            if curriculum.advance(step, model, tokenizer):
                bar.console.print(f"step {step}: longest length now {curriculum.longest}")
            programs = training_batch(cfg, family, step, curriculum.longest)
            optimizer.zero_grad(set_to_none=True)
            loss = answer_loss(model, tokenizer, programs, cfg.length_buckets) / len(programs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            window_loss, window_n = window_loss + loss.item(), window_n + 1
            last = step + 1 == cfg.steps
            if (step + 1) % cfg.loss_log_every == 0 or last:
                history.losses.append(
                    {
                        "step": step + 1,
                        "loss": window_loss / window_n,
                        "lr": optimizer.param_groups[0]["lr"],
                        "max_len": curriculum.longest,
                    }
                )
                window_loss, window_n = 0.0, 0
                status = f"loss {history.losses[-1]['loss']:.4f}"
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last):
                lengths = sorted({curriculum.longest, cfg.max_len})
                acc = evaluate_organism(model, tokenizer, family, lengths, cfg.eval_n, cfg.seed)
                history.evals.append({"step": step + 1, "accuracy": acc})
                shown = " ".join(f"L{k}={v:.3f}" for k, v in acc.items())
                status = f"loss {history.losses[-1]['loss']:.4f} acc {shown}"
                bar.console.print(f"step {step + 1}/{cfg.steps}: {status}")
            bar.update(task, advance=1, status=status)
    model.eval()
    return history, curriculum


def train_organism(
    cfg: OrganismTrainConfig, out_dir: str | Path, progress: bool = True, force: bool = False
) -> dict[str, Any]:
    """Train the organism from scratch and save it to ``out_dir``; returns the metrics.

    ``out_dir`` receives ``config.json``, ``model.safetensors``, the tokenizer files,
    ``training.json`` (config, family parameters, timings, per-length held-out accuracy up to
    twice ``max_len``, loss curve) and a model card ``README.md`` rendered from it. It must be
    absent, empty or an organism folder (``force``: any folder, but none of its files is
    replaced); that is checked before training (``seqpatch.organism.output``).
    """
    import torch

    from seqpatch.organism.tokenizer import build_tokenizer
    from seqpatch.progress import library_bars

    out = Path(out_dir)
    check_out(out, force)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        family = cfg.make_family()
        tokenizer = build_tokenizer()
        model = build_model(cfg, len(tokenizer))
        history, curriculum = _fit(cfg, model, tokenizer, family, progress)
        train_wall, train_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        lengths = range(1, 2 * cfg.max_len + 1)
        accuracy = evaluate_organism(model, tokenizer, family, lengths, cfg.final_eval_n, cfg.seed)
    finally:
        torch.set_num_threads(previous_threads)
    metrics = {
        "config": asdict(cfg),
        "family": {"name": cfg.family, "params": cfg.family_params()},
        "prompt_format": "compact rendering, <bos> prepended; the answer is the next token",
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_wall_s": round(train_wall, 1),
        "train_cpu_s": round(train_cpu, 1),
        "threads": cfg.threads,
        "torch_version": torch.__version__,
        "accuracy_by_length": {str(k): v for k, v in accuracy.items()},
        "eval_n_per_length": cfg.final_eval_n,
        "trained_lengths": [cfg.min_len, cfg.max_len],
        "curriculum_unlocked_at_step": {str(k): v for k, v in curriculum.unlocked_at.items()},
        "loss_curve": history.losses,
        "evals_during_training": [
            {"step": e["step"], "accuracy": {str(k): v for k, v in e["accuracy"].items()}}
            for e in history.evals
        ],
    }

    def write(folder: Path) -> None:
        with library_bars(progress):
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        (folder / TRAINING_JSON).write_text(json.dumps(metrics, indent=2) + "\n")
        (folder / MODEL_CARD).write_text(render_model_card(metrics))

    save(out, write, force)
    return metrics


def render_model_card(metrics: dict[str, Any]) -> str:
    """The model card (``README.md``) of a trained organism, from its ``training.json``."""
    from seqpatch.organism.card import render_card

    return render_card(metrics)
