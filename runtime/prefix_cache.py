"""Prompts already computed, kept so that a prompt starting the same way is fed only from where the two
part (what vLLM calls automatic prefix caching and llama-server `cache_prompt`). A chat re-sends its
whole history every turn, and requests share system prompts and instructions: their positions are
copied, not computed again.

A position's keys and values depend only on the positions before it, and the native engine computes
each row the same whatever else is in the call: a request's outputs are the same bits with or without
a hit. Prompts are compared as their input embeddings, so an image matches by its visual tokens.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .generate import DecodeState, Fromage

MIN_SHARED = 8  # a hit shorter than this is not worth a copy (every chat prompt shares its opening "Q: ")


@dataclass(eq=False)
class _Entry:
    embeds: np.ndarray        # (n, E) the prompt
    fingerprints: np.ndarray  # (n,) one integer per row, to find the shared rows without comparing floats
    state: DecodeState        # its first n positions

    @property
    def nbytes(self) -> int:
        return self.embeds.nbytes + sum(c.nbytes for c in self.state.cache)


@functools.lru_cache(maxsize=4)
def _print_weights(width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(1, 2**63, size=width, dtype=np.uint64) | np.uint64(1)


def fingerprints(embeds: np.ndarray) -> np.ndarray:
    """(n, E) float32 -> (n,) uint64: a fixed random combination of each row's bits, so equal rows have
    equal prints (integer sums wrap, exactly)."""
    rows = np.ascontiguousarray(embeds, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return (rows * _print_weights(rows.shape[1])).sum(axis=1, dtype=np.uint64)


def shared_rows(a: np.ndarray, b: np.ndarray) -> int:
    """The number of leading equal entries of two 1-d arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """The most recently used prompts' caches, up to max_bytes in all. Used by one thread (the scheduler's)."""

    def __init__(self, model: Fromage, max_bytes: int):
        self.model, self.max_bytes = model, max_bytes
        self.entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self.bytes = 0
        self._next = 0

    def start(self, embeds: np.ndarray) -> tuple[DecodeState, int]:
        """A state for the prompt (n, E) holding its longest cached prefix, and that prefix's length (at
        most n - 1: the last position is fed, to give the first logits)."""
        prints, best, shared = fingerprints(embeds), None, 0
        for key, entry in self.entries.items():
            m = min(shared_rows(entry.fingerprints, prints), len(embeds) - 1)
            if m > shared:
                best, shared = key, m
        if best is None or shared < MIN_SHARED:
            return self.model.new_state(), 0
        entry = self.entries[best]
        # prints that agree on rows that differ: as good as impossible, but a wrong hit must never happen
        differ = np.flatnonzero(np.any(entry.embeds[:shared] != embeds[:shared], axis=1))
        shared = int(differ[0]) if len(differ) else shared
        if shared < MIN_SHARED:
            return self.model.new_state(), 0
        self.entries.move_to_end(best)
        return self.model.prefix_state(entry.state, shared), shared

    def store(self, embeds: np.ndarray, state: DecodeState) -> None:
        """Keep the positions (n, E) just fed to `state`: a copy of their part of its cache (numpy's memory; the
        cache itself goes on decoding, or back to be reused). A cached prompt that this one extends is dropped:
        every prompt that shares it shares this one."""
        n = len(embeds)
        position_bytes = embeds[0].nbytes + sum(c.nbytes // max(1, c.shape[2]) for c in state.cache)
        if n < MIN_SHARED or n * position_bytes > self.max_bytes:  # checked before a copy that would be dropped
            return
        kept = self.model.prefix_state(state, n, decoding=False)
        entry = _Entry(np.array(embeds, dtype=np.float32), fingerprints(embeds), kept)
        if entry.nbytes > self.max_bytes:  # with the capacity beyond n that it keeps
            return
        for key, old in list(self.entries.items()):
            m = shared_rows(old.fingerprints, entry.fingerprints)
            if m == len(old.embeds):   # this prompt extends it (or is it again)
                self._drop(key)
            elif m == n:               # a longer prompt already holds all of this one
                return
        self.entries[self._next] = entry
        self._next += 1
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: int) -> None:
        self.bytes -= self.entries.pop(key).nbytes
