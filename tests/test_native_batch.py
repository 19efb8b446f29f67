"""The native decoder's batched step (NativeDecoder.forward_batch, fm_forward_batch): B sequences of
different lengths and cache capacities advanced together give, bit for bit, what each one's own step
gives; on an fp32 bundle and a 4-bit one (4-bit layers, 8-bit head)."""
import numpy as np
import pytest

from fromage.engines.native import NBITS, cache_by_position
from fromage.runtime.errors import FromageError
from fromage.runtime.generate import Fromage

LENGTHS = [3, 59, 62, 80]        # prompts; the third crosses an attention block (64) while stepping
CAPACITIES = [64, 64, 128, 128]  # each sequence's own (multiples of the cache block); the second filled
STEPS = 5


@pytest.fixture(scope="module")
def int4_bundle(assets, tmp_path_factory):
    from conftest import build_model
    from test_quantize import _snap_to_gguf_grids
    from fromage.export.bundle_writer import write_bundle
    model = build_model(assets, "llama", k=2)
    _snap_to_gguf_grids(model)
    path = tmp_path_factory.mktemp("int4") / "bundle"
    write_bundle(model, path, quantize="int4", log=lambda *_: None)
    return path


def _states(rt, rng):
    """Prefilled states, each cache cut down to its capacity in CAPACITIES."""
    states = []
    for n, capacity in zip(LENGTHS, CAPACITIES):
        state = rt.start((rng.standard_normal((1, n, rt.embed_dim)) * 0.5).astype(np.float32))
        state.cache = [np.ascontiguousarray(rt.decoder.first_positions(c, capacity)) for c in state.cache]
        states.append(state)
    return states


def _batch_matches_solo(rt):
    rng = np.random.default_rng(0)
    batch = _states(rt, rng)
    solo = [s.fork() for s in batch]
    B = len(batch)
    logits = np.zeros((B, rt.vocab_size), np.float32)
    ret = np.zeros((B, rt.retrieval_dim), np.float32)
    for _ in range(STEPS):
        emb = (rng.standard_normal((B, rt.embed_dim)) * 0.5).astype(np.float32)
        rt.decoder.forward_batch(emb, [s.cache for s in batch], [s.length for s in batch], logits, ret)
        for b, s in enumerate(solo):
            rt.advance(s, emb[b][None, None])
            batch[b].length += 1
            assert s.cache[0].shape[2] == CAPACITIES[b]  # not grown: the same buffers' sizes as the batch's
            assert np.array_equal(logits[b], s.logits) and np.array_equal(ret[b], s.ret_embedding)
            assert all(np.array_equal(x, y) for x, y in zip(batch[b].cache, s.cache))
    return batch


def test_batch_is_bit_identical_to_single_steps(exported):
    _batch_matches_solo(Fromage(exported["llama"]["bundle"], engine="native", threads=2))


def test_batch_is_bit_identical_to_single_steps_f16_cache(exported):
    """An fp16 KV cache (kv_cache="f16"): the same, its halves compared bit for bit."""
    batch = _batch_matches_solo(Fromage(exported["llama"]["bundle"], engine="native", threads=2, kv_cache="f16"))
    assert all(c.dtype == np.float16 for s in batch for c in s.cache)


def test_batch_is_bit_identical_to_single_steps_4bit(int4_bundle):
    rt = Fromage(int4_bundle, engine="native", threads=2)
    assert any(lin.kind == NBITS for lin in rt.decoder._linears.values()), "the bundle's layers are 4-bit blocks"
    _batch_matches_solo(rt)


def test_batch_of_one_and_odd_sizes(exported):
    """Each row group size of the kernels (1, 2, 3 rows and their mixes) against single steps."""
    rt = Fromage(exported["llama"]["bundle"], engine="native", threads=2)
    rng = np.random.default_rng(1)
    for B in (1, 2, 3, 5):
        states = [rt.start((rng.standard_normal((1, 4 + 9 * b, rt.embed_dim)) * 0.5).astype(np.float32))
                  for b in range(B)]
        solo = [s.fork() for s in states]
        emb = (rng.standard_normal((B, rt.embed_dim)) * 0.5).astype(np.float32)
        logits, ret = np.zeros((B, rt.vocab_size), np.float32), np.zeros((B, rt.retrieval_dim), np.float32)
        rt.decoder.forward_batch(emb, [s.cache for s in states], [s.length for s in states], logits, ret)
        for b, s in enumerate(solo):
            rt.advance(s, emb[b][None, None])
            assert np.array_equal(logits[b], s.logits) and np.array_equal(ret[b], s.ret_embedding)


def test_outputs_for_some_rows_only(exported):
    """out_rows: the head runs for the listed rows only (a prompt's inner positions need no logits), their
    outputs bit-identical to single steps; the other rows still write their caches."""
    rt = Fromage(exported["llama"]["bundle"], engine="native", threads=2)
    rng = np.random.default_rng(3)
    states = [rt.start((rng.standard_normal((1, 3 + 5 * b, rt.embed_dim)) * 0.5).astype(np.float32)) for b in range(4)]
    solo = [s.fork() for s in states]
    emb = (rng.standard_normal((4, rt.embed_dim)) * 0.5).astype(np.float32)
    logits, ret = np.zeros((2, rt.vocab_size), np.float32), np.zeros((2, rt.retrieval_dim), np.float32)
    rt.decoder.forward_batch(emb, [s.cache for s in states], [s.length for s in states], logits, ret, out_rows=[1, 3])
    for b, s in enumerate(solo):
        rt.advance(s, emb[b][None, None])
        assert all(np.array_equal(x[:, :, :s.length], y[:, :, :s.length])
                   for x, y in zip(cache_by_position(states[b].cache), cache_by_position(s.cache)))
    for i, b in enumerate((1, 3)):
        assert np.array_equal(logits[i], solo[b].logits) and np.array_equal(ret[i], solo[b].ret_embedding)
    with pytest.raises(FromageError, match="out_rows"):
        rt.decoder.forward_batch(emb, [s.cache for s in states], [s.length for s in states], logits, ret, out_rows=[3, 1])


def test_batch_refuses_a_full_cache_and_bad_shapes(exported):
    rt = Fromage(exported["llama"]["bundle"], engine="native")
    batch = _states(rt, np.random.default_rng(2))
    batch[0].length = CAPACITIES[0]  # full: one more position does not fit
    caches, pasts = [s.cache for s in batch], [s.length for s in batch]
    B = len(batch)
    emb = np.zeros((B, rt.embed_dim), np.float32)
    logits, ret = np.zeros((B, rt.vocab_size), np.float32), np.zeros((B, rt.retrieval_dim), np.float32)
    with pytest.raises(FromageError, match="sequence 0: 64 \\+ 1 positions exceed its cache"):
        rt.decoder.forward_batch(emb, caches, pasts, logits, ret)
    pasts[0] = 0
    with pytest.raises(FromageError, match="embeds"):
        rt.decoder.forward_batch(emb[:-1], caches, pasts, logits, ret)
    with pytest.raises(FromageError, match="logits"):
        rt.decoder.forward_batch(emb, caches, pasts, logits[:-1], ret)
    with pytest.raises(FromageError, match="KV cache"):
        rt.decoder.forward_batch(emb, caches[:-1] + [caches[-1][:-1]], pasts, logits, ret)
    frozen = [c.copy() for c in caches[0]]
    frozen[3].flags.writeable = False  # the C code writes every cache it is given
    with pytest.raises(FromageError, match="KV cache"):
        rt.decoder.forward_batch(emb, [frozen] + caches[1:], pasts, logits, ret)
    with pytest.raises(FromageError, match="same position"):
        rt.decoder.forward_batch(emb, caches[:-1] + [caches[0]], pasts[:-1] + [pasts[0]], logits, ret)
    rt.decoder.forward_batch(emb, caches, pasts, logits, ret)  # all fit now


def test_rows_asking_for_their_top_logits_get_the_full_heads(exported):
    """Output rows asking for their k largest logits (1: greedy; k: top-k sampling) read the fp32 head's 8-bit
    copy and compute exactly only the logits that can be among them: those, and [RET]'s always, are the full
    head's bits, and every logit at least the k-th largest besides [RET]'s is there (the runtime rescales or bans
    [RET] before choosing); rows asking for all (0) are untouched."""
    rt = Fromage(exported["llama"]["bundle"], engine="native", threads=2)
    assert rt.decoder.head_top_bytes  # an fp32 head: its 8-bit copy was built
    rng = np.random.default_rng(1)
    batch = _states(rt, rng)
    B, V, ret_id = len(batch), rt.vocab_size, rt.ret_id
    full, part = np.zeros((B, V), np.float32), np.zeros((B, V), np.float32)
    ret = np.zeros((B, rt.retrieval_dim), np.float32)
    for step in range(STEPS):
        top = [[1, 0, 1, 1], [5, 1, 0, 40]][step % 2]
        emb = (rng.standard_normal((B, rt.embed_dim)) * 0.5).astype(np.float32)
        caches, positions = [s.cache for s in batch], [s.length for s in batch]
        rt.decoder.forward_batch(emb, caches, positions, full, ret)
        rt.decoder.forward_batch(emb, caches, positions, part, ret, top=top)  # the same cache writes again
        for b, s in enumerate(batch):
            computed = np.isfinite(part[b])
            assert computed[ret_id] and np.array_equal(part[b][computed], full[b][computed])
            assert computed.all() or top[b]
            if top[b]:
                kth = np.sort(np.delete(full[b], ret_id))[-top[b]]
                assert computed[full[b] >= kth].all()
            s.length += 1
    with pytest.raises(FromageError, match="top must have"):
        rt.decoder.forward_batch(emb, caches, positions, part, ret, top=[1, 1])
