"""Building an image index: embed a folder or TSV of images with a bundle's vision graph, resumably
(a killed build never looks complete and resumes where it stopped), and checking an index's search
graph: every stored vector must find its own image the way queries search (`check_index`).

Safety on disk: a build writes only into a missing or empty folder, a fromage index or an unfinished
fromage build (never a folder holding other files); one build at a time per folder (a lock file
beside it); `overwrite` builds beside the old index and swaps it in at the end, so the old index
answers until the new one is complete. A hostile image (unreadable, too large, not a regular file,
undecodable, a non-finite embedding) is skipped with a warning; it never stops the build."""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm
from usearch.index import BatchMatches, Index

from fromage.engines.onnxruntime import OrtSession

from .errors import FromageError
from .files import sha256_file, write_atomic
from .preprocess import MAX_IMAGE_BYTES, preprocess
from .retrieval import (EXACT_SEARCH_MAX, FORMAT, IMAGES, META, STATE, VECTORS, VERSION, ImageIndex, read_meta)
from .sources import list_images

FINGERPRINT_VERSION = 2  # 2: the fingerprint covers each image file's sha256 (1: paths and captions only)
TIE = 1e-5  # scores within this of the best are ties (identical images): a key found among them is found
CHECK_K = 10  # results per self-search in the graph check (more only for keys with that many ties)


def index_images(bundle, source, out, *, image_dir=None, batch_size: int = 32, overwrite: bool = False,
                 threads: int | None = None, skip_missing: bool = True):
    """Embed the images of `source` (a folder or a TSV) with a loaded bundle's vision graph into an
    index at `out` (resuming an unfinished build). TSV rows whose image file is missing are skipped
    with a warning (skip_missing=False: refused). -> ImageIndex"""
    vision = OrtSession(bundle.graph_path("vision"), threads=threads)
    pp = bundle.preprocessing

    def embed(paths):  # preprocess refuses what is not a regular image file of bounded size, unopened
        try:
            pixels = preprocess(paths, pp)
        except FromageError:
            raise
        except Exception as e:  # whatever a hostile file makes the decoders raise is that image's problem
            raise FromageError(f"cannot read image: {type(e).__name__}: {e}") from None
        return vision.run({"pixel_values": pixels}, ["image_embedding"])[0]
    return build_index(list_images(source, image_dir, skip_missing=skip_missing), embed, out,
                       dim=bundle.model["retrieval_dim"], embedder=bundle.vision_fingerprint,
                       batch_size=batch_size, overwrite=overwrite)


def _content_id(path: str) -> str:
    """What the fingerprint records of an image: its file's sha256; for a path that is no readable regular
    file (it will be skipped), what it is instead, so fixing it later counts as a change."""
    try:
        st = os.stat(path)
    except OSError:
        return "absent"
    if not stat.S_ISREG(st.st_mode):
        return f"not-a-file:{stat.S_IFMT(st.st_mode)}"
    if st.st_size > MAX_IMAGE_BYTES:
        return f"too-large:{st.st_size}:{st.st_mtime_ns}"
    try:
        return sha256_file(path)
    except (OSError, FromageError):
        return f"unreadable:{st.st_mtime_ns}"


def _fingerprint(items: list[tuple[str, str | None]], dim: int, embedder: str, progress: bool = False) -> str:
    contents = [_content_id(p) for p, _ in tqdm(items, desc="hashing images", unit="img",
                                                   disable=not progress or len(items) < 5000)]
    blob = json.dumps({"fingerprint": FINGERPRINT_VERSION, "dim": dim, "embedder": embedder,
                       "items": [[p, c, h] for (p, c), h in zip(items, contents)]}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _check(vectors, n: int, dim: int) -> np.ndarray:
    # A wrong shape is a bundle/configuration problem, not a bad image: fail the build rather than skip.
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (n, dim):
        raise FromageError(f"the image encoder returned embeddings of shape {vectors.shape}, expected ({n}, {dim}); "
                           "is the index dim the bundle's retrieval dim?")
    return vectors


def _bad_vector(v: np.ndarray) -> str | None:
    if not np.isfinite(v).all():
        return "an embedding with NaN or infinite values"
    if float(np.dot(v, v)) < 1e-12:
        return "an all-zero embedding"
    return None


# ---- the folder: ours or not, one build at a time, swapped in whole -------------------------------------

_OWN = {VECTORS, IMAGES, META, STATE, STATE + "-journal", STATE + "-wal", STATE + "-shm"}
_TMP = re.compile(r"\.(%s)\..+\.tmp\Z" % "|".join(re.escape(n) for n in (VECTORS, IMAGES, META)))


def _is_build_state(path: Path) -> bool:
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.Error:
        return False
    return {"meta", "done"} <= tables


def _foreign(folder: Path) -> str | None:
    """Why `folder` is not fromage's to write; None when it is missing, empty, a fromage index (its
    index.json's format) or an unfinished fromage build (its build state)."""
    if not os.path.lexists(folder):
        return None
    if not folder.is_dir():
        return "it is not a folder"
    try:
        names = os.listdir(folder)
    except OSError as e:
        return f"it cannot be listed ({e.strerror})"
    strays = sorted(n for n in names if n not in _OWN and not _TMP.match(n))
    if strays:
        return f"it holds files fromage did not write ({', '.join(strays[:3])}{', ...' if len(strays) > 3 else ''})"
    if not names:
        return None
    if META in names:
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, ValueError):
            meta = None
        return None if isinstance(meta, dict) and meta.get("format") == FORMAT else f"its {META} is not a fromage index"
    if STATE in names and _is_build_state(folder / STATE):
        return None
    return f"it holds {', '.join(sorted(names)[:3])} but no fromage {META} or build state"


def _refuse_foreign(folder: Path) -> None:
    why = _foreign(folder)
    if why is not None:
        raise FromageError(f"refusing to build an index in {folder}: {why}; give --out a new or empty folder "
                           "(or one holding a fromage index)")


def _beside(out: Path, tag: str) -> Path:
    return out.parent / f".{out.name}.fromage-{tag}"


@contextmanager
def _build_lock(out: Path):
    """One writer per index folder: an flock on a lock file beside it (kept; its inode is the lock), held
    across the build, the swap and a repair. Refuses at once when another process holds it."""
    path = _beside(out, "lock")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise FromageError(f"cannot create the lock file {path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FromageError(f"another build is writing {out}; wait for it to finish and retry") from None
        yield
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(new: Path, out: Path) -> None:
    """Put the finished index `new` at `out`; the old one answers until this moment."""
    if _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # now holds the old index
        return
    old = _beside(out, "old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)  # (a kill right here is undone by _recover_swap)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _complete(folder: Path) -> bool:
    try:
        read_meta(folder)
        return True
    except FromageError:
        return False


def _recover_swap(out: Path) -> None:
    old, new = _beside(out, "old"), _beside(out, "build")
    if old.is_dir() and not os.path.lexists(out):  # killed between the two renames of a swap
        os.rename(new if _complete(new) else old, out)
    shutil.rmtree(old, ignore_errors=True)


# ---- the build -------------------------------------------------------------------------------------------

def build_index(items, embed_batch, out_dir, *, dim: int, embedder: str, batch_size: int = 32,
                progress: bool = True, overwrite: bool = False) -> ImageIndex:
    out = Path(os.path.abspath(out_dir))  # "ix/", "." and "a/../ix" name one folder, with a parent to build beside
    items = [(str(p), None if c is None else str(c)) for p, c in items]
    if not items:
        raise FromageError("no images to index")
    _refuse_foreign(out)
    with _build_lock(out):
        _recover_swap(out)
        _refuse_foreign(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FromageError(f"cannot create index directory {out}: {e}") from None
        fingerprint = _fingerprint(items, dim, embedder, progress)
        try:
            old = json.loads((out / META).read_text())
        except (OSError, ValueError):
            old = None
        aside = _beside(out, "build")
        if isinstance(old, dict) and old.get("complete") is True:
            if not overwrite:
                if old.get("items_sha256") == fingerprint:
                    (out / STATE).unlink(missing_ok=True)  # left behind if a build was killed right after finishing
                    if aside.is_dir() and _foreign(aside) is None:
                        shutil.rmtree(aside, ignore_errors=True)  # a replacement build that was given up
                    return ImageIndex.open(out, expected_dim=dim, expected_embedder=embedder)
                why = ("was built by an older fromage whose fingerprint did not cover the image files' contents"
                       if old.get("fingerprint_version") != FINGERPRINT_VERSION else
                       "was built from other images (or from images whose contents have changed since) or with "
                       "another image encoder")
                raise FromageError(f"the index in {out} {why}; rebuild it with --overwrite (it keeps answering "
                                   "until the new one is complete), or choose another --out")
            # Build beside it and swap at the end: the old index answers until then; a killed build leaves it
            # working (and rerunning the same build resumes the one beside it).
            _refuse_foreign(aside)
            _build_into(aside, items, embed_batch, fingerprint, dim, embedder, batch_size, progress)
            _swap_in(aside, out)
        else:
            _build_into(out, items, embed_batch, fingerprint, dim, embedder, batch_size, progress)
    return ImageIndex.open(out, expected_dim=dim, expected_embedder=embedder)


def _build_into(folder: Path, items, embed_batch, fingerprint: str, dim: int, embedder: str, batch_size: int,
                progress: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        done = None
    if isinstance(done, dict):
        if done.get("complete") is True and done.get("items_sha256") == fingerprint:
            (folder / STATE).unlink(missing_ok=True)
            return
        (folder / META).unlink()  # an older index or an incomplete one: from here on it is rebuilt
    # Partial state: one row per finished item (vector NULL = skipped bad image), committed per batch,
    # so a killed build resumes where it stopped and never redoes finished batches.
    state = sqlite3.connect(folder / STATE)
    try:
        state.execute("CREATE TABLE IF NOT EXISTS meta (fingerprint TEXT NOT NULL)")
        state.execute("CREATE TABLE IF NOT EXISTS done (item INTEGER PRIMARY KEY, vector BLOB)")
        prev = state.execute("SELECT fingerprint FROM meta").fetchone()
        if prev is None or prev[0] != fingerprint:
            if prev is not None:
                print(f"fromage: discarding an unfinished build of other images (or of images changed since) "
                      f"in {folder}", file=sys.stderr)
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
        _finalize(folder, items, state, dim, embedder, fingerprint, progress)
    finally:
        state.close()
    (folder / STATE).unlink()


def _embed_or_skip(embed_batch, paths, ids, dim, bar) -> list[tuple[int, bytes | None]]:
    try:
        vectors = embed_batch(paths)
    except FromageError as e:
        if len(paths) > 1:  # one bad image spoils its batch: retry one by one to find it and keep the rest
            return [row for i, p in zip(ids, paths) for row in _embed_or_skip(embed_batch, [p], [i], dim, bar)]
        bar.write(f"fromage: skipping {paths[0]}: {e}", file=sys.stderr)
        return [(ids[0], None)]
    rows = []
    for i, p, v in zip(ids, paths, _check(vectors, len(paths), dim)):
        why = _bad_vector(v)
        if why is not None:  # never let such a vector into the index: it would rank first for every query
            bar.write(f"fromage: skipping {p}: the image encoder returned {why}", file=sys.stderr)
        rows.append((i, None if why else v.tobytes()))
    return rows


def _finalize(out: Path, items, state: sqlite3.Connection, dim: int, embedder: str, fingerprint: str,
              progress: bool = True) -> None:
    # Keys are renumbered 0..N-1 over the images that embedded, in item order.
    index = Index(ndim=dim, metric="ip", dtype="f32")
    good: list[int] = []
    rows = state.execute("SELECT item, vector FROM done WHERE vector IS NOT NULL ORDER BY item")
    # the graph build is the slow part of a large index (~13 min for 1M vectors on 2 cores): show it
    with tqdm(total=len(items), desc="building the search graph", unit="vec",
              disable=not progress or len(items) < 50_000) as bar:
        while chunk := rows.fetchmany(8192):  # chunked: a large build never holds two copies of all vectors
            vectors = np.frombuffer(b"".join(v for _, v in chunk), dtype=np.float32).reshape(len(chunk), dim)
            # (a state written before embeddings were checked may hold bad ones)
            fine = np.isfinite(vectors).all(axis=1) & (np.einsum("ij,ij->i", vectors, vectors) >= 1e-12)
            for (item, _), ok in zip(chunk, fine):
                if not ok:
                    print(f"fromage: skipping {items[item][0]}: its stored embedding is not finite or zero",
                          file=sys.stderr)
            index.add(np.arange(len(good), len(good) + int(fine.sum()), dtype=np.uint64), vectors[fine])
            good += [item for (item, _), ok in zip(chunk, fine) if ok]
            bar.update(len(chunk))
    skipped = len(items) - len(good)
    if not good:
        raise FromageError(f"none of the {len(items)} images could be embedded; nothing to index")
    graph = check_graph(index, progress=progress)
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
            "items_sha256": fingerprint, "fingerprint_version": FINGERPRINT_VERSION,
            "vectors_sha256": sha256_file(out / VECTORS), "unreachable": graph["unreachable_keys"],
            "complete": True}
    # Written last: its presence with complete=true is what makes the directory an index.
    write_atomic(out / META, json.dumps(meta, indent=1))
    if skipped:
        print(f"fromage: indexed {len(good)} images, skipped {skipped} that could not be read", file=sys.stderr)
    print(f"fromage: {_graph_summary(graph)}", file=sys.stderr)


# ---- the graph check ---------------------------------------------------------------------------------------

def _own_verdict(keys: np.ndarray, distances: np.ndarray, key: int, k: int) -> str:
    """rank1 | tied (among the top score's ties: an identical image) | more (k results, all tied: look further)
    | missing."""
    if len(keys) == 0:
        return "missing"
    if int(keys[0]) == key:
        return "rank1"
    tied = distances <= distances[0] + TIE
    if key in set(int(x) for x in keys[tied]):
        return "tied"
    return "more" if tied.all() and len(keys) == k else "missing"


def check_graph(index: Index, *, batch: int = 4096, progress: bool = False) -> dict:
    """Search a USearch index (keys 0..n-1) with each of its own vectors through the HNSW graph (exact=False,
    as queries above EXACT_SEARCH_MAX run): -> counts found at rank 1 and among ties, the keys the graph
    never returns for their own vector (`unreachable_keys`) and the keys whose vector is not finite."""
    n = len(index)
    k = min(CHECK_K, n)
    counts = {"rank1": 0, "tied": 0}
    unreachable: list[int] = []
    nonfinite: list[int] = []
    more: list[int] = []
    with tqdm(total=n, desc="checking the search graph", unit="vec", disable=not progress or n < 50_000) as bar:
        for start in range(0, n, batch):
            keys = np.arange(start, min(n, start + batch), dtype=np.uint64)
            vectors = np.asarray(index.get(keys), dtype=np.float32).reshape(len(keys), -1)
            finite = np.isfinite(vectors).all(axis=1)
            nonfinite += [int(x) for x in keys[~finite]]
            query_keys = keys[finite]
            if len(query_keys):
                matches = index.search(vectors[finite], k, exact=False)
                for i, key in enumerate(query_keys):
                    m = matches[i] if isinstance(matches, BatchMatches) else matches
                    verdict = _own_verdict(m.keys, m.distances, int(key), k)
                    if verdict in counts:
                        counts[verdict] += 1
                    else:
                        (more if verdict == "more" else unreachable).append(int(key))
            bar.update(len(keys))
    for key in more:  # many identical images: search wider for this one
        wide = min(n, 1024)
        m = index.search(np.asarray(index.get(np.array([key], dtype=np.uint64)), np.float32).reshape(1, -1),
                         wide, exact=False)
        m = m[0] if isinstance(m, BatchMatches) else m
        verdict = _own_verdict(m.keys, m.distances, key, wide)
        if verdict in counts:
            counts[verdict] += 1
        else:
            unreachable.append(key)
    return {"vectors": n, "found_rank1": counts["rank1"], "found_tied": counts["tied"],
            "unreachable_keys": sorted(unreachable), "nonfinite_keys": nonfinite}


def _graph_summary(graph: dict) -> str:
    n, bad = graph["vectors"], graph["unreachable_keys"]
    text = f"search graph checked: {graph['found_rank1']}/{n} images found at rank 1 by their own vector"
    if graph["found_tied"]:
        text += f", {graph['found_tied']} among identical images' tied scores"
    if bad:
        text += (f"; {len(bad)} the graph cannot reach (keys {', '.join(map(str, bad[:5]))}"
                 f"{', ...' if len(bad) > 5 else ''}) are searched exactly beside it")
    return text + (f" (queries search exactly up to {EXACT_SEARCH_MAX} images)" if n <= EXACT_SEARCH_MAX else "")


def check_index(directory, repair: bool = False, *, progress: bool = False) -> dict:
    """Check a finished index: its vectors file against the sha256 recorded at build time, every vector finite,
    and every image found by its own vector the way queries run (HNSW plus the exact list of keys the graph
    cannot reach; a key among the top score's ties counts as found: identical images tie). With `repair`,
    record the keys the graph cannot reach (searched exactly from then on) and the vectors' sha256, atomically,
    and check again. Damage (a changed vectors file, non-finite vectors) is reported, not repaired: rebuild.
    -> a JSON-able report whose "ok" says whether every image is found."""
    directory = Path(os.path.abspath(directory))
    meta = read_meta(directory)
    try:
        raw = Index.restore(directory / VECTORS, view=True)
    except (RuntimeError, ValueError) as e:
        raise FromageError(f"the index at {directory} is damaged ({VECTORS}: {e}); rebuild it with "
                           "`fromage index build --overwrite`") from None
    if raw is None or raw.ndim != meta["dim"] or len(raw) != meta["count"]:
        raise FromageError(f"the index at {directory} is damaged ({VECTORS} does not match {META}); rebuild it "
                           "with `fromage index build --overwrite`")
    digest = sha256_file(directory / VECTORS)
    recorded = meta.get("vectors_sha256")
    checksum = "not recorded" if recorded is None else "ok" if recorded == digest else "mismatch"
    graph = check_graph(raw, progress=progress)
    del raw
    side = meta.get("unreachable", [])
    side = side if isinstance(side, list) else []
    exact = meta["count"] <= EXACT_SEARCH_MAX
    missing = sorted(set(graph["unreachable_keys"]) - set(side))
    damaged = checksum == "mismatch" or bool(graph["nonfinite_keys"])
    report = {
        "index": str(directory), "images": meta["count"], "search": "exact" if exact else "hnsw",
        "exact_search_max": EXACT_SEARCH_MAX, "vectors_sha256": checksum,
        "nonfinite_keys": graph["nonfinite_keys"], "found_rank1": graph["found_rank1"],
        "found_tied": graph["found_tied"], "graph_unreachable": len(graph["unreachable_keys"]),
        "graph_unreachable_keys": graph["unreachable_keys"][:100], "searched_exactly_beside_graph": len(side),
        "missing": len(missing), "missing_keys": missing[:100], "repaired": False,
        "note": "each vector searched the HNSW graph (exact=False) for its own key; a key among the top score's "
                "ties counts as found (identical images tie); keys the graph cannot reach are searched exactly "
                "beside it at query time"}
    if damaged:
        report["damage"] = ("the vectors file differs from the one built" if checksum == "mismatch" else
                            f"{len(graph['nonfinite_keys'])} stored vectors are not finite")
        report["advice"] = "rebuild it with `fromage index build --overwrite` (a repair cannot restore vectors)"
    elif repair and (missing or checksum != "ok" or sorted(side) != graph["unreachable_keys"]):
        with _build_lock(directory):
            new = {**meta, "unreachable": graph["unreachable_keys"], "vectors_sha256": digest}
            write_atomic(directory / META, json.dumps(new, indent=1))
        report["repaired"] = True
        report["searched_exactly_beside_graph"] = len(graph["unreachable_keys"])
        side = graph["unreachable_keys"]
        missing = []
    if not damaged and side:  # confirm through the query path itself that the listed keys find themselves
        with ImageIndex.open(directory, exact=False) as index:
            keys = np.asarray(sorted(set(side)), dtype=np.uint64)
            vectors = np.asarray(index._index.get(keys), np.float32).reshape(len(keys), -1)
            for start in range(0, len(keys), 1024):
                for key, (found, scores) in zip(keys[start:start + 1024],
                                                index.search_keys(vectors[start:start + 1024], CHECK_K)):
                    if int(key) not in set(int(x) for x in found[scores >= scores[0] - TIE]):
                        missing.append(int(key))
        missing = sorted(set(missing))
    report["missing"], report["missing_keys"] = len(missing), missing[:100]
    report["ok"] = not damaged and (exact or not missing)
    return report
