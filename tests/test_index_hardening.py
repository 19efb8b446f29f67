"""Index hardening: every image reachable (graph check + repair), no non-finite vector in or out, content
fingerprints, hostile images skipped, safe folders (foreign files refused, one build at a time, overwrite
swapped in whole), TSV rows with missing images."""

import json
import os
import sys

import numpy as np
import pytest

import fromage.runtime.index_build as index_build
import fromage.runtime.retrieval as retrieval
from fromage.runtime.errors import FromageError
from fromage.runtime.index_build import build_index, check_index, index_images
from fromage.runtime.retrieval import ImageIndex
from fromage.runtime.sources import list_images, read_tsv
from fromage.tools.cli import main

DIM = 16


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n, dim=DIM, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, n // 100), dim))
    return unit(centres[rng.integers(0, len(centres), n)] + 0.05 * rng.standard_normal((n, dim)))


def vector_items(vectors):
    items = [(f"v/{i}", None) for i in range(len(vectors))]
    return items, (lambda paths: vectors[[int(p[2:]) for p in paths]])


def build(vectors, out, **kw):
    items, embed = vector_items(vectors)
    return build_index(items, kw.pop("embed", embed), out, dim=vectors.shape[1], embedder="enc",
                       batch_size=kw.pop("batch_size", 256), progress=False, **kw)


def own_key_found(index, vectors):
    """Keys whose own vector does not return them among the top score's ties, the way queries search."""
    lost = []
    for key, hits in enumerate(index.search_batch(vectors, 10)):
        if key not in [h.key for h in hits if h.score >= hits[0].score - 1e-5]:
            lost.append(key)
    return lost


@pytest.fixture
def weak_graph(monkeypatch):
    """HNSW everywhere (EXACT_SEARCH_MAX=0) and a sparse graph that leaves many nodes unreachable."""
    monkeypatch.setattr(retrieval, "EXACT_SEARCH_MAX", 0)
    monkeypatch.setattr(index_build, "EXACT_SEARCH_MAX", 0)

    class SparseIndex(index_build.Index):
        def __init__(self, **kw):
            super().__init__(connectivity=2, expansion_add=4, **kw)
    monkeypatch.setattr(index_build, "Index", SparseIndex)


# ---- 1. every image reachable ----------------------------------------------------------------------------

def test_build_records_unreachable_keys_and_queries_find_every_image(weak_graph, tmp_path, capsys):
    vectors = clustered(600)
    with build(vectors, tmp_path / "ix") as index:
        assert not index.exact
        meta = json.loads((tmp_path / "ix" / "index.json").read_text())
        assert len(meta["unreachable"]) > 10  # the sparse graph really misses nodes
        assert "search graph checked" in capsys.readouterr().err
        assert own_key_found(index, vectors) == []


def test_check_finds_unreachable_keys_and_repair_fixes_them(weak_graph, tmp_path, capsys):
    vectors = clustered(600)
    build(vectors, tmp_path / "ix").close()
    meta_path = tmp_path / "ix" / "index.json"
    meta = json.loads(meta_path.read_text())
    unreachable = meta.pop("unreachable")
    meta_path.write_text(json.dumps(meta))  # as an index built before the check existed
    with ImageIndex.open(tmp_path / "ix") as index:
        lost = own_key_found(index, vectors)
    assert lost and set(lost) <= set(unreachable)  # the problem: images no query finds

    report = check_index(tmp_path / "ix")
    assert report["ok"] is False and report["missing"] == len(unreachable) == report["graph_unreachable"]
    assert report["vectors_sha256"] == "ok" and report["nonfinite_keys"] == []
    assert report["found_rank1"] + report["found_tied"] + report["graph_unreachable"] == 600
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["index", "check", str(tmp_path / "ix"), "--json"])
    assert e.value.code == 1 and json.loads(capsys.readouterr().out)["missing"] == len(unreachable)

    assert main(["index", "check", str(tmp_path / "ix"), "--json", "--repair"]) == 0
    repaired = json.loads(capsys.readouterr().out)
    assert repaired["repaired"] is True and repaired["ok"] is True and repaired["missing"] == 0
    assert repaired["searched_exactly_beside_graph"] == len(unreachable)
    with ImageIndex.open(tmp_path / "ix") as index:
        assert own_key_found(index, vectors) == []
    assert check_index(tmp_path / "ix")["ok"] is True
    assert main(["index", "check", str(tmp_path / "ix")]) == 0
    assert "ok: every image is found" in capsys.readouterr().out


def test_identical_images_tie_and_count_as_found(monkeypatch, tmp_path):
    monkeypatch.setattr(retrieval, "EXACT_SEARCH_MAX", 0)
    vectors = clustered(80)
    vectors[40:55] = vectors[3]  # 16 identical images: more ties than one search returns
    build(vectors, tmp_path / "ix").close()
    report = check_index(tmp_path / "ix")
    assert report["ok"] is True and report["missing"] == 0
    assert report["found_tied"] >= 1


def test_small_indexes_search_exactly():
    assert retrieval.EXACT_SEARCH_MAX >= 5000  # measured: exact costs < 0.5 ms per query up to 10k images


# ---- 1. non-finite vectors -------------------------------------------------------------------------------

def test_nan_embedding_is_skipped(tmp_path, capsys):
    vectors = clustered(30)
    items, embed = vector_items(vectors)

    def nan_for_7(paths):
        out = embed(paths).copy()
        out[[i for i, p in enumerate(paths) if p in ("v/7", "v/9")]] = np.nan
        out[[i for i, p in enumerate(paths) if p == "v/9"]] = np.inf
        return out
    with build(vectors, tmp_path / "ix", embed=nan_for_7) as index:
        assert index.count == 28
        assert all(np.isfinite(h.score) for h in index.search(vectors[0], 30))
    err = capsys.readouterr().err
    assert "skipping v/7" in err and "NaN or infinite" in err


def nan_into_vectors_file(directory, vector):
    path = directory / "vectors.usearch"
    data = bytearray(path.read_bytes())
    at = bytes(data).find(vector.tobytes())
    assert at > 0
    data[at:at + vector.nbytes] = np.full(len(vector), np.nan, np.float32).tobytes()
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks


@pytest.mark.parametrize("exact_max", [0, 10_000])
def test_damaged_vector_file_never_yields_nan_scores(exact_max, monkeypatch, tmp_path):
    monkeypatch.setattr(retrieval, "EXACT_SEARCH_MAX", exact_max)
    monkeypatch.setattr(index_build, "EXACT_SEARCH_MAX", exact_max)
    vectors = clustered(50)
    build(vectors, tmp_path / "ix").close()
    nan_into_vectors_file(tmp_path / "ix", vectors[5])
    with pytest.raises(FromageError, match="changed since it was built"):
        ImageIndex.open(tmp_path / "ix")
    report = check_index(tmp_path / "ix", repair=True)
    assert report["ok"] is False and report["vectors_sha256"] == "mismatch" and report["nonfinite_keys"] == [5]
    assert report["repaired"] is False and "rebuild" in report["advice"]
    # an index from before checksums: it opens, but a query never returns a NaN score
    meta_path = tmp_path / "ix" / "index.json"
    meta = json.loads(meta_path.read_text())
    del meta["vectors_sha256"]
    meta_path.write_text(json.dumps(meta))
    with ImageIndex.open(tmp_path / "ix") as index:
        with pytest.raises(FromageError, match="damaged"):
            index.search(vectors[1], top_k=3)
    assert check_index(tmp_path / "ix")["nonfinite_keys"] == [5]


def test_non_finite_query_is_an_error(tmp_path):
    vectors = clustered(20)
    with build(vectors, tmp_path / "ix") as index:
        for bad in (np.nan, np.inf):
            q = vectors[0].copy()
            q[3] = bad
            with pytest.raises(FromageError, match="NaN or infinite"):
                index.search(q)
            with pytest.raises(FromageError, match="NaN or infinite"):
                index.search_batch(np.stack([vectors[1], q]), 2)


# ---- 1. changed images are re-embedded -------------------------------------------------------------------

def file_embedder(calls):
    def embed(paths):
        calls.extend(paths)
        return unit(np.stack([np.frombuffer(open(p, "rb").read().ljust(DIM * 4, b"\0")[:DIM * 4], np.float32)
                              for p in paths]))
    return embed


def write_images(folder, n=6):
    folder.mkdir()
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        noise = np.random.default_rng(i).integers(1, 255, DIM * 4, dtype=np.uint8)
        path.write_bytes(np.full(DIM, i + 1, np.float32).tobytes() + noise.tobytes())
        paths.append(str(path))
    return paths


def test_changed_image_is_reembedded(tmp_path):
    paths = write_images(tmp_path / "imgs")
    items = [(p, f"c{i}") for i, p in enumerate(paths)]
    calls = []
    kw = dict(dim=DIM, embedder="enc", progress=False)
    build_index(items, file_embedder(calls), tmp_path / "ix", **kw).close()
    assert len(calls) == 6
    calls.clear()
    build_index(items, file_embedder(calls), tmp_path / "ix", **kw).close()
    assert calls == []  # unchanged: up to date
    changed = np.random.default_rng(9).standard_normal(DIM).astype(np.float32)
    with open(paths[2], "r+b") as f:  # same size, same path, same caption: new contents
        f.write(changed.tobytes())
    with pytest.raises(FromageError, match="contents have changed"):
        build_index(items, file_embedder(calls), tmp_path / "ix", **kw)
    with build_index(items, file_embedder(calls), tmp_path / "ix", overwrite=True, **kw) as index:
        assert paths[2] in calls
        (hit,) = index.search(file_embedder([])([paths[2]])[0])
        assert hit.path == paths[2] and hit.score == pytest.approx(1.0, abs=1e-5)


def test_index_with_an_old_fingerprint_names_the_reason(tmp_path):
    vectors = clustered(10)
    build(vectors, tmp_path / "ix").close()
    meta_path = tmp_path / "ix" / "index.json"
    meta = json.loads(meta_path.read_text())
    del meta["fingerprint_version"]
    meta["items_sha256"] = "0" * 64  # paths and captions only
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FromageError, match="older fromage.*--overwrite"):
        build(vectors, tmp_path / "ix")


# ---- 2. hostile images -----------------------------------------------------------------------------------

def test_hostile_images_are_skipped(exported, assets, tmp_path, monkeypatch, capsys):
    from fromage.runtime.bundle_reader import load_bundle
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = []
    for i, src in enumerate(assets["images"][:3]):
        (folder / f"good{i}.png").write_bytes(open(src, "rb").read())
        good.append(str((folder / f"good{i}.png").resolve()))
    (folder / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    (folder / "truncated.png").write_bytes(open(assets["images"][4], "rb").read()[:60])
    (folder / "big.png").write_bytes(b"\0" * 5000)
    monkeypatch.setattr(index_build, "MAX_IMAGE_BYTES", 4000)
    os.mkfifo(folder / "fifo.png")
    os.mkfifo(folder / "fifo2.svg")
    os.symlink(folder / "loop.png", folder / "loop.png")
    (folder / "locked.png").write_bytes(open(assets["images"][5], "rb").read())
    os.chmod(folder / "locked.png", 0)
    (folder / "svgcaption.txt").mkdir()  # a caption "file" that is a folder
    (folder / "svgcaption.png").write_bytes(open(assets["images"][6], "rb").read())
    good.append(str((folder / "svgcaption.png").resolve()))
    try:
        with index_images(load_bundle(exported["llama"]["bundle"]), folder, tmp_path / "ix", batch_size=4) as index:
            readable_as_root = os.geteuid() == 0  # root reads a mode-000 file
            paths = {h.path for h in index.search_batch(np.eye(16, dtype=np.float32)[:1], 100)[0]}
            expected = set(good) | ({str((folder / "locked.png").resolve())} if readable_as_root else set())
            assert paths == expected
    finally:
        os.chmod(folder / "locked.png", 0o644)
    err = capsys.readouterr().err
    for name in ("garbage.png", "truncated.png", "big.png", "fifo.png", "fifo2.svg", "loop.png"):
        assert f"skipping {folder.resolve() / name}" in err or f"skipping {folder / name}" in err, name


# ---- 3. folders on disk ----------------------------------------------------------------------------------

def test_overwrite_builds_aside_and_a_killed_build_leaves_the_old_index(tmp_path):
    old_vectors, new_vectors = clustered(40, seed=1), clustered(60, seed=2)
    build(old_vectors, tmp_path / "ix").close()
    items, embed = vector_items(new_vectors)
    seen = []

    def embed_and_kill(paths):
        with ImageIndex.open(tmp_path / "ix") as old:  # the old index answers while the new one is built
            seen.append(old.count)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return embed(paths)
    with pytest.raises(KeyboardInterrupt):
        build_index(items, embed_and_kill, tmp_path / "ix", dim=DIM, embedder="enc", batch_size=16,
                    progress=False, overwrite=True)
    assert seen == [40, 40]
    with ImageIndex.open(tmp_path / "ix") as old:
        assert old.count == 40
    calls = []
    with build_index(items, lambda p: calls.append(p) or embed(p), tmp_path / "ix", dim=DIM, embedder="enc",
                     batch_size=16, progress=False, overwrite=True) as index:
        assert index.count == 60
    assert sum(map(len, calls)) == 60 - 16  # the build beside it resumed
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ix.fromage-lock", "ix"]


def test_killed_swap_is_recovered(tmp_path):
    vectors = clustered(20)
    build(vectors, tmp_path / "ix").close()
    os.rename(tmp_path / "ix", tmp_path / ".ix.fromage-old")  # killed between the swap's two renames
    with build(vectors, tmp_path / "ix") as index:
        assert index.count == 20
    assert not (tmp_path / ".ix.fromage-old").exists()


@pytest.mark.parametrize("files", [{"index.json": '{"mine": 1}'}, {"images.sqlite": "x"}, {"notes.txt": "hi"},
                                   {"index.json": '{"format": "fromage-index"}', "photo.jpg": "x"}])
def test_folder_with_foreign_files_is_refused(files, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(FromageError, match="refusing to build an index in"):
        build(clustered(10), out)
    with pytest.raises(FromageError, match="refusing"):
        build(clustered(10), out, overwrite=True)
    assert {p.name: p.read_text() for p in out.iterdir()} == files  # untouched


def test_empty_folder_and_previous_index_are_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    build(clustered(10), tmp_path / "empty").close()
    assert build(clustered(12, seed=3), tmp_path / "empty", overwrite=True).count == 12


def test_second_concurrent_build_is_refused(tmp_path):
    vectors = clustered(40)
    items, embed = vector_items(vectors)
    errors = []

    def embed_and_race(paths):
        if not errors:
            with pytest.raises(FromageError, match="another build is writing") as e:
                build(vectors, tmp_path / "ix")
            errors.append(str(e.value))
        return embed(paths)
    with build_index(items, embed_and_race, tmp_path / "ix", dim=DIM, embedder="enc", batch_size=8,
                     progress=False) as index:
        assert index.count == 40
    assert errors and str(tmp_path / "ix") in errors[0]


def test_tsv_with_missing_images_skips_them_with_a_warning(tmp_path, capsys):
    paths = write_images(tmp_path / "imgs", 2)
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("caption\timage\n" + "".join(f"c{i}\t{p}\n" for i, p in enumerate(paths))
                   + "".join(f"gone {i}\tgone{i}.png\n" for i in range(8)))
    assert [p for p, _ in list_images(tsv)] == paths
    err = capsys.readouterr().err
    assert "8 image file(s) not found" in err and "gone0.png" in err and "skipping them" in err
    with pytest.raises(FromageError) as e:
        read_tsv(tsv)
    assert "skip_missing" not in str(e.value) and "--image-dir" in str(e.value)


def test_cli_index_build_of_a_tsv_with_missing_images(exported, assets, tmp_path, capsys):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("caption\timage\n" + "".join(f"c{i}\t{p}\n" for i, p in enumerate(assets["images"][:3]))
                   + "lost\tnowhere.png\n")
    assert main(["index", "build", str(tsv), "--bundle", str(exported["llama"]["bundle"]),
                 "--out", str(tmp_path / "ix")]) == 0
    out, err = capsys.readouterr()
    assert "index of 3 images" in out and "nowhere.png" in err and "skip_missing" not in err
    assert "search graph checked" in err
    assert main(["index", "check", str(tmp_path / "ix"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_file_hashes_are_remembered_boundedly_and_across_renames(tmp_path, monkeypatch):
    from fromage.runtime import files
    monkeypatch.setattr(files, "_HASHES", {})
    monkeypatch.setattr(files, "HASHES_KEPT", 3)
    paths = []
    for i in range(5):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes([i]) * 10)
        paths.append(p)
        files.sha256_file(p)
    assert len(files._HASHES) == 3
    digest = files.sha256_file(paths[4])
    moved = paths[4].rename(tmp_path / "moved")
    calls, sha256 = [], files.hashlib.sha256
    monkeypatch.setattr(files.hashlib, "sha256", lambda *a: calls.append(a) or sha256(*a))
    assert files.sha256_file(moved) == digest and not calls  # the same file, renamed: not read again
    moved.write_bytes(b"changed")
    assert files.sha256_file(moved) != digest and calls
