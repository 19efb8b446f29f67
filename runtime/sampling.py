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
    extra: dict = field(default_factory=dict)


def adjust_ret_logit(logits: np.ndarray, ret_id: int, step: int, p: SamplingParams, allowed: bool) -> None:
    """In place. The reference multiplied the raw logit, making [RET] *less* likely when negative."""
    if not allowed or step < p.min_word_tokens:
        logits[ret_id] = -np.inf
    else:
        logits[ret_id] = abs(logits[ret_id]) * p.ret_scale_factor


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> int:
    if p.temperature <= 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / p.temperature
    if p.top_k and p.top_k < x.size:
        cand = np.argpartition(x, -p.top_k)[-p.top_k:]  # no full-vocabulary sort
    else:
        cand = np.flatnonzero(np.isfinite(x))
    order = cand[np.argsort(-x[cand])]
    probs = np.exp(x[order] - x[order[0]])
    probs /= probs.sum()
    if p.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(order.size, p=probs)])
