"""Prefix caching (runtime/prefix_cache.py): a prompt that starts as a recent one is fed from where they
part, and gives the same outputs as without the cache; entries are kept within their memory budget."""
import numpy as np
import pytest

from fromage.runtime import prefix_cache
from fromage.runtime.chat import chat_prompt
from fromage.runtime.generate import Fromage
from fromage.runtime.prefix_cache import PrefixCache
from fromage.runtime.prompt import ImagePart
from fromage.runtime.sampling import SamplingParams
from fromage.runtime.scheduler import Scheduler

SYSTEM = "You answer in short sentences about the big blue boat and the small red cat in the house."


@pytest.fixture(scope="module", params=[("llama", "native"), ("llama", "onnxruntime"), ("opt", "onnxruntime")])
def model(exported, request):
    """The fused Llama decoder on both engines (caches of a capacity, in place) and the generic OPT one (caches
    that grow by concatenation)."""
    arch, engine = request.param
    return Fromage(exported[arch]["bundle"], index=exported[arch]["index"], engine=engine)


def _conversation(assets):
    """Prompts that share beginnings: a system prompt, a chat's second turn, the same image again."""
    image = ImagePart(assets["images"][0])
    first = [("system", [SYSTEM]), ("user", ["where is the cat?"])]
    return [chat_prompt(first),
            chat_prompt([("system", [SYSTEM]), ("user", ["and the dog?"])]),
            chat_prompt(first + [("assistant", ["on the boat."]), ("user", ["why?"])]),
            [image, "a picture of the moon"],
            [image, "a picture of a cat"]]


def _results(model, prompts, params, **kw):
    sched = Scheduler(model, max_batch=1, **kw)  # one at a time: each prompt is cached before the next starts
    try:
        return [sched.generate(p, params) for p in prompts]
    finally:
        sched.close()


def test_hits_give_the_same_outputs(model, assets):
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ret_scale_factor=3.0)
    prompts = _conversation(assets)
    cold = _results(model, prompts, params, prefix_cache_bytes=0)
    warm = _results(model, prompts, params)
    for c, w in zip(cold, warm):
        assert c.token_ids == w.token_ids
        # the native engine computes a row the same however the prompt was cut: the same bits
        assert c.parts == w.parts or model.engine == "onnxruntime"
    cached = [r.cached_positions for r in warm]
    assert cached[0] == 0 and all(c.cached_positions == 0 for c in cold)
    assert cached[1] > len(model.tokenizer.encode(SYSTEM)) - 2  # the system prompt, not its question
    assert cached[2] == len(warm[0].prompt_token_ids)  # the whole first turn
    assert cached[4] >= model.k  # the image's visual tokens


def test_entries_stay_within_their_budget(model):
    embeds = model.prompt_embeds(model.segments([" ".join(["the boat"] * 20)]))[0]
    state = _fed(model, embeds)
    one = PrefixCache(model, 1 << 40)
    one.store(embeds, state)
    size = one.bytes
    tiny = PrefixCache(model, size - 1)
    tiny.store(embeds, state)  # larger than the whole budget: not kept
    assert not tiny.entries and tiny.bytes == 0
    cache = PrefixCache(model, int(size * 2.5))
    for i in range(5):  # different prompts: at most two fit
        cache.store(embeds + i, state)
    assert len(cache.entries) == 2 and cache.bytes <= cache.max_bytes
    cache.store(embeds[:10] + 4, state)  # a prefix of a kept prompt: nothing new
    assert len(cache.entries) == 2
    longer = np.concatenate([embeds + 4, embeds[:3]])
    cache.store(longer, _fed(model, longer))  # extends a kept prompt: replaces it
    assert len(cache.entries) == 2 and any(len(e.embeds) == len(longer) for e in cache.entries.values())


def _fed(model, embeds):
    state = model.new_state()
    model.advance(state, embeds[None])
    return state


def test_rows_are_compared_not_only_their_prints(model, monkeypatch):
    """Two prompts whose fingerprints agree everywhere share only the rows that are really equal."""
    monkeypatch.setattr(prefix_cache, "fingerprints", lambda e: np.zeros(len(e), np.uint64))
    embeds = model.prompt_embeds(model.segments(["a red cat on the big blue boat with the small dog in the house"]))[0]
    cache = PrefixCache(model, 1 << 30)
    cache.store(embeds, _fed(model, embeds))
    other = embeds.copy()
    other[10:] += 1.0
    state, shared = cache.start(other)
    assert shared == 10 and state.length == 10


def test_a_finished_answer_is_kept_with_its_prompt(model):
    """A chat's next turn re-sends the answer: the prompt is kept with the tokens fed after it, and a
    prompt that goes on from there continues from the cached state as it would from scratch."""
    params = SamplingParams(max_new_tokens=6, temperature=0.0, retrieval=False, stop_ids=[])
    sched = Scheduler(model, max_batch=1)
    try:
        first = sched.generate(chat_prompt([("system", [SYSTEM]), ("user", ["where is the cat?"])]), params)
        sched.generate(["a red cat"], params)  # by its end the first answer is stored (after its Finished event)
        entries = list(sched.prefixes.entries.values())
    finally:
        sched.close()
    kept = max(entries, key=lambda e: len(e.embeds))
    fed = len(first.token_ids) - 1  # the last token is chosen, never fed
    assert len(kept.embeds) == len(first.prompt_token_ids) + fed
    assert np.array_equal(kept.embeds[-fed:], model.embed_ids(first.token_ids[:fed]))
    more = np.concatenate([kept.embeds, model.embed_ids([5, 6, 7])])
    state, shared = sched.prefixes.start(more)
    assert shared == len(kept.embeds)
    model.advance(state, more[None, shared:])
    scratch = model.start(more[None])
    assert np.array_equal(state.logits, scratch.logits) or model.engine == "onnxruntime"
    np.testing.assert_allclose(state.logits, scratch.logits, atol=1e-4)
