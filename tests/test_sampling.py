"""Sampling: top-k / top-p restrict to exactly the reference sets, without a full sort."""
import numpy as np
import pytest

from fromage.runtime.sampling import SamplingParams, sample, top_logits


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


def test_greedy_with_the_engines_best_column_is_argmax():
    """sample(best=, exact=): best is the largest logit's column but [RET]'s, whose logit the runtime rescaled
    after the engine wrote them; the choice is np.argmax's, ties (the lower id) included."""
    rng = np.random.default_rng(2)
    greedy = SamplingParams(temperature=0.0)
    for trial in range(300):
        x = np.round(rng.standard_normal(50) * 2).astype(np.float32)  # whole numbers: many ties
        exact = int(rng.integers(50))
        rest = np.where(np.arange(50) == exact, -np.inf, x)
        best = int(np.argmax(rest))
        x[exact] = [x[best], -np.inf, x[best] + 1, x[best] - 1][trial % 4]  # tied, banned, above, below
        assert sample(x, greedy, rng, best, exact) == int(np.argmax(x)), trial


def test_top_k_draws_the_same_whether_the_rest_of_the_logits_are_given_or_not():
    """An engine may give only a row's top_logits largest logits exactly and -inf for the rest (the native
    engine's 8-bit head copy): seeded top-k (and top-k + top-p) draws are the same either way, ties included."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(3000) * 3).astype(np.float32)
    x[[5, 900, 2500]] = x.max() - 0.5  # ties among the top ones
    for p in (SamplingParams(temperature=0.8, top_k=4), SamplingParams(temperature=1.3, top_k=40, top_p=0.9),
              SamplingParams(temperature=1.0, top_k=2)):
        k = top_logits(p)
        kept = x >= np.sort(x)[-k]  # the k largest and every logit tied with them, as the engine keeps them
        partial = np.where(kept, x, -np.inf).astype(np.float32)
        for seed in range(200):
            assert sample(x, p, np.random.default_rng(seed)) == sample(partial, p, np.random.default_rng(seed))
    assert top_logits(SamplingParams()) == 1 and top_logits(SamplingParams(temperature=1.0)) == 0


def test_text_stream_emits_what_a_full_decode_gives():
    from conftest import make_tokenizer
    from fromage.runtime.detokenize import TextStream, token_bytes
    tok = make_tokenizer("<s>").backend_tokenizer
    ids = tok.encode("a red cat with a big blue dog on the moon", add_special_tokens=False).ids
    stream = TextStream(tok, token_bytes(tok))
    assert stream.table is not None  # a byte-level tokenizer: read through its table of bytes
    deltas = [stream.push(i) for i in ids]
    # each step shows exactly what the growing full decode adds
    assert deltas == [tok.decode(ids[:n + 1])[len(tok.decode(ids[:n])):] for n in range(len(ids))]
    stream.reset()
    assert "".join(stream.push(i) for i in ids[3:]) == tok.decode(ids[3:])


@pytest.mark.parametrize("decoder", ["byte_level", "sequence", "metaspace"])
def test_text_stream_matches_decode_stream(decoder):
    """Random token ids (half UTF-8 characters, special tokens, a ByteFallback piece) give DecodeStream's deltas,
    through the table of bytes where the decoder is byte-wise and through DecodeStream where it is not."""
    import random
    from conftest import make_tokenizer
    from tokenizers import AddedToken, decoders
    from tokenizers.decoders import DecodeStream
    from fromage.runtime.detokenize import TextStream, token_bytes
    tok = make_tokenizer("<s>").backend_tokenizer
    tok.add_tokens(["<0x41>", AddedToken("[RET]", special=False)])
    tok.decoder = {"byte_level": decoders.ByteLevel(),
                   "sequence": decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(),
                                                  decoders.Replace("▁", " "), decoders.ByteLevel()]),
                   "metaspace": decoders.Metaspace()}[decoder]
    rnd = random.Random(0)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    for _ in range(20):
        ids = [rnd.randrange(vocab) for _ in range(60)]
        ours, theirs = TextStream(tok, token_bytes(tok)), DecodeStream(skip_special_tokens=True)
        assert (ours.table is None) == (decoder == "metaspace")
        assert [ours.push(i) for i in ids] == [theirs.step(tok, i) or "" for i in ids]


class _Tokens:
    """A tokenizer and model stub for Sequence: token i is the string WORDS[i]; 9 is [RET]."""
    WORDS = ["a", " kangaroo", ".", " is", " big", "Q", ":", "\n", "x", ""]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.WORDS[i] for i in ids)


def _sequence(stop):
    from types import SimpleNamespace
    from fromage.runtime.generate import Result, Sequence
    from fromage.runtime.sampling import SamplingParams
    model = SimpleNamespace(ret_id=9, bundle=SimpleNamespace(tokens={"stop": []}), index=object(), tokenizer=_Tokens(),
                            token_bytes=None)
    result = Result()
    return Sequence(model, SamplingParams(stop=stop), result), result


def _feed(seq, result, tokens):
    from fromage.runtime.retrieval import Hit
    events = []
    for t in tokens:
        if seq.done:  # next_token ends the generation here
            break
        result.token_ids.append(t)
        events += seq.on_token(t, hits=[Hit(1, "k.png", None, 0.5)] if t == 9 else None)
    return events + seq.finish()


def test_text_held_for_stop_strings_is_said_once():
    """A two-character stop string holds one character back: it comes out once, before an image and
    before an echo that ends the answer (it was doubled before an image, and lost at an echo)."""
    seq, result = _sequence(("\n", "Q:"))
    _feed(seq, result, [0, 1, 2, 9, 1, 3, 4])  # "a kangaroo." [RET] " kangaroo is big"
    texts = [p["text"] for p in result.parts if p["type"] == "text"]
    assert texts == ["a kangaroo.", " kangaroo is big"]
    seq, result = _sequence(("\n", "Q:"))
    _feed(seq, result, [0, 1, 2, 9, 0, 1, 2])  # the answer said again after the image: dropped
    assert [p["type"] for p in result.parts] == ["text", "image"] and result.parts[0]["text"] == "a kangaroo."
    seq, result = _sequence(())
    _feed(seq, result, [0, 1, 2, 9, 1, 3, 0, 1, 2])  # " kangaroo is" then "a kangaroo." again: the sentence dropped
    assert [p["type"] for p in result.parts] == ["text", "image"] and result.parts[0]["text"] == "a kangaroo."
    seq, result = _sequence(())
    events = _feed(seq, result, [0, 1, 2, 9, 3, 4, 2, 1, 3])  # a sentence after the image comes out when it ends
    assert [p["text"] for p in result.parts if p["type"] == "text"] == ["a kangaroo.", " is big. kangaroo is"]
    assert [e.text for e in events if hasattr(e, "text")][-2:] == [" is big.", " kangaroo is"]
    seq, result = _sequence(())
    _feed(seq, result, [0, 1, 2, 9, 0, 9, 3, 4])  # "a" may start an echo, then a second [RET]: it comes first
    assert [p["type"] for p in result.parts] == ["text", "image", "text", "image", "text"]
    assert [p["text"] for p in result.parts if p["type"] == "text"] == ["a kangaroo.", "a", " is big"]
    seq, result = _sequence(("\n", "Q:"))
    _feed(seq, result, [0, 1, 2, 5, 6, 8])  # the model starts the next question itself
    assert result.parts[0]["text"] == "a kangaroo." and result.stop_reason == "stop"


def test_a_sequence_ends_where_echo_run_says():
    """Sequence indexes the answer once per [RET]; it ends on the same token as echo_run on the whole list."""
    import random
    from fromage.runtime.generate import Sequence
    rng = random.Random(1)
    for _ in range(300):
        seq, result = _sequence(())
        ids = [rng.choice([0, 1, 2, 3, 4, 8, 9]) for _ in range(rng.randrange(1, 20))]
        _feed(seq, result, ids)
        ended = next((i + 1 for i in range(len(ids)) if Sequence.echo_run(ids[:i + 1], 9) >= Sequence.ECHO_TOKENS),
                     None)
        assert (result.token_ids == ids[:ended]) if ended else (not seq.done and result.token_ids == ids)
