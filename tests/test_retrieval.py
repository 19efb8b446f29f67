"""Image index: build, open, exact search, damage/mismatch errors, resumable and bad-image-tolerant builds."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fromage.runtime.errors import FromageError
from fromage.runtime.index_build import build_index
from fromage.runtime.retrieval import ImageIndex

DIM, N = 16, 40


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    vectors = unit(rng.standard_normal((N, DIM)))
    items = [(f"img/{i}.png", None if i % 3 == 0 else f"caption {i}") for i in range(N)]
    return items, vectors, {p: v for (p, _), v in zip(items, vectors)}


def embedder_for(table, calls=None, bad=(), interrupt_on=None):
    def embed(paths):
        if calls is not None:
            calls.append(list(paths))
            if interrupt_on is not None and len(calls) == interrupt_on:
                raise KeyboardInterrupt
        for p in paths:
            if p in bad:
                raise FromageError(f"cannot read image {p}")
        return np.stack([table[p] for p in paths])
    return embed


def build(items, table, out, **kw):
    kw.setdefault("embedder", "enc-a")
    return build_index(items, kw.pop("embed", embedder_for(table)), out, dim=DIM, batch_size=8, progress=False, **kw)


def test_search_matches_numpy_ranking(data, tmp_path):
    items, vectors, table = data
    index = build(items, table, tmp_path / "ix")
    assert (index.count, index.dim, index.embedder) == (N, DIM, "enc-a")
    queries = unit(np.random.default_rng(1).standard_normal((6, DIM)))
    batch = index.search_batch(queries, top_k=5)
    for q, batch_hits in zip(queries, batch):
        expected = np.argsort(-(vectors @ q))[:5]
        hits = index.search(q, top_k=5)
        assert [h.key for h in hits] == list(expected)
        assert [h.key for h in batch_hits] == list(expected)
        np.testing.assert_allclose([h.score for h in hits], (vectors @ q)[expected], atol=1e-5)
        assert all(type(h.score) is float for h in hits)
    assert len(index.search(queries[0], top_k=1000)) == N
    index.close()


def test_paths_and_captions_round_trip(data, tmp_path):
    items, vectors, table = data
    build(items, table, tmp_path / "ix").close()
    with ImageIndex.open(tmp_path / "ix", expected_dim=DIM, expected_embedder="enc-a") as index:
        for key in (0, 1, 7, N - 1):
            (hit,) = index.search(vectors[key])
            assert (hit.key, hit.path, hit.caption) == (key, items[key][0], items[key][1])
            assert hit.score == pytest.approx(1.0, abs=1e-5)


def test_rebuild_same_items_reopens_and_other_items_refused(data, tmp_path):
    items, _, table = data
    build(items, table, tmp_path / "ix").close()
    calls = []
    build(items, table, tmp_path / "ix", embed=embedder_for(table, calls)).close()
    assert calls == []
    with pytest.raises(FromageError, match="overwrite"):
        build(items[:10], table, tmp_path / "ix")
    assert build(items[:10], table, tmp_path / "ix", overwrite=True).count == 10


def test_missing_directory(tmp_path):
    with pytest.raises(FromageError, match="fromage index build"):
        ImageIndex.open(tmp_path / "nope")


def test_truncated_vectors_file(data, tmp_path):
    items, _, table = data
    build(items, table, tmp_path / "ix").close()
    path = tmp_path / "ix" / "vectors.usearch"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FromageError, match="damaged"):
        ImageIndex.open(tmp_path / "ix")


def test_corrupt_or_missing_files(data, tmp_path):
    items, _, table = data
    build(items, table, tmp_path / "ix").close()
    (tmp_path / "ix" / "images.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(FromageError, match="damaged"):
        ImageIndex.open(tmp_path / "ix")
    (tmp_path / "ix" / "images.sqlite").unlink()
    with pytest.raises(FromageError, match="images.sqlite is missing"):
        ImageIndex.open(tmp_path / "ix")
    (tmp_path / "ix" / "index.json").write_text("{not json")
    with pytest.raises(FromageError, match="damaged"):
        ImageIndex.open(tmp_path / "ix")


def test_dim_and_embedder_mismatch(data, tmp_path):
    items, _, table = data
    build(items, table, tmp_path / "ix").close()
    with pytest.raises(FromageError, match="32"):
        ImageIndex.open(tmp_path / "ix", expected_dim=32)
    with pytest.raises(FromageError, match="another bundle's image encoder"):
        ImageIndex.open(tmp_path / "ix", expected_embedder="enc-b")
    with pytest.raises(FromageError, match="overwrite"):
        build(items, table, tmp_path / "ix", embedder="enc-b")


def test_killed_build_resumes_without_redoing_batches(data, tmp_path):
    items, vectors, table = data
    calls = []
    with pytest.raises(KeyboardInterrupt):
        build(items, table, tmp_path / "ix", embed=embedder_for(table, calls, interrupt_on=3))
    assert len(calls) == 3
    with pytest.raises(FromageError, match="incomplete"):
        ImageIndex.open(tmp_path / "ix")

    calls.clear()
    index = build(items, table, tmp_path / "ix", embed=embedder_for(table, calls))
    done_before = {p for p, _ in items[:16]}  # batches 1 and 2 (batch_size=8) finished before the kill
    assert calls and not done_before & {p for batch in calls for p in batch}
    assert sum(map(len, calls)) == N - 16
    assert index.count == N
    assert [h.key for h in index.search(vectors[20], top_k=3)][0] == 20
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == ["images.sqlite", "index.json", "vectors.usearch"]
    assert json.loads((tmp_path / "ix" / "index.json").read_text())["complete"] is True


def test_bad_image_is_skipped(data, tmp_path, capsys):
    items, vectors, table = data
    bad = items[5][0]
    index = build(items, table, tmp_path / "ix", embed=embedder_for(table, bad={bad}))
    assert index.count == N - 1
    assert bad in capsys.readouterr().err
    paths = {h.path for h in index.search(vectors[0], top_k=N)}
    assert paths == {p for p, _ in items} - {bad}
    (hit,) = index.search(vectors[6])
    assert (hit.path, hit.caption) == items[6]
    index.close()


def test_runtime_does_not_import_torch():
    code = "import sys, fromage.runtime.retrieval; sys.exit(('torch' in sys.modules) + ('transformers' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_hnsw_path_and_single_row_batch(data, tmp_path, monkeypatch):
    import fromage.runtime.retrieval as retrieval
    items, vectors, table = data
    monkeypatch.setattr(retrieval, "EXACT_SEARCH_MAX", 0)  # force the HNSW branch on a small index
    with build(items, table, tmp_path / "ix") as index:
        assert not index._exact
        assert [h.key for h in index.search(vectors[3], top_k=3)][0] == 3
        (hits,) = index.search_batch(vectors[3:4], top_k=100)
        assert len(hits) == N and hits[0].key == 3


def test_wrong_embedding_shape_fails_build(data, tmp_path):
    items, _, table = data
    with pytest.raises(FromageError, match="shape"):
        build_index(items, lambda paths: np.zeros((len(paths), DIM + 1), np.float32), tmp_path / "ix",
                    dim=DIM, embedder="enc-a", progress=False)
    with pytest.raises(FromageError, match="incomplete"):
        ImageIndex.open(tmp_path / "ix")
