"""Building an image index: embed a folder or TSV of images with a bundle's vision graph, resumably
(a killed build never looks complete and resumes where it stopped)."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm
from usearch.index import Index

from fromage.engines.onnxruntime import open_session

from .errors import FromageError
from .files import write_atomic
from .preprocess import preprocess
from .retrieval import IMAGES, META, STATE, VECTORS, FORMAT, VERSION, ImageIndex
from .sources import list_images


def index_images(bundle, source, out, *, image_dir=None, batch_size: int = 32, overwrite: bool = False,
                 threads: int | None = None):
    """Embed the images of `source` (a folder or a TSV) with a loaded bundle's vision graph into an
    index at `out` (resuming an unfinished build). -> ImageIndex"""
    vision = open_session(bundle.graph_path("vision"), threads=threads)
    pp = bundle.preprocessing

    def embed(paths):
        return vision.run({"pixel_values": preprocess(paths, pp)}, ["image_embedding"])[0]
    return build_index(list_images(source, image_dir), embed, out, dim=bundle.model["retrieval_dim"],
                       embedder=bundle.vision_fingerprint, batch_size=batch_size, overwrite=overwrite)


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
    write_atomic(out / VECTORS, lambda tmp: index.save(tmp))

    def write_images(tmp: Path) -> None:
        db = sqlite3.connect(tmp)
        with db:
            db.execute("CREATE TABLE images (key INTEGER PRIMARY KEY, path TEXT NOT NULL, caption TEXT)")
            db.executemany("INSERT INTO images VALUES (?, ?, ?)",
                           ((key, *items[item]) for key, item in enumerate(good)))
        db.close()
    write_atomic(out / IMAGES, write_images)

    meta = {"format": FORMAT, "version": VERSION, "dim": dim, "count": len(good), "embedder": embedder,
            "items_sha256": fingerprint, "complete": True}
    # Written last: its presence with complete=true is what makes the directory an index.
    write_atomic(out / META, json.dumps(meta, indent=1))
    if skipped:
        print(f"fromage: indexed {len(good)} images, skipped {skipped} that could not be read", file=sys.stderr)
