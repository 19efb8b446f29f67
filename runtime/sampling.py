"""Choosing the next token from the logits of one position (numpy only)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import ParameterError

MAX_SEED = 2**63 - 1
MAX_STOP_STRINGS, MAX_STOP_LENGTH = 8, 256


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    seed: int | None = None
    stop_ids: list[int] | None = None  # None = the bundle's end-of-sequence ids
    min_word_tokens: int = 0          # [RET] is banned for the first N generated tokens
    ret_scale_factor: float = 1.0     # [RET] logit -> |logit| * factor (GILL's fix of the reference)
    retrieval: bool = True            # False: [RET] is never chosen
    top_images: int = 1               # images shown per [RET]
    max_rets: int = 0                 # [RET]s allowed in one generation (0 = no limit); then it is banned
    stop: tuple = ()                  # strings that end the generation (not included in the text)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        """Every value checked here, once, for every caller (CLI, server, library): ParameterError names it."""
        _whole(self, "max_new_tokens", 1)
        _whole(self, "top_k", 0)
        _whole(self, "min_word_tokens", 0)
        _whole(self, "top_images", 1)
        _whole(self, "max_rets", 0)
        _real(self, "temperature", 0.0, math.inf, "a number >= 0 (0 = greedy)")
        _real(self, "top_p", 0.0, 1.0, "a number > 0 and <= 1", open_low=True)
        _real(self, "ret_scale_factor", 0.0, math.inf, "a number >= 0")
        if self.seed is not None:
            _whole(self, "seed", 0, MAX_SEED)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (list, tuple)) or len(self.stop) > MAX_STOP_STRINGS or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in self.stop):
            raise ParameterError("stop", f"must be at most {MAX_STOP_STRINGS} non-empty strings of at most "
                                         f"{MAX_STOP_LENGTH} characters, got {self.stop!r}")
        self.stop = tuple(self.stop)
        if not isinstance(self.retrieval, bool):
            raise ParameterError("retrieval", f"must be true or false, got {self.retrieval!r}")
        if self.stop_ids is not None:
            if not isinstance(self.stop_ids, (list, tuple)) or not all(_is_whole(t, 0) for t in self.stop_ids):
                raise ParameterError("stop_ids", f"must be a list of token ids >= 0, got {self.stop_ids!r}")
            self.stop_ids = [int(t) for t in self.stop_ids]

    def check_vocab(self, vocab_size: int) -> None:
        """The checks that need the model: stop ids within its vocabulary."""
        bad = [t for t in self.stop_ids or [] if t >= vocab_size]
        if bad:
            raise ParameterError("stop_ids", f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")


def _is_whole(v, low: int, high: int | None = None) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= low and (high is None or v <= high)


def _whole(p, name: str, low: int, high: int | None = None) -> None:
    v = getattr(p, name)
    if not _is_whole(v, low, high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ParameterError(name, f"must be a whole number {bound}, got {v!r}")
    setattr(p, name, int(v))


def _real(p, name: str, low: float, high: float, what: str, open_low: bool = False) -> None:
    v = getattr(p, name)
    ok = (isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
          and (v > low if open_low else v >= low) and v <= high)
    if not ok:
        raise ParameterError(name, f"must be {what}, got {v!r}")
    setattr(p, name, float(v))


def adjust_ret_logit(logits: np.ndarray, ret_id: int, step: int, p: SamplingParams, allowed: bool,
                     rets: int = 0) -> None:
    """In place; `rets`: the [RET]s emitted so far. Banned before `min_word_tokens` and after `max_rets`.
    The reference multiplied the raw logit, making [RET] *less* likely when negative."""
    if not allowed or step < p.min_word_tokens or 0 < p.max_rets <= rets:
        logits[ret_id] = -np.inf
    else:
        logits[ret_id] = abs(logits[ret_id]) * p.ret_scale_factor


def top_logits(p: SamplingParams) -> int:
    """How many of the largest logits `sample` reads: 1 greedy; top_k with top-k sampling (top_p then
    applies among those); 0 all of them. An engine may leave the others at -inf (native/head_top.c)."""
    return 1 if p.temperature <= 0 else p.top_k


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator, best: int = -1, exact: int = -1) -> int:
    """Greedy, or temperature sampling restricted to the top-k / top-p nucleus. Never sorts the whole
    vocabulary: top-k partitions, and top-p sorts only the smallest top slice that holds p of the mass.
    The top k are the k largest, ties broken toward the lower token id, in token order: the same draw
    whether the logits outside them are given or left at -inf (top_logits).
    best (>= 0): the column of the largest logit but `exact`'s, which the engine found as it wrote them
    (DecodeState.best; `exact` is [RET]'s, which adjust_ret_logit may have changed since): greedy then compares
    the two, with np.argmax's ties (the lower id), instead of reading the whole row."""
    if p.temperature <= 0:
        if best >= 0:
            b, e = logits[best], logits[exact] if exact >= 0 else -np.inf
            return int(exact) if e > b or (e == b and exact < best) else int(best)
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / p.temperature
    cand = np.flatnonzero(np.isfinite(x))
    if p.top_k and p.top_k < cand.size:
        xc = x[cand]
        kth = np.partition(xc, -p.top_k)[-p.top_k]
        above, tied = cand[xc > kth], cand[xc == kth]
        cand = np.sort(np.concatenate([above, tied[:p.top_k - above.size]]))
    probs = _softmax(x[cand])
    if p.top_p < 1.0:
        n = min(64, cand.size)
        while True:  # grow the slice until it holds top_p of the mass (rarely more than once)
            top = np.argpartition(probs, -n)[-n:] if n < cand.size else np.arange(cand.size)
            top = top[np.argsort(-probs[top])]
            mass = np.cumsum(probs[top])
            if mass[-1] >= p.top_p or n == cand.size:
                keep = int(min(np.searchsorted(mass, p.top_p) + 1, n))
                cand, probs = cand[top[:keep]], probs[top[:keep]] / mass[keep - 1]
                break
            n = min(n * 8, cand.size)
    return int(cand[rng.choice(cand.size, p=probs)])
