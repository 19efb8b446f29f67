"""Retrieval and ranking metrics, shared by training, evaluation and the benchmarks (torch-free).

Ties are broken at random and the expectation reported, so a model that scores everything alike
gets exactly the random-ranking value (never a lucky 100%)."""
from __future__ import annotations

import numpy as np

from .errors import FromageError

KS = (1, 5, 10)


def _greater_ties(scores: np.ndarray, gt: np.ndarray):
    """Per query: how many candidates score strictly higher than the right one, and how many tie it."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise FromageError(f"scores must be (queries, candidates), got shape {scores.shape}")
    gt = np.asarray(gt, dtype=np.int64)
    if gt.shape != (scores.shape[0],) or (gt.size and (gt.min() < 0 or gt.max() >= scores.shape[1])):
        raise FromageError("each query needs the index of its right candidate")
    right = scores[np.arange(len(gt)), gt][:, None]
    return (scores > right).sum(1), (scores == right).sum(1) - 1


def recall_at_k(scores, gt, ks=KS) -> dict:
    """Percent of queries whose right candidate ranks within the top K (ties: expected value under
    a random order among the tied candidates). scores (Q, C), higher is better; gt (Q,) indices."""
    greater, ties = _greater_ties(scores, gt)
    if not len(greater):
        return {f"R@{k}": None for k in ks}
    return {f"R@{k}": float(100 * np.clip((k - greater) / (ties + 1), 0, 1).mean()) for k in ks}


def mean_reciprocal_rank(scores, gt) -> float:
    """Mean of 1/rank (ties: expectation over a random order of the tied candidates)."""
    greater, ties = _greater_ties(scores, gt)
    return float(np.mean([np.mean(1.0 / np.arange(g + 1, g + t + 2)) for g, t in zip(greater, ties)]))


def random_recall(n_candidates: int, ks=KS) -> dict:
    """Expected recall of a uniformly random ranking, in percent: K / N."""
    return {f"R@{k}": 100.0 * min(k, n_candidates) / n_candidates for k in ks}


def random_mrr(n_candidates: int) -> float:
    return float(np.mean(1.0 / np.arange(1, n_candidates + 1)))


def ndcg(scores, relevance) -> float:
    """VisDial's NDCG for one question: DCG of the predicted order over the top k ranks, k = the
    number of options with nonzero relevance, divided by the ideal DCG."""
    scores, relevance = np.asarray(scores, np.float64), np.asarray(relevance, np.float64)
    k = int((relevance != 0).sum())
    if k == 0:
        return 0.0
    discounts = 1.0 / np.log2(np.arange(k) + 2)
    order = np.argsort(-scores, kind="stable")[:k]
    ideal = np.sort(relevance)[::-1][:k]
    return float((relevance[order] * discounts).sum() / (ideal * discounts).sum())
