"""Measure greedy accuracy of a pretrained model under several prompt formats, per family.

Reproduces the table behind the per-family default prompt formats of the pretrained registry
(``seqpatch.models.pretrained``, ``docs/pretrained.md``): for each (format, family, length) it
samples programs, renders them, generates greedily (up to 6 tokens, cut at the first newline)
and reads the integer back with the format's parser, like the benchmark stage does. Besides
accuracy it reports how often the most common prediction was given (``top``): a format that
answers one constant to ≥ 90% of a family's programs is degenerate there, whatever its accuracy,
and cannot be a default. The chosen format of a family is the one with the highest mean accuracy
over the lengths among the non-degenerate ones (ties: the earlier format listed).

    OMP_NUM_THREADS=2 python scripts/pretrained_prompts.py smollm2-135m-instruct \
        --formats code,code-1shot,code-3shot,code-chat,code-chat-1shot --lengths 1,3,5 --n 20
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter

import torch

from seqpatch.models import load_model, pad_left
from seqpatch.programs import get_family
from seqpatch.prompts import bind_tokenizer, get_prompt_format

DEGENERATE_SHARE = 0.9  # one answer to this share of a family's programs: a degenerate prompt


def predictions(handle, fmt, family: str, seq_len: int, n: int, seed: int) -> list[tuple]:
    """``(answer, prediction)`` for ``n`` programs of ``family`` at ``seq_len`` (greedy)."""
    rng = random.Random(f"{seed}-{family}-{seq_len}")
    programs = [get_family(family).sample(seq_len, rng) for _ in range(n)]
    tok = handle.tokenizer
    out = []
    for start in range(0, n, 10):
        chunk = programs[start : start + 10]
        ids = [list(tok(fmt.prompt(p))["input_ids"]) for p in chunk]
        batch = pad_left(tok, ids)
        with torch.no_grad():
            generated = handle.hf_model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        rows = generated[:, batch["input_ids"].shape[1] :].tolist()
        for program, row in zip(chunk, rows, strict=True):
            text = tok.decode(row, skip_special_tokens=True).split("\n", 1)[0]
            out.append((program.answer, fmt.parse_prediction(text)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--formats", default="code,code-1shot,code-3shot,code-chat")
    parser.add_argument("--families", default="arithmetic,binding,modular")
    parser.add_argument("--lengths", default="1,3,5")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    handle = load_model(args.model)
    families = args.families.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    formats = args.formats.split(",")
    print("format\tfamily\tlen\tn\taccuracy\ttop_answer\ttop_share\tseconds", flush=True)
    table: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for name in formats:
        fmt = bind_tokenizer(get_prompt_format(name), handle.tokenizer)
        for family in families:
            for seq_len in lengths:
                t = time.perf_counter()
                pairs = predictions(handle, fmt, family, seq_len, args.n, args.seed)
                took = time.perf_counter() - t
                acc = sum(a == p for a, p in pairs) / len(pairs)
                top, count = Counter(p for _, p in pairs).most_common(1)[0]
                share = count / len(pairs)
                table.setdefault((name, family), []).append((acc, share))
                print(
                    f"{name}\t{family}\t{seq_len}\t{len(pairs)}\t{acc:.2f}\t{top}\t{share:.2f}\t"
                    f"{took:.0f}",
                    flush=True,
                )
    lens = ", ".join(map(str, lengths))
    print(f"\n| format | {' | '.join(families)} |")
    print(f"|---|{'---|' * len(families)}")
    for name in formats:
        cells = []
        for family in families:
            rows = table[(name, family)]
            acc = sum(a for a, _ in rows) / len(rows)
            share = max(s for _, s in rows)
            flag = " (degenerate)" if share >= DEGENERATE_SHARE else ""
            cells.append(f"{acc:.2f} / {share:.2f}{flag}")
        print(f"| {name} | {' | '.join(cells)} |")
    print(f"\n(mean accuracy over lengths {lens} / largest share of one answer; n={args.n} each)")
    for family in families:
        ok = [
            (sum(a for a, _ in table[(f, family)]) / len(lengths), -i, f)
            for i, f in enumerate(formats)
            if max(s for _, s in table[(f, family)]) < DEGENERATE_SHARE
        ]
        best = max(ok)[2] if ok else "none (every format is degenerate)"
        print(f"chosen for {family}: {best}")


if __name__ == "__main__":
    main()
