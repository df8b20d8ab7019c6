"""Measure greedy accuracy of a pretrained model under several prompt settings.

Reproduces the numbers behind the default prompt formats of the pretrained registry
(``seqpatch.models.pretrained``): for each (format, shots, family, length) it samples programs,
renders them, generates greedily (up to 6 tokens, cut at the first newline) and reads the integer
back with the format's parser, like the benchmark stage does.

    OMP_NUM_THREADS=2 python scripts/pretrained_prompts.py smollm2-135m-instruct \
        --formats code,code-chat --shots 0,3 --lengths 2,4,6 --n 20
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from seqpatch.models import load_model, pad_left
from seqpatch.programs import get_family
from seqpatch.prompts import get_prompt_format


def accuracy(handle, fmt, family: str, seq_len: int, n: int, seed: int) -> float:
    rng = random.Random(f"{seed}-{family}-{seq_len}")
    programs = [get_family(family).sample(seq_len, rng) for _ in range(n)]
    tok = handle.tokenizer
    correct = 0
    for start in range(0, n, 10):
        chunk = programs[start : start + 10]
        ids = [list(tok(fmt.prompt(p))["input_ids"]) for p in chunk]
        batch = pad_left(tok, ids)
        with torch.no_grad():
            out = handle.hf_model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        for program, row in zip(chunk, out[:, batch["input_ids"].shape[1] :].tolist(), strict=True):
            text = tok.decode(row, skip_special_tokens=True).split("\n", 1)[0]
            correct += fmt.parse_prediction(text) == program.answer
    return correct / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--formats", default="code,code-chat")
    parser.add_argument("--shots", default="0,3")
    parser.add_argument("--families", default="arithmetic,binding")
    parser.add_argument("--lengths", default="2,4,6")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    handle = load_model(args.model)
    print("format\tshots\tfamily\tlen\taccuracy\tseconds", flush=True)
    for name in args.formats.split(","):
        for shots in map(int, args.shots.split(",")):
            fmt = get_prompt_format(name, n_shots=shots)
            if getattr(fmt, "chat", False):
                fmt = fmt.with_tokenizer(handle.tokenizer)
            for family in args.families.split(","):
                for seq_len in map(int, args.lengths.split(",")):
                    t = time.perf_counter()
                    acc = accuracy(handle, fmt, family, seq_len, args.n, args.seed)
                    took = time.perf_counter() - t
                    print(
                        f"{name}\t{shots}\t{family}\t{seq_len}\t{acc:.2f}\t{took:.0f}", flush=True
                    )


if __name__ == "__main__":
    main()
