"""How an interleaved prompt becomes a sequence: shared by training, the PyTorch reference and
the runtime, so all three place tokens and images identically.

Layout: the tokenizer's prefix tokens (BOS, if it adds one), then the parts in order; each
text part is tokenized without special tokens, each image becomes k visual-token slots.
"""
from __future__ import annotations

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


def to_segments(parts: list[Part], tokenizer, prefix: list[int]) -> list[Segment]:
    """Parts -> segments; adjacent token runs are merged. `tokenizer` is a `tokenizers.Tokenizer`."""
    if not parts:
        raise FromageError("the prompt is empty: give at least one text or image")
    segments: list[Segment] = [list(prefix)] if prefix else []
    for part in parts:
        if isinstance(part, ImagePart):
            segments.append(part)
            continue
        if not isinstance(part, str):
            raise FromageError(f"a prompt part must be text or an image, not {type(part).__name__}")
        ids = tokenizer.encode(part, add_special_tokens=False).ids
        if segments and isinstance(segments[-1], list):
            segments[-1] = segments[-1] + ids
        else:
            segments.append(list(ids))
    return [s for s in segments if not (isinstance(s, list) and not s)]


def sequence_length(segments: list[Segment], k: int) -> int:
    return sum(k if isinstance(s, ImagePart) else len(s) for s in segments)
