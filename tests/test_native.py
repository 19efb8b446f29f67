"""The native decoder engine (native/*.c via engines/native.py) against ONNX Runtime on the same
bundle: logits, retrieval embedding and KV cache, step by step; and how the engine is chosen."""
import json
import shutil

import numpy as np
import pytest

from fromage.engines import huge_pages, native
from fromage.runtime.errors import FromageError
from fromage.runtime.generate import Fromage


def _steps(rt, lengths, seed=0):
    """Prefill then more positions on one state: the outputs after each call."""
    rng = np.random.default_rng(seed)
    state, out = None, []
    for n in lengths:
        emb = (rng.standard_normal((1, n, rt.embed_dim)) * 0.5).astype(np.float32)
        if state is None:
            state = rt.start(emb)
        else:
            rt.advance(state, emb)
        cache = native.cache_by_position(state.cache) if rt.engine == "native" else state.cache
        out.append((state.logits.copy(), state.ret_embedding.copy(), [c[:, :, :state.length].copy() for c in cache]))
    return out


def test_native_matches_onnxruntime_step_by_step(exported):
    bundle = exported["llama"]["bundle"]
    a, b = Fromage(bundle, engine="native"), Fromage(bundle, engine="onnxruntime")
    lengths = [5, 1, 3, 1, 60, 1, 30]  # past 64 (two attention blocks); the last call would pass the tiny model's 96
    for (la, ra, ca), (lb, rb, cb) in zip(_steps(a, lengths[:-1]), _steps(b, lengths[:-1])):
        assert np.abs(la - lb).max() <= 1e-4 * max(1.0, np.abs(lb).max())
        assert np.abs(ra - rb).max() <= 1e-5
        assert max(np.abs(x - y).max() for x, y in zip(ca, cb)) <= 1e-4
    with pytest.raises(FromageError, match="context"):  # 96 positions in the tiny model
        _steps(a, lengths)


@pytest.mark.parametrize("quantize", [None, "int4", "int8"])
def test_the_mlp_in_two_parts_matches_onnxruntime(assets, tmp_path, quantize):
    """An inner dimension of whole 32-blocks in two parts (the default model's 1,536; here 128): the native
    decoder computes a part per thread, from its gate to its down, from matrices split at load (fp32 columns and
    rows, 4/8-bit blocks); its outputs are ONNX Runtime's on the same bundle. The other tests' Llama (96: three
    blocks) runs the MLP as one part."""
    from conftest import build_model
    from fromage.export.bundle_writer import write_bundle
    model = build_model(assets, "llama_mlp2", k=2)
    options = {"quantize": quantize, "activations": "fp32"} if quantize else {}
    write_bundle(model, tmp_path / "b", log=lambda *_: None, **options)
    a, b = Fromage(tmp_path / "b", engine="native", threads=2), Fromage(tmp_path / "b", engine="onnxruntime")
    assert a.decoder.model.mlp_parts == 2 and a.decoder.model.inter == 128
    for (la, ra, _), (lb, rb, _) in zip(_steps(a, [7, 1, 1]), _steps(b, [7, 1, 1])):
        assert np.abs(la - lb).max() <= 1e-4 * max(1.0, np.abs(lb).max())
        assert np.abs(ra - rb).max() <= 1e-5


@pytest.mark.parametrize("mode", [1, 0])
def test_streamed_partials_decode_the_same(exported, mode):
    # attention's partials stored past the caches (1) or in them (0) against the placement the library measures (-1);
    # the tiny model's heads take the generic path, so ctest checks the AVX-512 streaming itself (64-float heads)
    rt = Fromage(exported["llama"]["bundle"], engine="native")
    lib = native.load_library()
    auto = _steps(rt, [5, 1, 70, 1])
    try:
        lib.fm_set_streamed_partials(mode)
        forced = _steps(rt, [5, 1, 70, 1])
    finally:
        lib.fm_set_streamed_partials(-1)
    for (la, ra, _), (lb, rb, _) in zip(auto, forced):
        assert np.array_equal(la, lb) and np.array_equal(ra, rb)


def test_a_growing_cache_keeps_its_keys(exported, monkeypatch):
    """A cache that outgrows its capacity is copied whole into the bigger one (the native keys live in blocks
    of 64 positions): the steps after the growth still match ONNX Runtime's, whose cache grows too."""
    from fromage.runtime import generate
    monkeypatch.setattr(generate, "MIN_CAPACITY", native.KV_BLOCK)
    bundle = exported["llama"]["bundle"]
    a, b = Fromage(bundle, engine="native"), Fromage(bundle, engine="onnxruntime")
    lengths = [60, 8, 1, 3]  # capacity 64, then past it from 60 positions: the growth copies a part-filled block
    for (la, _, ca), (lb, _, cb) in zip(_steps(a, lengths), _steps(b, lengths)):
        assert np.abs(la - lb).max() <= 1e-4 * max(1.0, np.abs(lb).max())
        assert max(np.abs(x - y).max() for x, y in zip(ca, cb)) <= 1e-4
    state = a.start(np.zeros((1, 60, a.embed_dim), np.float32))
    assert state.cache[0].shape[2] == native.KV_BLOCK
    a.advance(state, np.zeros((1, 8, a.embed_dim), np.float32))
    assert state.cache[0].shape[2] == 2 * native.KV_BLOCK  # min(96 positions, 128) rounded up to the block


def _token_steps(rt):
    """A state of 60 positions fed 10 tokens through the token steps."""
    state = rt.start(np.ones((1, 60, rt.embed_dim), np.float32))
    state.top = 1
    for token in range(5, 15):
        rt.feed_token(state, token)
    return state


def _resident_bytes(start: int, end: int) -> int:
    """Resident bytes of this process's mappings that overlap [start, end) (/proc/self/smaps)."""
    total, overlaps = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                overlaps = lo < end and start < hi
            elif overlaps and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def test_cache_arrays_share_one_huge_page_mapping(monkeypatch):
    """Arrays that fill a huge page together are views of one 2 MB-aligned mapping, each 64-byte aligned, zeroed
    (fresh), writable and independent; fewer bytes are numpy's own arrays."""
    monkeypatch.setattr(huge_pages, "_reuse", huge_pages._Reuse())  # a fresh mapping, not one an earlier test left
    arrays = huge_pages.cache_arrays((1, 3, 1000, 64), np.float32, 4)
    assert arrays[0].ctypes.data % huge_pages.HUGE_PAGE == 0
    mappings = set()
    for a in arrays:
        assert a.shape == (1, 3, 1000, 64) and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % 64 == 0 and not a.any()
        base = a
        while isinstance(base, np.ndarray):
            base = base.base
        mappings.add(id(base))
    assert len(mappings) == 1
    arrays[1][...] = 1
    assert not arrays[0].any() and not arrays[2].any() and arrays[1].all()
    for a in arrays:
        a[...] = 2
    # memory is what the arrays take: the part past their last whole huge page stays on 4 KiB pages
    start, end = arrays[0].ctypes.data, arrays[-1].ctypes.data + arrays[-1].nbytes
    assert _resident_bytes(start, end) <= -(-(end - start) // 4096) * 4096
    small = huge_pages.cache_arrays((2, 8), np.float16, 3)
    assert all(a.base is None and a.dtype == np.float16 and not a.any() for a in small)


class _Poisoning(huge_pages._Reuse):
    """Fills every mapping it is given with NaN bytes (float32 and float16), as a dropped cache could leave it."""

    def give(self, map, size):
        np.frombuffer(map, np.uint8)[:] = 0xFF
        super().give(map, size)


def test_a_dropped_arenas_memory_is_reused(monkeypatch):
    """When an arena's last array is dropped its mapping is kept for the next arena of its size (up to KEEP_BYTES
    in all)."""
    monkeypatch.setattr(huge_pages, "_reuse", huge_pages._Reuse())
    shape = (1, 3, 1000, 64)
    arrays = huge_pages.cache_arrays(shape, np.float32, 4)
    first = arrays[0].ctypes.data
    for a in arrays:
        a[...] = 7
    del arrays, a
    assert huge_pages._reuse.kept > 0
    again = huge_pages.cache_arrays(shape, np.float32, 4)
    assert again[0].ctypes.data == first and again[3].flat[0] == 7 and huge_pages._reuse.kept == 0
    other = huge_pages.cache_arrays(shape, np.float32, 3)  # another size: a mapping of its own
    assert other[0].ctypes.data != first
    monkeypatch.setattr(huge_pages, "KEEP_BYTES", 0)
    del again
    assert huge_pages._reuse.kept == 0  # over the limit: unmapped


def test_a_scheduler_prepares_its_caches(exported, monkeypatch):
    """A scheduler makes a cache per slot at the start and leaves their memory for its first requests."""
    from fromage.runtime.scheduler import Scheduler
    monkeypatch.setattr(huge_pages, "HUGE_PAGE", 4096)  # the tiny model's caches on "huge pages" too
    monkeypatch.setattr(huge_pages, "_reuse", huge_pages._Reuse())
    rt = Fromage(exported["llama"]["bundle"], engine="native")
    scheduler = Scheduler(rt, max_batch=3)
    try:
        assert [len(maps) for maps in huge_pages._reuse.maps.values()] == [3]
        state = rt.start(np.ones((1, 4, rt.embed_dim), np.float32))  # a first state takes one of them
        assert [len(maps) for maps in huge_pages._reuse.maps.values()] == [2] and state.cache[0].base is not None
    finally:
        scheduler.close()


def test_a_cache_on_huge_pages_decodes_the_same(exported, monkeypatch):
    """The runtime's caches (a growing one, a fork, a prefix) in huge-page arenas give the same bits as in numpy's
    arrays: here every cache goes to an arena."""
    from fromage.runtime import generate
    monkeypatch.setattr(generate, "MIN_CAPACITY", native.KV_BLOCK)
    rt = Fromage(exported["llama"]["bundle"], engine="native")
    lengths = [60, 8, 1, 3]  # grows past its first capacity
    plain, plain_fed = _steps(rt, lengths), _token_steps(rt)
    monkeypatch.setattr(huge_pages, "HUGE_PAGE", 4096)
    monkeypatch.setattr(huge_pages, "_reuse", _Poisoning())
    for _ in range(2):  # fresh arenas, then ones a dropped cache left NaN: positions are written before read
        for (la, ra, ca), (lb, rb, cb) in zip(_steps(rt, lengths), plain):
            assert np.array_equal(la, lb) and np.array_equal(ra, rb)
            assert all(np.array_equal(x, y) for x, y in zip(ca, cb))
    assert huge_pages._reuse.kept > 0
    state = rt.start(np.ones((1, 70, rt.embed_dim), np.float32))
    assert state.cache[0].base is not None  # an arena's view
    kept = rt.prefix_state(state, 70, decoding=False)  # a copy to keep (the prefix cache's): numpy's memory
    assert all(c.base is None and c.tobytes() == o.tobytes() for c, o in zip(kept.cache, state.cache))
    copies = [state.fork(), rt.prefix_state(state, 70)]
    for copy in copies + [state]:
        assert all(c.base is not None and c.tobytes() == o.tobytes() for c, o in zip(copy.cache, state.cache))
        rt.advance(copy, np.ones((1, 1, rt.embed_dim), np.float32))
    assert all(np.array_equal(copy.logits, state.logits) for copy in copies)
    for _ in range(2):  # the token steps on an arena's views, grown past their capacity
        fed = _token_steps(rt)
        assert fed.cache[0].base is not None and fed.cache[0].shape[2] == 2 * native.KV_BLOCK
        assert np.array_equal(fed.logits, plain_fed.logits) and fed.best == plain_fed.best


def test_a_decoding_loop_makes_its_cache_once(exported, monkeypatch):
    """stream's prefill makes the cache with room for the whole token budget, so no step of its decoding stops to
    grow it (a new cache, and the old one's copy, of every layer); advance alone still grows by doubling."""
    from fromage.runtime import generate
    from fromage.runtime.sampling import SamplingParams
    monkeypatch.setattr(generate, "MIN_CAPACITY", native.KV_BLOCK)
    made = []
    monkeypatch.setattr(generate, "cache_arrays",
                        lambda shape, dtype, n: made.append(shape[2]) or [np.zeros(shape, dtype) for _ in range(n)])
    rt = Fromage(exported["llama"]["bundle"], engine="native")
    prompt = ["a cat sat on the mat " * 4]
    params = SamplingParams(max_new_tokens=1, temperature=0.0, stop_ids=[], retrieval=False)
    embeds = rt.prepare(prompt, params, generate.Result())
    params.max_new_tokens = native.KV_BLOCK + 8 - embeds.shape[1]  # the budget takes the cache past 64 positions
    result = rt.generate(prompt, params)
    assert len(result.token_ids) == params.max_new_tokens and made == [2 * native.KV_BLOCK]
    made.clear()
    state = rt.start(embeds)
    for token in result.token_ids[:-1]:
        rt.feed_token(state, token)
    assert made == [native.KV_BLOCK, 2 * native.KV_BLOCK]


def test_f16_cache_holds_the_f32_values_rounded(exported):
    """kv_cache="f16": the first layer's keys and values (which depend on the inputs alone) are the fp32 cache's
    rounded to fp16, exactly; the outputs, computed from fp16 keys and values in every layer, stay within fp16's
    rounding of the fp32 cache's; and only the native engine keeps such a cache."""
    bundle = exported["llama"]["bundle"]
    a, b = Fromage(bundle, engine="native"), Fromage(bundle, engine="native", kv_cache="f16")
    lengths = [5, 1, 70, 1]  # past 64: a second key block
    for (la, ra, ca), (lb, rb, cb) in zip(_steps(a, lengths), _steps(b, lengths)):
        assert all(c.dtype == np.float16 for c in cb)
        assert np.array_equal(ca[0].astype(np.float16), cb[0]) and np.array_equal(ca[1].astype(np.float16), cb[1])
        assert 0 < np.abs(la - lb).max() <= 1e-2 * max(1.0, np.abs(la).max())
        assert np.abs(ra - rb).max() <= 1e-2
    with pytest.raises(FromageError, match="needs the native engine"):
        Fromage(bundle, engine="onnxruntime", kv_cache="f16")
    with pytest.raises(FromageError, match="unknown KV cache type"):
        Fromage(bundle, kv_cache="int8")
    state = a.start(np.zeros((1, 3, a.embed_dim), np.float32))  # an fp32 cache on the f16 decoder
    with pytest.raises(FromageError, match="float16 arrays"):
        b.advance(state, np.zeros((1, 1, a.embed_dim), np.float32))


def test_native_refuses_a_cache_too_small(exported):
    rt = Fromage(exported["llama"]["bundle"], engine="native")
    cache = [np.zeros((1, rt.kv_heads, native.KV_BLOCK, rt.head_dim), np.float32) for _ in rt.kv_names]
    logits, ret = np.zeros(rt.vocab_size, np.float32), np.zeros(rt.retrieval_dim, np.float32)
    with pytest.raises(FromageError, match="exceed the cache"):
        rt.decoder.forward(np.zeros((1, native.KV_BLOCK + 1, rt.embed_dim), np.float32), cache, 0, logits, ret)
    # sizes the C code would trust are checked first
    odd = [np.zeros((1, rt.kv_heads, native.KV_BLOCK + 8, rt.head_dim), np.float32) for _ in rt.kv_names]
    with pytest.raises(FromageError, match=f"multiple of {native.KV_BLOCK}"):
        rt.decoder.forward(np.zeros((1, 1, rt.embed_dim), np.float32), odd, 0, logits, ret)
    narrow = [np.zeros((1, rt.kv_heads, 8, rt.head_dim // 2), np.float32) for _ in rt.kv_names]
    with pytest.raises(FromageError, match="KV cache"):
        rt.decoder.forward(np.zeros((1, 1, rt.embed_dim), np.float32), narrow, 0, logits, ret)
    with pytest.raises(FromageError, match="embeds"):
        rt.decoder.forward(np.zeros((1, 1, rt.embed_dim + 1), np.float32), cache, 0, logits, ret)
    with pytest.raises(FromageError, match="logits"):
        rt.decoder.forward(np.zeros((1, 1, rt.embed_dim), np.float32), cache, 0, logits[:-1], ret)
    # the decode loop's one-position greedy step checks the same
    one = np.zeros((1, 1, rt.embed_dim), np.float32)
    with pytest.raises(FromageError, match="logits"):
        rt.decoder.forward(one, cache, 0, logits[:-1], ret, top=1)
    with pytest.raises(FromageError, match="embeds"):
        rt.decoder.forward(one.astype(np.float64), cache, 0, logits, ret, top=1)
    with pytest.raises(FromageError, match="exceed the cache"):
        rt.decoder.forward(one, cache, native.KV_BLOCK, logits, ret, top=1)


def test_a_step_uses_the_buffers_its_cache_holds_now(exported):
    """The pointer tables a sequence's steps reuse are rebuilt when one of its buffers was replaced (a cache that
    grew): the step writes into the new buffer, not the old one."""
    rt = Fromage(exported["llama"]["bundle"], engine="native")
    state = rt.start(np.ones((1, 3, rt.embed_dim), np.float32))
    one = np.ones((1, 1, rt.embed_dim), np.float32)
    state.top = 1
    rt.advance(state, one)
    step = rt.decoder._one
    rt.advance(state, one)
    assert rt.decoder._one is step  # the last step's arguments, not rebuilt
    old = state.cache[0]
    state.cache[0] = old.copy()
    rt.advance(state, one)
    assert rt.decoder._one is not step
    assert not np.array_equal(native.cache_by_position([state.cache[0], state.cache[1]])[0][:, :, 5],
                              native.cache_by_position([old, state.cache[1]])[0][:, :, 5])
    # a buffer that died is never taken for the one now at its address: its arguments are rebuilt
    step = rt.decoder._one
    state.cache[1] = state.cache[1].copy()
    assert step.buffers.alive is False
    rt.advance(state, one)
    assert rt.decoder._one is not step


def test_a_batch_uses_the_buffers_its_caches_hold_now(exported):
    """A batched call whose caches are the last call's reuses its pointer tables; one whose cache list holds a new
    buffer (a cache that grew), or whose rows are other caches, gets new ones, and writes into the new buffer."""
    rt = Fromage(exported["llama"]["bundle"], engine="native")
    states = [rt.start(np.ones((1, n, rt.embed_dim), np.float32)) for n in (3, 5)]
    dec = rt.decoder
    tables = dec._pointer_tables([s.cache for s in states])
    assert dec._pointer_tables([s.cache for s in states]) == tables  # the same ctypes arrays
    assert dec._pointer_tables([states[1].cache, states[0].cache])[0] is not tables[0]
    old = states[0].cache[0]
    states[0].cache[0] = old.copy()
    k, _ = dec._pointer_tables([s.cache for s in states])
    assert k is not tables[0] and k[0] == states[0].cache[0].ctypes.data
    rt.advance_rows([(s, np.ones((1, rt.embed_dim), np.float32)) for s in states])
    assert not np.array_equal(native.cache_by_position([states[0].cache[0], states[0].cache[1]])[0][:, :, 3],
                              native.cache_by_position([old, states[0].cache[1]])[0][:, :, 3])


def test_token_steps_are_the_advance_of_the_tokens_embedding(exported, monkeypatch):
    """A decoding loop's feed_token runs the native token steps (the embedding's row read in place, the checks done
    once): the same logits, retrieval embedding, best column and cache as advance with the looked-up embedding,
    across a cache that grows (new steps on the new buffers), outputs replaced by a batched call, and a buffer replaced
    by hand; a token id off the table is refused."""
    from fromage.runtime import generate
    monkeypatch.setattr(generate, "MIN_CAPACITY", native.KV_BLOCK)
    rt = Fromage(exported["llama"]["bundle"], engine="native")
    prompt = (np.random.default_rng(5).standard_normal((1, 60, rt.embed_dim)) * 0.5).astype(np.float32)
    a, b = rt.start(prompt), rt.start(prompt)
    a.top = b.top = 1
    tokens = [7, 3, 200, 5, 9, 11, 12, 1]
    for i, token in enumerate(tokens):
        if i == 5:  # outputs replaced by a batched call (the scheduler's)
            rt.advance_rows([(a, rt.embed_ids([4])), (b, rt.embed_ids([4]))])
        if i == 7:  # a buffer replaced by hand
            a.cache[3] = a.cache[3].copy()
        rt.feed_token(a, token)
        rt.advance(b, rt.embed_ids([token])[None])
        assert a.best == b.best and np.array_equal(a.logits, b.logits) and np.array_equal(a.ret_embedding, b.ret_embedding)
        assert all(np.array_equal(x, y) for x, y in zip(a.cache, b.cache))
    assert a.cache[0].shape[2] == 2 * native.KV_BLOCK and a.steps is not None  # grew past 64 positions
    with pytest.raises(FromageError, match="out of range"):
        rt.feed_token(a, rt.embed.table.shape[0])


def test_greedy_steps_give_their_best_column(exported):
    """A greedy step (top 1) returns the column of its largest logit but [RET]'s (the exact column), which the
    runtime rescales before choosing: alone (forward) and batched (forward_batch's best), -1 for other rows."""
    rt = Fromage(exported["llama"]["bundle"], engine="native")
    dec, ret_id = rt.decoder, rt.ret_id
    rng = np.random.default_rng(3)
    states = [rt.start((rng.standard_normal((1, n, rt.embed_dim)) * 0.5).astype(np.float32)) for n in (3, 70)]

    def without_ret(row):
        return int(np.argmax(np.where(np.arange(row.size) == ret_id, -np.inf, row)))
    for state in states:
        state.top = 1
        rt.advance(state, (rng.standard_normal((1, 1, rt.embed_dim)) * 0.5).astype(np.float32))
        assert state.best == without_ret(state.logits) >= 0
    emb = (rng.standard_normal((2, rt.embed_dim)) * 0.5).astype(np.float32)
    logits, ret = np.empty((2, dec.vocab_size), np.float32), np.empty((2, dec.retrieval_dim), np.float32)
    best = np.full(2, 7, np.int32)
    dec.forward_batch(emb, [s.cache for s in states], [s.length for s in states], logits, ret, top=[1, 0], best=best)
    assert best[0] == without_ret(logits[0]) and best[1] == -1
    with pytest.raises(FromageError, match="best"):
        dec.forward_batch(emb, [s.cache for s in states], [s.length + 1 for s in states], logits, ret, top=[1, 1],
                          best=np.empty(2, np.int64))


def test_engine_choice(exported, tmp_path):
    assert native.available() is None, "the native library is built by `pip install -e .`"
    assert Fromage(exported["llama"]["bundle"]).engine == "native"
    assert Fromage(exported["llama"]["bundle"], engine="onnxruntime").engine_note is None
    opt = Fromage(exported["opt"]["bundle"])
    assert opt.engine == "onnxruntime" and "fused" in opt.engine_note
    with pytest.raises(FromageError, match="f16 KV cache needs the native engine, which cannot run this: .*fused"):
        Fromage(exported["opt"]["bundle"], kv_cache="f16")  # auto does not fall back to ONNX Runtime's f32 cache
    with pytest.raises(FromageError, match="native engine cannot run this"):
        Fromage(exported["opt"]["bundle"], engine="native")
    with pytest.raises(FromageError, match="unknown engine"):
        Fromage(exported["llama"]["bundle"], engine="tensorrt-llm")
    # a bundle exported before the native engine existed: ONNX Runtime, and a note saying why
    old = tmp_path / "old"
    shutil.copytree(exported["llama"]["bundle"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["model"]["rms_norm_eps"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    rt = Fromage(old)
    assert rt.engine == "onnxruntime" and "re-export" in rt.engine_note


def test_export_checks_the_native_engine_too(exported):
    manifest = json.loads((exported["llama"]["bundle"] / "manifest.json").read_text())
    assert manifest["parity_max_abs_diff"]["decoder_native"] < 1e-3


def test_threads_are_per_decoder(exported):
    """Each decoder keeps its own thread count, and the count does not change the result by a bit: each
    output column is summed by one thread, and attention merges its blocks in a fixed order."""
    bundle = exported["llama"]["bundle"]
    one, two = Fromage(bundle, engine="native", threads=1), Fromage(bundle, engine="native", threads=2)
    assert (one.decoder.model.threads, two.decoder.model.threads) == (1, 2)
    for (la, ra, _), (lb, rb, _) in zip(_steps(one, [70, 1, 1]), _steps(two, [70, 1, 1])):
        assert np.array_equal(la, lb) and np.array_equal(ra, rb)


def test_embedding_lookup_runs_in_numpy_and_matches_onnxruntime(exported):
    from fromage.engines.gather import GatherTable, gather_table
    from fromage.engines.onnxruntime import OrtSession
    bundle = Fromage(exported["llama"]["bundle"])
    assert isinstance(bundle.embed, GatherTable)  # the bundle's embed.onnx is one Gather
    ids = np.array([[0, 5, bundle.ret_id, 3]], dtype=np.int64)
    ort = OrtSession(bundle.bundle.graph_path("embed"), threads=1)
    assert np.array_equal(bundle.embed.run({"input_ids": ids})[0], ort.run({"input_ids": ids})[0])
    with pytest.raises(FromageError, match="out of range"):
        bundle.embed.run({"input_ids": np.array([[-1]])})
    # the decode loop's lookup: the same rows; one id's is a view of the read-only table
    assert np.array_equal(bundle.embed_ids([0, 5, bundle.ret_id, 3]), ort.run({"input_ids": ids})[0][0])
    row = bundle.embed_ids([5])
    assert np.array_equal(row, ort.run({"input_ids": ids[:, 1:2]})[0][0]) and not row.flags.writeable
    with pytest.raises(FromageError, match="out of range"):
        bundle.embed_ids([bundle.vocab_size + 100])
    assert gather_table(bundle.bundle.graph_path("vision")) is None  # any other graph: ONNX Runtime
