"""The native library runs every OpenMP team on its own decode thread (native/decode_thread.c), whatever thread
calls: calls from several threads take turns on one team, and a forked child decodes."""
import multiprocessing
import os
import threading
from pathlib import Path

import numpy as np

from fromage.runtime.generate import Fromage


def _threads() -> dict:
    """{thread id: name} of this process's threads."""
    tasks = Path("/proc/self/task")
    return {t.name: (t / "comm").read_text().strip() for t in tasks.iterdir()}


def _step(rt, cache_seed: int):
    """One step of the decoder on a random cache of its own at position 40: (logits, ret)."""
    dec, m = rt.decoder, rt.decoder.model
    rng = np.random.default_rng(cache_seed)
    cache = [rng.standard_normal((1, m.n_kv, 64, m.head_dim)).astype(np.float32) for _ in range(2 * m.n_layers)]
    embeds = (rng.standard_normal((1, 1, m.hidden)) * 0.5).astype(np.float32)
    logits, ret = np.zeros(dec.vocab_size, np.float32), np.zeros(dec.retrieval_dim, np.float32)
    dec.forward(embeds, cache, 40, logits, ret)
    return logits, ret


def test_threads_that_call_at_once_take_turns_on_one_team(exported):
    rt = Fromage(exported["llama"]["bundle"], engine="native", threads=2)
    expected = [_step(rt, seed) for seed in range(3)]
    before = _threads()
    team = {tid for tid, name in before.items() if name == "fromage-decode"}
    assert team  # the decode thread, and its team's other thread
    start, done, release, results = threading.Barrier(3), threading.Barrier(4), threading.Event(), {}

    def call(seed):
        start.wait()  # all three call at once
        results[seed] = _step(rt, seed)
        done.wait()
        release.wait()  # alive while the threads are counted

    callers = [threading.Thread(target=call, args=(seed,)) for seed in range(3)]
    for t in callers:
        t.start()
    done.wait()
    during = _threads()
    release.set()
    for t in callers:
        t.join()
    # no team for any calling thread: only the three callers are new, and the decode team is the same
    assert len(during) == len(before) + 3
    assert {tid for tid, name in during.items() if name == "fromage-decode"} == team
    for seed, (logits, ret) in enumerate(expected):
        assert np.array_equal(results[seed][0], logits) and np.array_equal(results[seed][1], ret)


def _child(bundle, queue):
    queue.put(_step(Fromage(bundle, engine="native", threads=2), 0))


def _team() -> set:
    return {tid for tid, name in _threads().items() if name == "fromage-decode"}


def test_a_forked_child_decodes(exported):
    """A child forked after the parent decoded has no copy of the parent's threads: it starts its own
    (a team started by the calling thread itself would wait for them forever). The decode thread's team ends
    before the fork (libgomp in the child would count its threads and spin too briefly), and the parent's next
    call starts another."""
    bundle = exported["llama"]["bundle"]
    rt = Fromage(bundle, engine="native", threads=2)
    expected = _step(rt, 0)
    team = _team()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(bundle, queue))
    child.start()
    try:
        logits, ret = queue.get(timeout=60)
    finally:
        child.kill() if child.is_alive() and os.name == "posix" else None
        child.join()
    assert np.array_equal(logits, expected[0]) and np.array_equal(ret, expected[1])
    again = _step(rt, 0)
    assert np.array_equal(again[0], expected[0])
    after = _team()
    assert len(after) == len(team) == 2 and len(after & team) == 1  # the decode thread, and a new team thread


def test_threads_that_generate_at_once_get_their_answers_alone(exported):
    from fromage.runtime.sampling import SamplingParams
    rt = Fromage(exported["llama"]["bundle"], engine="native", threads=2)
    prompts = ["a photo of", "the cat sat on", "one two three four"]
    params = SamplingParams(max_new_tokens=24, temperature=0.0, stop_ids=[], retrieval=False)
    alone = [rt.generate([p], params).token_ids for p in prompts]
    start, answers = threading.Barrier(len(prompts)), {}

    def ask(i):
        start.wait()
        answers[i] = rt.generate([prompts[i]], params).token_ids

    askers = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in askers:
        t.start()
    for t in askers:
        t.join()
    assert [answers[i] for i in range(len(prompts))] == alone and all(len(a) == 24 for a in alone)
