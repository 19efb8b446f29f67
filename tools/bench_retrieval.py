"""`fromage bench --retrieval N`: exact numpy vs USearch exact vs USearch HNSW vs the runtime's own
`ImageIndex` on N random clustered vectors (build time, memory, QPS, latency, recall@10)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from fromage.runtime.errors import FromageError


def clustered_vectors(n: int, dim: int, seed: int, queries: int = 0, spread: float = 0.6,
                      chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors around n/250 random centres (like image embeddings: near neighbours exist),
    and `queries` fresh points drawn the same way."""
    rng = np.random.default_rng(seed)
    clusters = max(8, min(4096, n // 250))
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def points(count):
        out = np.empty((count, dim), dtype=np.float32)
        for s in range(0, count, chunk):
            e = min(count, s + chunk)
            v = centres[rng.integers(0, clusters, e - s)]
            v += rng.standard_normal((e - s, dim), dtype=np.float32) * (spread / math.sqrt(dim))
            out[s:e] = v / np.linalg.norm(v, axis=1, keepdims=True)
        return out
    return points(n), points(queries)


def build_vector_index(vectors: np.ndarray, out_dir: Path, embedder: str, progress: bool = True):
    """An image index over in-memory vectors, built (or resumed, or loaded) with the runtime's own
    builder, which shows progress for the vectors and for the search graph. -> ImageIndex"""
    from fromage.runtime.index_build import build_index
    items = [(f"v/{i}", None) for i in range(len(vectors))]
    return build_index(items, lambda paths: vectors[[int(p[2:]) for p in paths]], out_dir,
                       dim=vectors.shape[1], embedder=embedder, batch_size=8192, progress=progress)


def run_retrieval_bench(n: int, dim: int, threads: int, cache: Path, queries: int = 1000, k: int = 10,
                        log=print) -> dict:
    """Exact numpy vs USearch exact vs USearch HNSW on N clustered random unit vectors; the index is
    built once with the runtime's own builder (resumable, with progress) and cached."""
    from usearch.index import Index
    from .bench_worker import peak_rss_mb
    from fromage.runtime.retrieval import EXACT_SEARCH_MAX, VECTORS
    if n < k:
        raise FromageError(f"--retrieval needs at least {k} vectors")
    t = time.perf_counter()
    vectors, qv = clustered_vectors(n, dim, seed=7, queries=queries)
    gen_s = time.perf_counter() - t
    out_dir = cache / "bench" / f"retrieval-n{n}-d{dim}"
    sidecar = out_dir.with_name(out_dir.name + ".bench-build.json")  # beside: an index folder holds fromage's only
    if (out_dir / "bench-build.json").is_file():  # a cache from before the fingerprint covered contents: rebuilt
        import shutil
        shutil.rmtree(out_dir)
    cached = sidecar.is_file()
    log(f"retrieval benchmark: {n} clustered random {dim}-d unit vectors, {queries} queries, top-{k}, "
        f"{threads} threads; index in {out_dir}" + (" (cached)" if cached else ""))
    t = time.perf_counter()
    index = build_vector_index(vectors, out_dir, f"bench-retrieval-v1-d{dim}")
    if not cached:
        sidecar.write_text(json.dumps({"build_s": time.perf_counter() - t}))
    build_s = json.loads(sidecar.read_text())["build_s"]

    def numpy_topk(q):  # the ground truth: float32 inner products, top-k per chunk of vectors, merged
        chunk = max(1024, int(16e6 // len(q)))  # <= 64 MB of scores at a time
        best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
        best_i = np.zeros((len(q), 0), dtype=np.int64)
        for s in range(0, n, chunk):
            scores = q @ vectors[s:s + chunk].T
            kk = min(k, scores.shape[1])
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            cand_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], axis=1)
            cand_i = np.concatenate([best_i, top + s], axis=1)
            keep = np.argsort(-cand_s, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
        return best_i

    def recall(found, truth):
        return float(np.mean([len(set(map(int, f)) & set(map(int, g))) / k for f, g in zip(found, truth)]))

    def measure(fn, q, singles):
        fn(q[:2])  # warm: page in the memory-mapped file, start the thread pools
        t = time.perf_counter()
        res = fn(q)
        batch_s = time.perf_counter() - t
        lat = []
        for row in q[:singles]:
            t = time.perf_counter()
            fn(row[None])
            lat.append((time.perf_counter() - t) * 1000)
        single = {p: float(np.percentile(lat, int(p[1:]))) for p in ("p50", "p90", "p99")}
        return res, {"queries": len(q), "qps": len(q) / batch_s, "single_query_ms": single}

    # an exact search reads all n vectors per query: keep its query count within a fixed budget
    exact_q = int(min(queries, max(20, 4e10 // (n * dim))))
    exact_singles = min(50, exact_q)
    usearch_index = Index.restore(out_dir / VECTORS, view=True)  # as the runtime opens it
    runtime_exact = index.exact  # the runtime's own choice of mode
    rt_q = exact_q if runtime_exact else queries
    log(f"exact numpy search ({queries} queries: the ground truth) ...")
    truth, np_m = measure(numpy_topk, qv, exact_singles)
    log(f"USearch exact search ({exact_q} queries) ...")
    ex_keys, ex_m = measure(lambda q: usearch_index.search(q, k, exact=True, threads=threads).keys,
                            qv[:exact_q], exact_singles)
    log(f"USearch HNSW search ({queries} queries) ...")
    hn_keys, hn_m = measure(lambda q: usearch_index.search(q, k, exact=False, threads=threads).keys, qv, 200)
    log(f"fromage ImageIndex.search_batch ({rt_q} queries) ...")
    rt_hits, rt_m = measure(lambda q: index.search_batch(q, k), qv[:rt_q], exact_singles if runtime_exact else 200)
    file_bytes = (out_dir / VECTORS).stat().st_size
    built = {"build_s": build_s, "build_vectors_per_s": n / build_s,
             "build_note": "fromage's index builder: SQLite build state, USearch add (HNSW graph), save",
             "memory_bytes": file_bytes, "memory_note": "the index file, memory-mapped (view=True) as the runtime does"}
    methods = {
        "numpy_exact": {"build_s": gen_s, "build_vectors_per_s": n / gen_s, "memory_bytes": int(vectors.nbytes),
                        "build_note": "making the float32 matrix in memory (no index)", **np_m, "recall_at_10": 1.0,
                        "note": "the ground truth: float32 matmul + top-k, chunks of up to 16M scores"},
        "usearch_exact": {**built, **ex_m, "recall_at_10": recall(ex_keys, truth[:exact_q])},
        "usearch_hnsw": {**built, **hn_m, "recall_at_10": recall(hn_keys, truth),
                         "params": {"connectivity": usearch_index.connectivity,
                                    "expansion_add": usearch_index.expansion_add,
                                    "expansion_search": usearch_index.expansion_search}},
        "fromage_index": {**built, **rt_m, "mode": "exact" if runtime_exact else "hnsw",
                          "recall_at_10": recall([[h.key for h in hits] for hits in rt_hits], truth[:rt_q]),
                          "note": f"ImageIndex.search_batch: USearch (exact up to {EXACT_SEARCH_MAX} images, HNSW "
                                  "above) plus the SQLite key -> path lookup"},
    }
    index.close()
    return {"vectors": n, "dim": dim, "k": k, "threads": threads, "index_dir": str(out_dir),
            "loaded_from_cache": cached, "methods": methods, "peak_rss_mb": peak_rss_mb(),
            "data": "unit vectors around n/250 random centres (8..4096), noise 0.6/sqrt(dim) per coordinate; "
                    "queries are fresh points drawn the same way"}
