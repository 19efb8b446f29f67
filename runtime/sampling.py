"""Choosing the next token from the logits of one position (numpy only)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
    extra: dict = field(default_factory=dict)


def adjust_ret_logit(logits: np.ndarray, ret_id: int, step: int, p: SamplingParams, allowed: bool,
                     rets: int = 0) -> None:
    """In place; `rets`: the [RET]s emitted so far. Banned before `min_word_tokens` and after `max_rets`.
    The reference multiplied the raw logit, making [RET] *less* likely when negative."""
    if not allowed or step < p.min_word_tokens or 0 < p.max_rets <= rets:
        logits[ret_id] = -np.inf
    else:
        logits[ret_id] = abs(logits[ret_id]) * p.ret_scale_factor


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> int:
    """Greedy, or temperature sampling restricted to the top-k / top-p nucleus. Never sorts the whole
    vocabulary: top-k partitions, and top-p sorts only the smallest top slice that holds p of the mass."""
    if p.temperature <= 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / p.temperature
    cand = np.flatnonzero(np.isfinite(x))
    if p.top_k and p.top_k < cand.size:
        cand = cand[np.argpartition(x[cand], -p.top_k)[-p.top_k:]]
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
