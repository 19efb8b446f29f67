"""Sampling: top-k / top-p restrict to exactly the reference sets, without a full sort."""
import numpy as np

from fromage.runtime.sampling import SamplingParams, sample


def _nucleus(x, top_p):
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    return set(order[: int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)].tolist())


def test_top_p_and_top_k_sample_exactly_their_sets():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(5000) * 4
    x[17] = -np.inf  # a banned token ([RET] when retrieval is off) is never drawn
    for top_p in (0.3, 0.9, 0.9999):
        want = _nucleus(np.where(np.isfinite(x), x, -1e300), top_p)
        got = {sample(x, SamplingParams(temperature=1.0, top_p=top_p), rng) for _ in range(4000)}
        assert got <= want and set(np.argsort(-x)[:3].tolist()) <= got, top_p
    got = {sample(x, SamplingParams(temperature=1.0, top_k=4), rng) for _ in range(500)}
    assert got == set(np.argsort(-x)[:4].tolist())
    assert sample(x, SamplingParams(temperature=0.0), rng) == int(np.argmax(x))
    assert all(sample(x, SamplingParams(temperature=2.0), rng) != 17 for _ in range(200))


def test_text_stream_emits_what_a_full_decode_gives():
    from conftest import make_tokenizer
    from fromage.runtime.generate import _TextStream
    tok = make_tokenizer("<s>").backend_tokenizer
    ids = tok.encode("a red cat with a big blue dog on the moon", add_special_tokens=False).ids
    stream = _TextStream(tok)
    deltas = [stream.push(i) for i in ids]
    # each step shows exactly what the growing full decode adds
    assert deltas == [tok.decode(ids[:n + 1])[len(tok.decode(ids[:n])):] for n in range(len(ids))]
    stream.reset()
    assert "".join(stream.push(i) for i in ids[3:]) == tok.decode(ids[3:])
