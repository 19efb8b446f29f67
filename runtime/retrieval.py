"""Image retrieval index: a memory-mapped USearch index of normalised image embeddings plus a SQLite
table of paths and captions, read-only at query time (index_build.py writes it)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from usearch.index import BatchMatches, Index, MetricKind, ScalarKind

from .errors import FromageError
from .files import sha256_file

# Up to this many images every search is exact (complete by construction; under half a millisecond per
# query, README "Retrieval"). Above it HNSW, whose graph every build checks (index_build.check_graph).
EXACT_SEARCH_MAX = 10_000
VERIFY_MAX_BYTES = 256 << 20  # open() checks the vectors file's sha256 up to this size (`fromage index check`: any)
FORMAT, VERSION = "fromage-index", 1
VECTORS, IMAGES, META, STATE = "vectors.usearch", "images.sqlite", "index.json", "build-state.sqlite"


def read_meta(directory) -> dict:
    """The index.json of a finished index in `directory`, checked (FromageError naming the fix otherwise)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FromageError(f"no index at {directory}; build one with `fromage index build`")
    meta_path = directory / META
    if not meta_path.exists():
        if (directory / STATE).exists():
            raise FromageError(f"the index at {directory} is incomplete (its build was interrupted); "
                               "rerun `fromage index build` with the same images to finish it")
        raise FromageError(f"no index at {directory} (no {META}); build one with `fromage index build`")
    try:
        meta = json.loads(meta_path.read_text())
        ok = (meta["format"] == FORMAT and isinstance(meta["dim"], int) and isinstance(meta["count"], int)
              and isinstance(meta["embedder"], str))
    except (OSError, ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise FromageError(f"{meta_path} is damaged or not a fromage index; rebuild with `fromage index build`")
    if meta.get("version") != VERSION:
        raise FromageError(f"{directory} holds index format version {meta.get('version')}, this runtime reads "
                           f"version {VERSION}; rebuild it with `fromage index build`")
    if meta.get("complete") is not True:
        raise FromageError(f"the index at {directory} is incomplete; rerun `fromage index build` to finish it")
    return meta


@dataclass
class Hit:
    key: int
    path: str
    caption: str | None
    score: float


class ImageIndex:
    def __init__(self, directory: Path, meta: dict, index: Index, db: sqlite3.Connection,
                 side_vectors: np.ndarray | None = None, exact: bool | None = None):
        self.directory, self.dim, self.count, self.embedder = directory, meta["dim"], meta["count"], meta["embedder"]
        self._index, self._db = index, db
        self._exact = self.count <= EXACT_SEARCH_MAX if exact is None else exact
        # Keys the HNSW graph cannot reach (found by the build's check): searched exactly beside the graph.
        self._side_keys = np.asarray(meta.get("unreachable", []), dtype=np.int64)
        self._side_vectors = side_vectors if side_vectors is not None else np.zeros((0, self.dim), np.float32)

    @property
    def exact(self) -> bool:
        """Whether searches are exact (small indexes) or HNSW."""
        return self._exact

    @classmethod
    def open(cls, directory, *, expected_dim: int | None = None, expected_embedder: str | None = None,
             exact: bool | None = None) -> "ImageIndex":
        """Open a finished index (exact=None: exact search up to EXACT_SEARCH_MAX images, HNSW above)."""
        directory = Path(directory)
        meta = read_meta(directory)
        if expected_dim is not None and meta["dim"] != expected_dim:
            raise FromageError(f"the index at {directory} holds {meta['dim']}-dim embeddings but the model retrieves "
                               f"with {expected_dim} dims; rebuild the index with this bundle")
        if expected_embedder is not None and meta["embedder"] != expected_embedder:
            raise FromageError(f"the index at {directory} was built with another bundle's image encoder "
                               f"({meta['embedder'][:16]}…, this bundle has {expected_embedder[:16]}…); "
                               "rebuild it with `fromage index build` and this bundle")
        damaged = f"the index at {directory} is damaged ({{}}); rebuild it with `fromage index build`"
        for name in (VECTORS, IMAGES):
            if not (directory / name).is_file():
                raise FromageError(damaged.format(f"{name} is missing"))
        try:  # view=True memory-maps the file: opening is instant and pages are shared between processes
            index = Index.restore(directory / VECTORS, view=True)
        except (RuntimeError, ValueError) as e:
            raise FromageError(damaged.format(f"{VECTORS}: {e}")) from None
        if (index is None or index.ndim != meta["dim"] or len(index) != meta["count"]
                or index.metric != MetricKind.IP or index.dtype != ScalarKind.F32):
            raise FromageError(damaged.format(f"{VECTORS} does not match {META}"))
        recorded = meta.get("vectors_sha256")
        if isinstance(recorded, str) and (directory / VECTORS).stat().st_size <= VERIFY_MAX_BYTES:
            if sha256_file(directory / VECTORS) != recorded:
                raise FromageError(damaged.format(f"{VECTORS} has changed since it was built (its sha256 differs "
                                                  f"from the one in {META})"))
        side = meta.get("unreachable", [])
        if not (isinstance(side, list) and all(type(k) is int and 0 <= k < meta["count"] for k in side)):
            raise FromageError(damaged.format(f"{META}: 'unreachable' is not a list of keys"))
        side_vectors = np.asarray(index.get(np.asarray(side, dtype=np.uint64)), np.float32).reshape(-1, meta["dim"])
        if not np.isfinite(side_vectors).all():
            raise FromageError(damaged.format(f"{VECTORS} holds non-finite values"))
        try:
            db = sqlite3.connect(f"{(directory / IMAGES).resolve().as_uri()}?mode=ro", uri=True,
                                 check_same_thread=False)
            rows = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        except sqlite3.Error as e:
            raise FromageError(damaged.format(f"{IMAGES}: {e}")) from None
        if rows != meta["count"]:
            db.close()
            raise FromageError(damaged.format(f"{IMAGES} has {rows} rows, expected {meta['count']}"))
        return cls(directory, meta, index, db, side_vectors, exact)

    def search(self, query: np.ndarray, top_k: int = 1) -> list[Hit]:
        query = np.asarray(query, dtype=np.float32)
        if query.shape != (self.dim,):
            raise FromageError(f"query must have shape ({self.dim},), got {query.shape}")
        return self.search_batch(query[None], top_k)[0]

    def search_batch(self, queries: np.ndarray, top_k: int) -> list[list[Hit]]:
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise FromageError(f"queries must have shape (n, {self.dim}), got {queries.shape}")
        if len(queries) == 0:
            return []
        return self._hits(self.search_keys(queries, self._k(top_k)))

    def search_keys(self, queries: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """-> per query (keys, scores), best first: the search every query runs (exact, or HNSW plus an exact
        pass over the keys the graph cannot reach). A non-finite query or score is an error, never a hit."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not np.isfinite(queries).all():
            raise FromageError("the query embedding holds NaN or infinite values; nothing can be retrieved with it")
        k = min(k, self.count)
        matches = self._index.search(queries, k, exact=self._exact)
        rows = [matches[i] for i in range(len(queries))] if isinstance(matches, BatchMatches) else [matches]
        # USearch's inner-product distance is 1 - dot, so the score is the cosine for normalised vectors.
        out = [(np.asarray(m.keys, dtype=np.int64), 1.0 - np.asarray(m.distances, dtype=np.float64)) for m in rows]
        if not self._exact and len(self._side_keys):
            side = (queries @ self._side_vectors.T).astype(np.float64)
            merged = []
            for (keys, scores), extra in zip(out, side):
                keys = np.concatenate([keys, self._side_keys])
                scores = np.concatenate([scores, extra])
                keys, first = np.unique(keys, return_index=True)  # a key both ways: once
                scores = scores[first]
                order = np.argsort(-scores, kind="stable")[:k]
                merged.append((keys[order], scores[order]))
            out = merged
        if any(not np.isfinite(scores).all() for _, scores in out):
            raise FromageError(f"the index at {self.directory} is damaged (a stored vector is not finite); "
                               f"run `fromage index check {self.directory}` and rebuild it with `fromage index build`")
        return out

    def _k(self, top_k: int) -> int:
        if top_k < 1:
            raise FromageError(f"top_k must be at least 1, got {top_k}")
        return min(top_k, self.count)

    def _hits(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> list[list[Hit]]:
        key_list = list({int(k) for keys, _ in rows for k in keys})
        found = {}
        for i in range(0, len(key_list), 900):  # one query per 900 keys: old SQLite builds cap parameters at 999
            chunk = key_list[i:i + 900]
            sql = f"SELECT key, path, caption FROM images WHERE key IN ({','.join('?' * len(chunk))})"
            found.update((k, (p, c)) for k, p, c in self._db.execute(sql, chunk))
        return [[Hit(int(k), *found[int(k)], float(s)) for k, s in zip(keys, scores)] for keys, scores in rows]

    def get(self, key: int) -> tuple[str, str | None] | None:
        """(path, caption) of the image stored under `key`, or None."""
        row = self._db.execute("SELECT path, caption FROM images WHERE key = ?", (int(key),)).fetchone()
        return (row[0], row[1]) if row else None

    def first_path(self) -> str | None:
        """The path of the image with the smallest key (the first indexed), if any."""
        row = self._db.execute("SELECT path FROM images ORDER BY key LIMIT 1").fetchone()
        return row[0] if row else None

    def close(self):
        if self._db is not None:
            self._db.close()
        self._index = self._db = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
