"""Scoring with a loaded bundle (numpy only): [RET] retrieval embeddings of texts or interleaved
contexts, and log-likelihoods of candidate continuations.

- `ret_embeddings_of_parts`: the prompt is the parts followed by the [RET] token, laid out exactly as in
  decoding (`Fromage.segments`: the tokenizer's prefix, then the parts; each image k visual tokens).
  The embedding is the decoder's normalised `W_t` output at the [RET] position: the same vector the
  decode loop uses as the query when the model itself emits [RET]. No truncation is applied
  (training truncates captions to 23 tokens before [RET]). `ret_embeddings` embeds text queries: each
  written in the bundle's query template first, as training wrote captions.
- `log_likelihood`: the context is prefilled once, the KV cache forked per candidate, and each
  candidate token's log-probability is read from the logits before it is fed (log-softmax in
  float64 over the model's full vocabulary, [RET] included). A candidate is tokenized on its own,
  without special tokens, so it should carry its own leading space where the tokenizer needs one
  (" yes" after "A:").
"""
from __future__ import annotations

import math

import numpy as np

from .errors import FromageError
from .prompt import ImagePart, Part, encode_text, query_text


def context_embeds(model, parts: list[Part], visual: dict | None = None) -> np.ndarray:
    """(1, n, E) input embeddings of an interleaved prompt, laid out as `Fromage.segments` does.
    `visual` maps an image source to its visual tokens (k, E) already computed; other images are encoded."""
    return model.prompt_embeds(model.segments(list(parts)), visual)


def ret_embedding_of_parts(model, parts: list[Part], visual: dict | None = None) -> np.ndarray:
    """(R,) [RET] embedding of one interleaved context (texts and ImageParts, in order)."""
    ret = model.embed_ids([model.ret_id])[None]  # (1, 1, E): fed exactly as a generated [RET] is
    embeds = np.concatenate([context_embeds(model, parts, visual), ret], axis=1)
    return np.array(model.start(embeds).ret_embedding, dtype=np.float32)


def ret_embeddings_of_parts(model, contexts: list[list[Part]], visual: dict | None = None) -> np.ndarray:
    """(n, R) [RET] embeddings of interleaved contexts (e.g. a dialogue or a story with images)."""
    if not contexts:
        return np.zeros((0, model.bundle.model["retrieval_dim"]), dtype=np.float32)
    return np.stack([ret_embedding_of_parts(model, c, visual) for c in contexts])


def ret_embeddings(model, texts: list[str]) -> np.ndarray:
    """(n, R) [RET] embedding of each text query: the prompt is the text written in the bundle's query
    template (e.g. `A picture of {}. In one word, the picture shows`), then [RET]."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise FromageError(f"text {i} is a {type(t).__name__}, not a string")
    return ret_embeddings_of_parts(model, [[query_text(model.query_template, t)] for t in texts])


def _log_softmax_at(logits: np.ndarray, token: int) -> float:
    x = logits.astype(np.float64)
    m = x.max()
    return float(x[token] - m - np.log(np.exp(x - m).sum()))


def log_likelihood_from_embeds(model, embeds: np.ndarray, candidates: list[str]):
    """Like `log_likelihood`, with the context given as input embeddings (1, n, E) already built
    (e.g. reusing visual tokens). -> (log-likelihoods, token counts)."""
    ids = []
    for i, cand in enumerate(candidates):
        if not isinstance(cand, str):
            raise FromageError(f"candidate {i} is a {type(cand).__name__}, not a string")
        tokens = encode_text(model.tokenizer, cand)
        if not tokens:
            raise FromageError(f"candidate {i} ({cand!r}) has no tokens to score")
        ids.append(tokens)
    if embeds.shape[1] + max((len(t) for t in ids), default=0) - 1 > model.max_positions:
        raise FromageError(f"context + longest candidate exceed the model's context of {model.max_positions}")
    base = model.start(np.ascontiguousarray(embeds, dtype=np.float32))
    scores = []
    for tokens in ids:
        state = base.fork()
        total = 0.0
        for j, tok in enumerate(tokens):
            total += _log_softmax_at(state.logits, tok)
            if j + 1 < len(tokens):  # the last token's own output is never needed
                model.advance(state, model.embed_ids([tok])[None])
        scores.append(total)
    return scores, [len(t) for t in ids]


def log_likelihood(model, context_parts: list[Part], candidates: list[str], return_counts: bool = False,
                   visual: dict | None = None):
    """Sum of log p(token) over each candidate's tokens given the interleaved context.

    -> list of floats, or (list of floats, list of token counts) with return_counts=True
    (perplexity of a candidate = exp(-loglik / count)). `visual`: see `context_embeds`."""
    scores, counts = log_likelihood_from_embeds(model, context_embeds(model, context_parts, visual), candidates)
    return (scores, counts) if return_counts else scores


def caption_perplexity(model, examples, visual: dict | None, progress=False) -> tuple[float | None, int]:
    """Corpus perplexity of the captions given their image (or the prefix alone when visual is None)."""
    from tqdm import tqdm
    prefix = list(model.bundle.tokens.get("prefix") or [])
    if visual is None and not prefix:
        return None, 0  # no token to condition on without an image
    if visual is None:  # one context for all: prefilled once, forked per caption
        ll, n = log_likelihood_from_embeds(model, model.embed_ids(prefix)[None], [e.caption for e in examples])
        return math.exp(-sum(ll) / sum(n)), sum(n)
    total, count = 0.0, 0
    for e in tqdm(examples, desc="perplexity (image)", disable=not progress):
        ll, n = log_likelihood_from_embeds(model, context_embeds(model, [ImagePart(e.image)], visual), [e.caption])
        total, count = total + ll[0], count + n[0]
    return math.exp(-total / count), count
