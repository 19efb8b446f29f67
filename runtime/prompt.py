"""How an interleaved prompt becomes a sequence: shared by training, the PyTorch reference and
the runtime, so all three place tokens and images identically.

Layout: the tokenizer's prefix tokens (BOS, if it adds one), then the parts in order; each
text part is tokenized without special tokens, each image becomes k visual-token slots.

Text is text: a text part never yields a control token. A part whose plain tokenization contains an
added token (BOS/EOS/unk, [RET], <|im_start|>, any token the tokenizer matches before its model) is
tokenized again by a copy of the tokenizer without added tokens, so "[RET]" typed by a user is the
characters [, RET, ]; only the runtime places control tokens. Text without them tokenizes exactly as
before. Limits: MAX_TEXT_CHARS characters of text per prompt; text must be valid UTF-8 (no lone
surrogates, as sys.argv can hold).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .errors import FromageError


@dataclass(frozen=True)
class ImagePart:
    source: Union[str, Path, bytes]  # a path, or encoded image bytes


Part = Union[str, ImagePart]
Segment = Union[list, ImagePart]  # token ids, or an image


def special_prefix(tokenizer) -> list[int]:
    """The ids a tokenizer puts before text when asked for special tokens (e.g. BOS)."""
    full = tokenizer.encode("x", add_special_tokens=True).ids
    plain = tokenizer.encode("x", add_special_tokens=False).ids
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i]
    return []


def query_text(template: str, text: str) -> str:
    """A text query written in a bundle's query template ("{}" = the text, its final period dropped so
    "A cat." and "a cat" read alike: "A picture of a cat. In one word, ..."). Training writes captions so too."""
    return template.replace("{}", text.strip().removesuffix(".").rstrip()) if template != "{}" else text


MAX_TEXT_CHARS = 1_000_000  # characters of text in one prompt (the context bounds the tokens later)

@functools.lru_cache(maxsize=16)  # a Tokenizer hashes by identity
def _plain(tokenizer) -> tuple:
    """(the tokenizer's copy without added tokens, the added tokens' ids -> text, the unknown token's id)"""
    from tokenizers import Tokenizer
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = []
    plain = Tokenizer.from_str(json.dumps(spec))
    added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
    unk = (spec.get("model") or {}).get("unk_token")
    return plain, added, plain.token_to_id(unk) if isinstance(unk, str) else None


def encode_text(tokenizer, text: str) -> list[int]:
    """User text -> token ids, never an added/special token id (see the module docstring)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FromageError(f"text is not valid UTF-8: character {e.start} is {text[e.start]!r} "
                           f"({e.reason})") from None
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    plain, added, unk_id = _plain(tokenizer)
    if not any(i in added for i in ids):
        return ids  # the fast path: exactly the tokenizer's own ids
    enc = plain.encode(text, add_special_tokens=False)
    if not any(i in added for i in enc.ids):
        return enc.ids
    # the model itself spells an added token (a vocabulary entry such as "<s>", or unk): tokenize
    # the characters of each such token one by one; a character the model does not know stays its unk
    out = []
    for i, (start, end) in zip(enc.ids, enc.offsets):
        if i not in added:
            out.append(i)
            continue
        for ch in text[start:end]:
            sub = plain.encode(ch, add_special_tokens=False).ids
            bad = [j for j in sub if j in added and not (j == unk_id and len(sub) == 1)]
            if bad:
                raise FromageError(f"text cannot be tokenized as plain text: {text[start:end]!r} gives "
                                   f"the control token {added[bad[0]]!r}")
            out += sub
    return out


def to_segments(parts: list[Part], tokenizer, prefix: list[int]) -> list[Segment]:
    """Parts -> segments; adjacent token runs are merged. `tokenizer` is a `tokenizers.Tokenizer`."""
    if not parts:
        raise FromageError("the prompt is empty: give at least one text or image")
    segments: list[Segment] = [list(prefix)] if prefix else []
    chars = 0
    for part in parts:
        if isinstance(part, ImagePart):
            segments.append(part)
            continue
        if not isinstance(part, str):
            raise FromageError(f"a prompt part must be text or an image, not {type(part).__name__}")
        chars += len(part)
        if chars > MAX_TEXT_CHARS:
            raise FromageError(f"the prompt's text is too long: over {MAX_TEXT_CHARS} characters")
        ids = encode_text(tokenizer, part)
        if segments and isinstance(segments[-1], list):
            segments[-1] = segments[-1] + ids
        else:
            segments.append(list(ids))
    return [s for s in segments if not (isinstance(s, list) and not s)]


def sequence_length(segments: list[Segment], k: int) -> int:
    return sum(k if isinstance(s, ImagePart) else len(s) for s in segments)
