"""Tiny random-weight models of real architectures, with tokenizers built locally.

Tests, scripts and benchmarks need real ``transformers`` architectures without the network: this
module builds them from configs (2 layers, ``d_model`` 64, 4 heads) and trains small tokenizers on
rendered programs in well under a second. Everything is deterministic from a seed.

- ``build_tiny_tokenizer("bpe")`` — byte-level BPE trained on programs of every family (both
  renderings) and the code prompt's wording. Like many real tokenizers it never merges ``//``
  with ``=``, so ``x //= 3`` takes more tokens than ``x += 3`` (the case counterfactual pairs must
  catch). It prepends ``<bos>``, like Llama's.
- ``build_tiny_tokenizer("wordlevel")`` — one token per name, digit, operator or punctuation
  mark of the ``compact`` rendering, like the built-in organism's; no BOS.
- ``tiny_config(arch)``, ``build_tiny_model(arch)``, ``save_tiny_model(arch, folder)`` for every
  architecture in ``TINY_ARCHITECTURES``.
"""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from seqpatch.programs import FAMILIES, make_sequence

TokenizerKind = Literal["bpe", "wordlevel"]

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
}

TINY_ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gpt2",
    "gpt_neox",
    "phi3",
    "phi",
)

# Word-level pieces of the compact rendering, longest operators first so ``//=`` is one token.
_WORDLEVEL_PATTERN = r"//=|\+=|-=|%=|abs|[a-z]|\d|[^\sa-z\d]"

_TINY_DIMS = {
    "d_model": 64,  # small enough for a test to run in milliseconds, big enough for 4 heads
    "n_heads": 4,
    "n_layers": 2,  # two layers: enough to check resid_post[l] == resid_pre[l + 1]
    "d_ff": 128,
    "max_positions": 512,  # longer than any few-shot prompt a test builds
}


def _training_corpus(n_per_family: int = 300) -> list[str]:
    """Programs of every family in both renderings, plus the wording of the code prompt format."""
    from seqpatch.prompts import CodeFormat

    fmt = CodeFormat(n_shots=0)
    corpus = []
    for family in sorted(FAMILIES):
        for i in range(n_per_family):
            program = make_sequence(family, 1 + i % 8, random.Random(i))
            corpus += [program.render("code"), program.render("compact")]
            corpus.append(fmt.prompt(program) + fmt.answer_text(program.answer))
    return corpus


@cache
def _tokenizer_json(kind: TokenizerKind, add_bos: bool) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(SPECIAL_TOKENS.values())
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex("//"), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=384,  # 256 bytes + specials + ~60 merges: words and ' =' style pieces
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_training_corpus(), trainer)
    elif kind == "wordlevel":
        words = ["//=", "+=", "-=", "%=", "abs", *"abcdefghijklmnopqrstuvwxyz", *"0123456789"]
        words += list("=;#:()-+*/%,.")
        vocab = {w: i for i, w in enumerate([*specials, *words])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Split(Regex(_WORDLEVEL_PATTERN), "isolated"),
            ]
        )
        tok.decoder = decoders.Fuse()
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'bpe' or 'wordlevel'")
    if add_bos:
        bos_id = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)]
        )
    return tok.to_str()


def build_tiny_tokenizer(
    kind: TokenizerKind = "bpe", add_bos: bool | None = None
) -> PreTrainedTokenizerFast:
    """A small tokenizer built here, never downloaded. ``add_bos`` defaults to True for BPE only.

    Left padding with ``<pad>``; no chat template (``apply_chat_template`` raises, as on any
    home-built tokenizer).
    """
    from tokenizers import Tokenizer

    add_bos = kind == "bpe" if add_bos is None else add_bos
    backend = Tokenizer.from_str(_tokenizer_json(kind, add_bos))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_config(arch: str, vocab_size: int = 384) -> PretrainedConfig:
    """A 2-layer config of ``arch`` (a ``model_type``) whose ids match the tiny tokenizers."""
    d, h, n, ff, t = (
        _TINY_DIMS[k] for k in ("d_model", "n_heads", "n_layers", "d_ff", "max_positions")
    )
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # specials come first in both
    common = {
        "vocab_size": vocab_size,
        "initializer_range": 0.1,
        "tie_word_embeddings": False,
        **ids,
    }
    llama_like = {
        "hidden_size": d,
        "num_attention_heads": h,
        "num_key_value_heads": h // 2,  # grouped-query attention, as in most current models
        "num_hidden_layers": n,
        "intermediate_size": ff,
        "max_position_embeddings": t,
    }
    match arch:
        case "llama" | "qwen2" | "mistral" | "phi3":
            kwargs = {**llama_like, "head_dim": d // h} if arch != "phi3" else llama_like
            if arch == "mistral":
                kwargs["sliding_window"] = t
            return AutoConfig.for_model(arch, **kwargs, **common)
        case "qwen3" | "gemma":
            # head_dim * n_heads != d_model, as in real Qwen3 and Gemma checkpoints
            return AutoConfig.for_model(arch, **llama_like, head_dim=8, **common)
        case "gemma2":
            return AutoConfig.for_model(
                arch,
                **llama_like,
                head_dim=8,
                sliding_window=16,  # shorter than test prompts, so the local layers are exercised
                query_pre_attn_scalar=8,
                **common,
            )
        case "gemma3_text" | "gemma3":  # "gemma3" alone names the multimodal wrapper's config
            return AutoConfig.for_model(
                "gemma3_text",
                **llama_like,
                head_dim=8,
                query_pre_attn_scalar=8,
                sliding_window=4,  # far shorter than test prompts: the local layer's mask matters
                layer_types=["sliding_attention", "full_attention"],  # one of each, as 5:1 in 270M
                rope_parameters={  # distinct bases per layer type, as in the real checkpoints
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                },
                **common,
            )
        case "gpt2":
            return AutoConfig.for_model(
                arch, n_embd=d, n_head=h, n_layer=n, n_inner=ff, n_positions=t, **common
            )
        case "gpt_neox":
            return AutoConfig.for_model(
                arch,
                hidden_size=d,
                num_attention_heads=h,
                num_hidden_layers=n,
                intermediate_size=ff,
                max_position_embeddings=t,
                use_parallel_residual=True,
                **common,
            )
        case "phi":
            return AutoConfig.for_model(
                arch,
                hidden_size=d,
                num_attention_heads=h,
                num_hidden_layers=n,
                intermediate_size=ff,
                max_position_embeddings=t,
                **common,
            )
    raise ValueError(f"no tiny config for {arch!r}; known: {', '.join(TINY_ARCHITECTURES)}")


def build_tiny_model(
    arch: str, seed: int = 0, tokenizer: TokenizerKind = "bpe"
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A random-weight ``arch`` model (eval mode, float32) and its tiny tokenizer.

    Weights depend only on ``seed``; the global torch RNG is left as it was. Norm weights and
    biases are perturbed too, so no two modules compute the same function by accident (a test
    that mixes up two LayerNorms must fail).
    """
    tok = build_tiny_tokenizer(tokenizer)
    config = tiny_config(arch, vocab_size=len(tok))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 1:  # norms start at 1/0 and biases at 0: make each one distinct
                    param.add_(0.1 * torch.randn_like(param))
    return model.eval(), tok


def save_tiny_model(
    arch: str, folder: str | Path, seed: int = 0, tokenizer: TokenizerKind = "bpe"
) -> Path:
    """Save a tiny model and its tokenizer with ``save_pretrained``, as a Hub snapshot would be."""
    folder = Path(folder)
    model, tok = build_tiny_model(arch, seed, tokenizer)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
