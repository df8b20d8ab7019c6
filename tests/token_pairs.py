"""Random token-id pairs for the engine tests: no tokenizer, no program, just shared prefixes."""

from __future__ import annotations

import torch


def random_pairs(
    seed: int, n: int, length: int, diverge: int, vocab: int = 300
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pairs ``[n, length]`` that share tokens before ``diverge`` and differ (at random)
    from there on; ids start at 4 so no special token is drawn."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (n, length), generator=g)
    tgt = src.clone()
    tgt[:, diverge:] = torch.randint(4, vocab, (n, length - diverge), generator=g)
    return src, tgt
