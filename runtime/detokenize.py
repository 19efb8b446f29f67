"""Incremental detokenization: the text each new token completes, never half a UTF-8 character.

A byte-level BPE tokenizer (the default LM's) is read through a table of each token's bytes (token_bytes: built once
per loaded model, and checked token by token against the tokenizer's own decode): a step appends a token's bytes and
decodes what is pending, touching a few objects. (tokenizers' DecodeStream walks its decoder pipeline for each token: after a
decoding step has streamed the weights through every cache, that is the largest part of the Python between steps.)
Any other `tokenizers.Tokenizer` uses DecodeStream; another tokenizer (anything with decode(ids,
skip_special_tokens)) decodes, each step, only the tokens since the last emitted piece, with that piece as context (a
tokenizer may render a token differently at the start of a text), so a step costs the same however long the answer
grows."""
from __future__ import annotations

import json
import re

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# the decoders whose output is the concatenation of each token's bytes (the default LM's pipeline is all four)
_BYTEWISE = {"ByteLevel", "ByteFallback", "Fuse"}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte in a byte-level vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def _steps(decoder: dict | None) -> list | None:
    """A tokenizer.json decoder's steps where it turns each token into bytes on its own (byte-level, with byte
    fallback and "▁" -> " " at most), else None."""
    steps = (decoder or {}).get("decoders", [decoder]) if (decoder or {}).get("type") == "Sequence" else [decoder]
    types = [s.get("type") if s else None for s in steps]
    bytewise = all(t in _BYTEWISE or (t == "Replace" and s.get("pattern") == {"String": "▁"} and s.get("content") == " ")
                   for t, s in zip(types, steps))
    return types if bytewise and "ByteLevel" in types else None


def token_bytes(tok: Tokenizer) -> list[bytes] | None:
    """Each token's bytes as the tokenizer's decode(skip_special_tokens=True) joins them, or None when its decoder is
    not byte-wise or any token decodes otherwise than its table entry (then DecodeStream is used)."""
    table = None
    if steps := _steps(json.loads(tok.decoder.__getstate__()) if tok.decoder is not None else None):
        chars, special = _byte_of_char(), {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        alphabet, to_bytes = set(chars), str.maketrans({c: chr(b) for c, b in chars.items()})
        table = []
        for i in range(tok.get_vocab_size(with_added_tokens=True)):
            piece = tok.id_to_token(i)
            if piece is None or piece in special:
                table.append(b"")
            elif "ByteFallback" in steps and (m := _BYTE_TOKEN.fullmatch(piece)):
                table.append(bytes([int(m.group(1), 16)]))
            else:
                piece = piece.replace("▁", " ")
                table.append(piece.translate(to_bytes).encode("latin-1") if alphabet.issuperset(piece) else piece.encode())
        decoded = tok.decode_batch([[i] for i in range(len(table))], skip_special_tokens=True)
        if any(b.decode("utf-8", "replace") != d for b, d in zip(table, decoded)):
            table = None
    return table


class TextStream:
    """push(token id) -> the text it completes ("" while a character is unfinished). table: the tokenizer's
    token_bytes, or None (DecodeStream, or the decode of another tokenizer)."""

    def __init__(self, tokenizer, table: list[bytes] | None = None):
        self.tok, self.table = tokenizer, table
        self.reset()

    def push(self, token_id: int) -> str:
        if self.table is not None:
            self.pending += self.table[token_id]
            text = self.pending.decode("utf-8", "replace")
            if text.endswith("\ufffd"):  # an unfinished character (DecodeStream's rule: it waits too)
                return ""
            self.pending.clear()
            return text
        if self.stream is not None:
            return self.stream.step(self.tok, token_id) or ""
        self.ids.append(token_id)
        shown = self.tok.decode(self.ids[self.context:self.read], skip_special_tokens=True)
        text = self.tok.decode(self.ids[self.context:], skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(shown) or len(text) == len(shown):
            return ""
        self.context, self.read = self.read, len(self.ids)
        return text[len(shown):]

    def reset(self):
        self.pending = bytearray()
        self.stream = DecodeStream(skip_special_tokens=True) if self.table is None and isinstance(self.tok, Tokenizer) \
            else None
        self.ids, self.context, self.read = [], 0, 0  # ids[context:read]: the last emitted piece
