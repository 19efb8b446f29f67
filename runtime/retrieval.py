"""Image retrieval index: a memory-mapped USearch index of normalised image embeddings plus a SQLite
table of paths and captions. Built resumably (a killed build never looks complete); read-only at query time."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm
from usearch.index import BatchMatches, Index, MetricKind, ScalarKind

from .errors import FromageError

EXACT_SEARCH_MAX = 400  # measured crossover (`fromage bench --retrieval N`): exact faster at 300, HNSW at 600
FORMAT, VERSION = "fromage-index", 1
VECTORS, IMAGES, META, STATE = "vectors.usearch", "images.sqlite", "index.json", "build-state.sqlite"


@dataclass
class Hit:
    key: int
    path: str
    caption: str | None
    score: float


class ImageIndex:
    def __init__(self, directory: Path, meta: dict, index: Index, db: sqlite3.Connection):
        self.directory, self.dim, self.count, self.embedder = directory, meta["dim"], meta["count"], meta["embedder"]
        self._index, self._db = index, db
        self._exact = self.count <= EXACT_SEARCH_MAX

    @property
    def exact(self) -> bool:
        """Whether searches are exact (small indexes) or HNSW."""
        return self._exact

    @classmethod
    def open(cls, directory, *, expected_dim: int | None = None, expected_embedder: str | None = None) -> "ImageIndex":
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
        try:
            db = sqlite3.connect(f"{(directory / IMAGES).resolve().as_uri()}?mode=ro", uri=True,
                                 check_same_thread=False)
            rows = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        except sqlite3.Error as e:
            raise FromageError(damaged.format(f"{IMAGES}: {e}")) from None
        if rows != meta["count"]:
            db.close()
            raise FromageError(damaged.format(f"{IMAGES} has {rows} rows, expected {meta['count']}"))
        return cls(directory, meta, index, db)

    def search(self, query: np.ndarray, top_k: int = 1) -> list[Hit]:
        query = np.asarray(query, dtype=np.float32)
        if query.shape != (self.dim,):
            raise FromageError(f"query must have shape ({self.dim},), got {query.shape}")
        return self._hits(self._index.search(query, self._k(top_k), exact=self._exact), 1)[0]

    def search_batch(self, queries: np.ndarray, top_k: int) -> list[list[Hit]]:
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise FromageError(f"queries must have shape (n, {self.dim}), got {queries.shape}")
        if len(queries) == 0:
            return []
        return self._hits(self._index.search(queries, self._k(top_k), exact=self._exact), len(queries))

    def _k(self, top_k: int) -> int:
        if top_k < 1:
            raise FromageError(f"top_k must be at least 1, got {top_k}")
        return min(top_k, self.count)

    def _hits(self, matches, n: int) -> list[list[Hit]]:
        rows = [matches[i] for i in range(n)] if isinstance(matches, BatchMatches) else [matches]
        key_list = list({int(k) for m in rows for k in m.keys})
        found = {}
        for i in range(0, len(key_list), 900):  # one query per 900 keys: old SQLite builds cap parameters at 999
            chunk = key_list[i:i + 900]
            sql = f"SELECT key, path, caption FROM images WHERE key IN ({','.join('?' * len(chunk))})"
            found.update((k, (p, c)) for k, p, c in self._db.execute(sql, chunk))
        # USearch's inner-product distance is 1 - dot, so the score is the cosine for normalised vectors.
        return [[Hit(int(k), *found[int(k)], 1.0 - float(d)) for k, d in zip(m.keys, m.distances)] for m in rows]

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


def _fingerprint(items: list[tuple[str, str | None]], dim: int, embedder: str) -> str:
    blob = json.dumps({"dim": dim, "embedder": embedder, "items": items}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _check(vectors, n: int, dim: int) -> np.ndarray:
    # A wrong shape is a bundle/configuration problem, not a bad image: fail the build rather than skip.
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (n, dim):
        raise FromageError(f"the image encoder returned embeddings of shape {vectors.shape}, expected ({n}, {dim}); "
                           "is the index dim the bundle's retrieval dim?")
    return vectors


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    write(tmp)
    os.replace(tmp, path)


def build_index(items, embed_batch, out_dir, *, dim: int, embedder: str, batch_size: int = 32,
                progress: bool = True, overwrite: bool = False) -> ImageIndex:
    out = Path(out_dir)
    items = [(str(p), None if c is None else str(c)) for p, c in items]
    if not items:
        raise FromageError("no images to index")
    fingerprint = _fingerprint(items, dim, embedder)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FromageError(f"cannot create index directory {out}: {e}") from None
    try:
        old = json.loads((out / META).read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and old.get("complete") is True:
        if overwrite:
            (out / META).unlink()  # from here on the directory no longer counts as a complete index
            (out / STATE).unlink(missing_ok=True)
        elif old.get("items_sha256") == fingerprint:
            (out / STATE).unlink(missing_ok=True)  # left behind if a build was killed right after finishing
            return ImageIndex.open(out, expected_dim=dim, expected_embedder=embedder)
        else:
            raise FromageError(f"{out} already holds an index built from other images or another image encoder; "
                               "choose another directory or rebuild it with --overwrite")

    # Partial state: one row per finished item (vector NULL = skipped bad image), committed per batch,
    # so a killed build resumes where it stopped and never redoes finished batches.
    state = sqlite3.connect(out / STATE)
    try:
        state.execute("CREATE TABLE IF NOT EXISTS meta (fingerprint TEXT NOT NULL)")
        state.execute("CREATE TABLE IF NOT EXISTS done (item INTEGER PRIMARY KEY, vector BLOB)")
        prev = state.execute("SELECT fingerprint FROM meta").fetchone()
        if prev is None or prev[0] != fingerprint:
            if prev is not None:
                print(f"fromage: discarding an unfinished build of other images in {out}", file=sys.stderr)
            state.execute("DELETE FROM done")
            state.execute("DELETE FROM meta")
            state.execute("INSERT INTO meta VALUES (?)", (fingerprint,))
            state.commit()
        finished = {row[0] for row in state.execute("SELECT item FROM done")}
        todo = [i for i in range(len(items)) if i not in finished]
        with tqdm(total=len(items), initial=len(finished), unit="img", desc="indexing images",
                  disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                rows = _embed_or_skip(embed_batch, [items[i][0] for i in batch], batch, dim, bar)
                state.executemany("INSERT INTO done VALUES (?, ?)", rows)
                state.commit()
                bar.update(len(batch))
        _finalize(out, items, state, dim, embedder, fingerprint, progress)
    finally:
        state.close()
    (out / STATE).unlink()
    return ImageIndex.open(out, expected_dim=dim, expected_embedder=embedder)


def _embed_or_skip(embed_batch, paths, ids, dim, bar) -> list[tuple[int, bytes | None]]:
    try:
        vectors = embed_batch(paths)
    except FromageError as e:
        if len(paths) > 1:  # one bad image spoils its batch: retry one by one to find it and keep the rest
            return [row for i, p in zip(ids, paths) for row in _embed_or_skip(embed_batch, [p], [i], dim, bar)]
        bar.write(f"fromage: skipping {paths[0]}: {e}", file=sys.stderr)
        return [(ids[0], None)]
    return [(i, v.tobytes()) for i, v in zip(ids, _check(vectors, len(paths), dim))]


def _finalize(out: Path, items, state: sqlite3.Connection, dim: int, embedder: str, fingerprint: str,
              progress: bool = True) -> None:
    # Keys are renumbered 0..N-1 over the images that embedded, in item order.
    good = [i for (i,) in state.execute("SELECT item FROM done WHERE vector IS NOT NULL ORDER BY item")]
    skipped = len(items) - len(good)
    if not good:
        raise FromageError(f"none of the {len(items)} images could be embedded; nothing to index")
    index = Index(ndim=dim, metric="ip", dtype="f32")
    rows = state.execute("SELECT vector FROM done WHERE vector IS NOT NULL ORDER BY item")
    # the graph build is the slow part of a large index (~13 min for 1M vectors on 2 cores): show it
    with tqdm(total=len(good), desc="building the search graph", unit="vec",
              disable=not progress or len(good) < 50_000) as bar:
        while chunk := rows.fetchmany(8192):  # chunked: a large build never holds two copies of all vectors
            vectors = np.frombuffer(b"".join(v for (v,) in chunk), dtype=np.float32).reshape(len(chunk), dim)
            index.add(np.arange(len(index), len(index) + len(chunk), dtype=np.uint64), vectors)
            bar.update(len(chunk))
    _write_atomic(out / VECTORS, lambda tmp: index.save(tmp))

    def write_images(tmp: Path) -> None:
        db = sqlite3.connect(tmp)
        with db:
            db.execute("CREATE TABLE images (key INTEGER PRIMARY KEY, path TEXT NOT NULL, caption TEXT)")
            db.executemany("INSERT INTO images VALUES (?, ?, ?)",
                           ((key, *items[item]) for key, item in enumerate(good)))
        db.close()
    _write_atomic(out / IMAGES, write_images)

    meta = {"format": FORMAT, "version": VERSION, "dim": dim, "count": len(good), "embedder": embedder,
            "items_sha256": fingerprint, "complete": True}
    # Written last: its presence with complete=true is what makes the directory an index.
    _write_atomic(out / META, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    if skipped:
        print(f"fromage: indexed {len(good)} images, skipped {skipped} that could not be read", file=sys.stderr)
