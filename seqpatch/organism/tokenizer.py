"""The organism's tokenizer: one token per character of a rendered program.

Why character-level: in the ``compact`` rendering (``a=5;b=a;#b:``) every variable name, digit
and operator character is then its own token, so an answer digit is always exactly one token,
statements of one family have a fixed token length (which counterfactual pairs rely on), and a
patching position maps to exactly one character of the program.

Contract:

- vocabulary: the specials ``<pad> <bos> <eos> <unk>`` (ids 0-3, in that order), then
  ``a``-``z``, ``0``-``9``, the punctuation of every family's renderings
  (``= ; # : + - * / % ( ) , .``), space and newline; any other character becomes ``<unk>``;
- ``tokenizer(text)`` prepends ``<bos>`` (a post-processor), never appends ``<eos>``;
- ``tokenizer.decode(ids, skip_special_tokens=True)`` gives back the text exactly (no spaces
  are inserted between tokens);
- it is saved and loaded as ``PreTrainedTokenizerFast`` (``AutoTokenizer`` on a llama folder
  would also work, but on other architectures it can silently swap in a byte-level tokenizer);
- padding is on the left, as the pipeline's batched runs expect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
}
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
PUNCTUATION = "=;#:+-*/%(),."
WHITESPACE = " \n"
CHARACTERS: tuple[str, ...] = (*LETTERS, *DIGITS, *PUNCTUATION, *WHITESPACE)
VOCAB: tuple[str, ...] = (*SPECIAL_TOKENS.values(), *CHARACTERS)
MODEL_MAX_LENGTH = 512  # the organism's max_position_embeddings; far above 2x the trained length


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh character-level tokenizer (deterministic; nothing is trained or downloaded)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )
    return tokenizer
