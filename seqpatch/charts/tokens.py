"""Token labels a reader can read: byte-level BPE pieces decoded, whitespace made visible.

Stored rows keep the tokenizer's own pieces (``Ġhelpful``, ``Ċ``: GPT-2-style byte-level BPE
writes each byte as a printable character; SentencePiece writes a space as ``▁``). Charts show
the text each piece stands for, with marks for what would otherwise be invisible: a space is
``·``, a newline ``↵``, a tab ``⇥``. A piece that is not byte-level (the organism's characters,
special tokens such as ``<|im_start|>``) is shown as it is.
"""

from __future__ import annotations

from functools import cache

SPACE, NEWLINE, TAB = "·", "↵", "⇥"
MARKS = {" ": SPACE, "▁": SPACE, "\n": NEWLINE, "\r": "⏎", "\t": TAB}


@cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` inverted: the printable character → the byte it encodes."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def decode_piece(piece: str) -> str:
    """The text a tokenizer piece stands for: byte-level pieces decoded (``Ġhelpful`` →
    `` helpful``, ``Ċ`` → ``\\n``), SentencePiece's ``▁`` kept for ``display_token`` to mark.

    A piece is decoded only if every character is one of the 256 byte characters and the bytes
    are valid UTF-8 (ASCII decodes to itself); any other piece (``▁word``, ``café`` from a
    SentencePiece vocabulary, ``<|im_start|>`` decodes to itself) is returned unchanged.
    """
    table = _byte_of_char()
    if not all(c in table for c in piece):
        return piece
    try:
        return bytes(table[c] for c in piece).decode("utf-8")
    except UnicodeDecodeError:
        return piece


def display_token(piece: str) -> str:
    """``decode_piece`` with whitespace made visible: ``Ġare`` → ``·are``, ``Ċ`` → ``↵``,
    ``Ġ`` → ``·``, ``▁x`` → ``·x``; an empty piece is shown as ``∅``."""
    text = decode_piece(piece)
    shown = "".join(MARKS.get(c, c) for c in text)
    return shown or "∅"
