"""Continuous batching (runtime/scheduler.py): every request gets exactly what it gets alone, requests join
and leave between steps, chunked prompts, [RET] inside the batch, cancellation, the queue limit."""
import threading

import numpy as np
import pytest

from fromage.runtime.errors import FromageError
from fromage.runtime.generate import Fromage, ImageEvent
from fromage.runtime.prompt import ImagePart
from fromage.runtime.sampling import SamplingParams
from fromage.runtime.scheduler import Finished, QueueFull, Scheduler

WORDS = "a red cat on the big blue boat with the small dog in the house of the moon".split()


def _prompts(n, rng):
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 12)))) for _ in range(n)]


@pytest.fixture(scope="module", params=["native", "native-f16", "onnxruntime"])
def model(exported, request):
    engine, _, kv = request.param.partition("-")
    return Fromage(exported["llama"]["bundle"], index=exported["llama"]["index"], engine=engine, kv_cache=kv or "f32")


def _requests(assets):
    rng = np.random.default_rng(0)
    prompts = [[p] for p in _prompts(10, rng)]
    prompts[3] = [ImagePart(assets["images"][0]), "a picture of"]  # an image in the batch
    prompts[7] = [" ".join(WORDS * 2)]  # a longer prompt, fed in pieces while others decode
    params = [SamplingParams(max_new_tokens=int(n), temperature=0.0, ret_scale_factor=3.0, top_images=2)
              for n in rng.integers(3, 20, size=len(prompts))]
    params[5] = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7)  # seeded sampling too
    return prompts, params


def _run(model, prompts, params, **kw):
    sched = Scheduler(model, **kw)
    try:
        reqs = [sched.submit(p, sp) for p, sp in zip(prompts, params)]
        return [[e for e in r][-1].result for r in reqs]
    finally:
        sched.close()


def test_batched_requests_equal_their_outputs_alone(model, assets):
    """Alone (batch 1, whole prompts) or four at a time with prompts cut in pieces: the same tokens,
    text and images, bit for bit on the native engine's logits."""
    prompts, params = _requests(assets)
    alone = [_run(model, [p], [sp], max_batch=1)[0] for p, sp in zip(prompts, params)]
    batched = _run(model, prompts, params, max_batch=4, max_prompt_chunk=3)
    trickled = _run(model, prompts, params, max_batch=4, max_prompt_chunk=3, prefill_rows=2)  # prompts 2 rows a step
    for a, b, c in zip(batched, alone, trickled):
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.parts == b.parts and a.stop_reason == b.stop_reason == c.stop_reason
        # ONNX Runtime feeds each piece as a prefill, whose rounding depends on the piece's length
        assert a.parts == c.parts or model.engine == "onnxruntime"
    assert any(p["type"] == "image" for r in batched for p in r.parts), "no [RET] was exercised"
    # against Fromage.generate, whose prefill rounds differently: on ONNX Runtime it is the same loop
    solo = [model.generate(p, sp) for p, sp in zip(prompts, params)]
    agree = sum(a.token_ids == b.token_ids for a, b in zip(batched, solo))
    assert agree == len(solo) if model.engine == "onnxruntime" else agree >= len(solo) - 1


def test_requests_with_the_same_settings_leave_in_any_order(model):
    """A server's requests usually share their settings: one admitted later leaves (here: cancelled)
    while the earlier ones run on, and is found in the batch by identity, not by comparing fields."""
    params = SamplingParams(max_new_tokens=48, temperature=0.0, retrieval=False, stop_ids=[])
    sched = Scheduler(model, max_batch=3)
    try:
        reqs = [sched.submit([prompt], params) for prompt in ("a red cat", "the big blue boat", "a dog")]
        reqs[1].cancel()  # long before its 48 tokens: it leaves while the first request runs on
        results = [[e for e in r][-1] for r in reqs]
    finally:
        sched.close()
    assert [f.result.stop_reason for f in results] == ["length", "cancelled", "length"]
    assert not any(f.error for f in results)


def test_bad_limits_are_refused(model):
    with pytest.raises(FromageError, match="prefill_rows"):
        Scheduler(model, prefill_rows=0)


def test_threads_submitting_at_once(model):
    rng = np.random.default_rng(1)
    prompts = _prompts(8, rng)
    params = SamplingParams(max_new_tokens=6, retrieval=False)
    solo = {p: _run(model, [[p]], [params], max_batch=1)[0].token_ids for p in prompts}
    sched = Scheduler(model, max_batch=3)
    out = {}
    try:
        threads = [threading.Thread(target=lambda p=p: out.__setitem__(p, sched.generate([p], params).token_ids))
                   for p in prompts]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        sched.close()
    assert out == solo


def test_cancel_frees_the_slot_and_full_queue_refuses(model, monkeypatch):
    # the scheduler's steps wait until the test has looked at the running slot: on a loaded machine the request could
    # otherwise finish its 60 tokens before the test thread runs again
    stepping, release, calls = threading.Event(), threading.Event(), []
    advance_rows = model.advance_rows

    def held(rows):
        calls.append(len(rows))
        if len(calls) > 1:  # a decoding step: the prompt's call has filled the cache
            stepping.set()
            release.wait(60)
        advance_rows(rows)

    monkeypatch.setattr(model, "advance_rows", held)
    sched = Scheduler(model, max_batch=1, max_queue=1)
    try:
        long = sched.submit(["a cat"], SamplingParams(max_new_tokens=60, retrieval=False, stop_ids=[]))
        events = iter(long)
        assert stepping.wait(60)  # it is decoding, and its step waits
        running, _ = sched.cache_bytes
        assert running == sum(c.nbytes for c in sched.running[0].state.cache) > 0
        queued = sched.submit(["a dog"], SamplingParams(max_new_tokens=2, retrieval=False))
        with pytest.raises(QueueFull):
            sched.submit(["a boat"], SamplingParams(max_new_tokens=2))
        long.cancel()
        release.set()
        last = [e for e in events][-1]
        assert isinstance(last, Finished) and last.result.stop_reason == "cancelled"
        assert [e for e in queued][-1].result.stop_reason in ("stop", "length")
        assert sched.counts == (0, 0) and sched.cache_bytes[0] == 0
    finally:
        release.set()
        sched.close()


def test_stop_strings_cut_the_text(model):
    params = SamplingParams(max_new_tokens=30, retrieval=False, stop_ids=[])
    full = model.generate(["the cat"], params)
    text = "".join(p["text"] for p in full.parts if p["type"] == "text")
    if len(text) < 6:
        pytest.skip("the tiny model said too little to cut")
    stop = text[3:6]
    cut = model.generate(["the cat"], SamplingParams(max_new_tokens=30, retrieval=False, stop_ids=[], stop=[stop]))
    assert cut.stop_reason == "stop"
    assert "".join(p["text"] for p in cut.parts) == text[:text.index(stop)]


def test_ret_in_a_batch_searches_once_per_step(model, monkeypatch):
    calls = []
    search = model.index.search_batch
    monkeypatch.setattr(model.index, "search_batch", lambda q, k: calls.append(len(q)) or search(q, k))
    sched = Scheduler(model, max_batch=4)
    params = SamplingParams(max_new_tokens=4, ret_scale_factor=50.0, min_word_tokens=1)
    try:
        reqs = [sched.submit([p], params) for p in ("a cat", "a dog", "a boat", "a sun")]
        events = [[e for e in r] for r in reqs]
    finally:
        sched.close()
    assert all(any(isinstance(e, ImageEvent) for e in ev) for ev in events)
    assert max(calls) > 1  # several [RET]s of one step searched together


def test_rows_deep_in_a_long_prompt_count_for_more():
    """Beside decoding requests a call takes prompt rows worth prefill_rows: near a prompt's start one row
    each, deep in a long one fewer (their attention), and always at least one row so the prompt goes on."""
    from fromage.runtime.scheduler import _Slot, Request, row_cost

    def pieces(fed, prefill_rows=8, length=3000):
        sched = Scheduler.__new__(Scheduler)  # no thread, no model: the choice of rows alone
        sched.prefill_rows, sched.max_prompt_chunk, sched.max_batch = prefill_rows, 64, 4
        slot = _Slot(Request(SamplingParams(), np.zeros((1, length, 4), np.float32), None))
        slot.fed, sched.running = fed, [slot]
        return [n for _, n in sched._prompt_pieces(decoding=4)]
    assert pieces(0) == [8] and pieces(2996) == [3] and pieces(2999) == [1]
    assert row_cost(100) == 1.0 and 1.8 < row_cost(2000) < 1.9
    assert pieces(1800) == [int(8 // row_cost(1803))]
    assert pieces(2500, prefill_rows=1) == [1]


def test_prompts_that_end_in_the_call_take_the_empty_slots_rows():
    """A call is filled up to a full batch's rows with the prompt rows: a prompt that ends in it may take
    prefill_rows and the empty slots' rows (it decodes from the next step); one that does not gets
    prefill_rows or the empty slots' rows, whichever is more."""
    from fromage.runtime.scheduler import _Slot, Request

    def pieces(lengths, decoding, max_batch=16):
        sched = Scheduler.__new__(Scheduler)
        sched.prefill_rows, sched.max_prompt_chunk, sched.max_batch = 8, 64, max_batch
        sched.running = [_Slot(Request(SamplingParams(), np.zeros((1, n, 4), np.float32), None)) for n in lengths]
        return [n for _, n in sched._prompt_pieces(decoding=decoding)]
    assert pieces([7, 7, 7, 7], decoding=4) == [7, 7]      # 8 + 12 empty slots' rows: two prompts end
    assert pieces([7, 7, 7, 7], decoding=15) == [7, 1]     # a nearly full batch: about prefill_rows
    assert pieces([7, 7], decoding=16) == [7, 1]
    assert pieces([30], decoding=4) == [12]                # it cannot end here: the 12 empty slots' rows
    assert pieces([30], decoding=12) == [8]                # or prefill_rows, where that is more
    assert pieces([19, 7], decoding=4) == [7, 5]           # the shortest first; the other the share's rest
    assert pieces([7] * 12, decoding=0) == [7] * 9 + [1]   # none decoding: max_prompt_chunk rows
