"""The decode loop: interleaved images and text in, streamed text and retrieved images out.

One prefill over the whole prompt, then one decoder call per token on the KV cache. When the
model emits [RET], that token is fed like any other; the decoder's retrieval embedding at that
position is the query, and the retrieved images are streamed right then, before decoding goes on.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
from tokenizers import Tokenizer

from fromage.engines import native
from fromage.engines.gather import GatherTable, gather_table
from fromage.engines.huge_pages import cache_arrays
from fromage.engines.onnxruntime import ConcatDecoder, InPlaceDecoder, OrtSession

from .bundle_reader import Bundle, load_bundle
from .detokenize import TextStream, token_bytes
from .errors import FromageError
from .preprocess import preprocess
from .prompt import ImagePart, Part, Segment, to_segments
from .sampling import SamplingParams, adjust_ret_logit, sample, top_logits


@dataclass
class TextEvent:
    text: str


@dataclass
class ImageEvent:
    hits: list          # retrieval.Hit, best first
    token_index: int    # index of the [RET] in the generated ids


@dataclass
class DecodeState:
    """The KV cache and the outputs at the last fed position.

    With the fused decoder graph (either engine), `cache` holds buffers of a fixed capacity that the
    decoder reads and writes in place (grown by doubling when full); with the generic graph, the past
    arrays that grow by one concatenation per call."""
    cache: list
    length: int
    logits: np.ndarray | None = None        # (V,) next-token logits
    ret_embedding: np.ndarray | None = None  # (R,) normalised W_t of the last position
    # how many of its largest logits the next choice reads (sampling.top_logits; 0: all): the native engine
    # computes exactly those that can be among them, and [RET]'s, and leaves the others at -inf
    top: int = 0
    # with top 1, the native engine's column of the largest logit but [RET]'s (the choice then reads two logits,
    # not the row: sampling.sample); -1: not given
    best: int = -1
    # the native engine's one-token steps on this cache (Fromage.feed_token), dropped when _reserve grows it: a host
    # that replaces a buffer of `cache` itself, keeping the old one alive elsewhere, sets it to None too
    steps: object = None

    def fork(self) -> "DecodeState":
        """An independent copy (e.g. to score several continuations of one context)."""
        return DecodeState(copy_cache(self.cache), self.length, self.logits.copy(), self.ret_embedding.copy())


def copy_cache(cache: list, capacity: int | None = None, decoding: bool = True, first_positions=None) -> list:
    """Copies of a KV cache's buffers (all of one shape): to decode on, in cache_arrays' memory (huge pages where
    they fill one: attention reads them every step); only to keep (decoding False), numpy's copies (a fresh huge
    page can take milliseconds to fault in: engines/huge_pages.py). With `capacity`, grown to that many positions,
    the old ones where the decoder's first_positions puts them."""
    if not decoding:
        return [np.array(c) for c in cache]
    shape = cache[0].shape
    copies = cache_arrays(shape[:2] + (capacity or shape[2],) + shape[3:], cache[0].dtype, len(cache))
    for copy, c in zip(copies, cache):
        (first_positions(copy, shape[2]) if capacity else copy)[...] = c
    return copies


@dataclass
class Result:
    parts: list = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    stop_reason: str = ""
    timings: dict = field(default_factory=dict)
    token_budget: int | None = None  # the new tokens the context leaves room for (<= max_new_tokens)
    cached_positions: int = 0        # prompt positions copied from a cached prefix, not computed

    def to_json(self) -> dict:
        return {"parts": self.parts, "prompt_token_ids": self.prompt_token_ids,
                "token_ids": self.token_ids, "stop_reason": self.stop_reason, "timings": self.timings}


MIN_CAPACITY = 256  # positions of KV cache a state starts with (the fused graph)


def image_part(hits: list, **extra) -> dict:
    """A retrieved image as a part of the answer: the best hit, and every hit under "ranked"."""
    ranked = [asdict(h) for h in hits]
    return {"type": "image", **ranked[0], **extra, "ranked": ranked}


def append_text(parts: list, text: str) -> None:
    """Adds text to an answer's parts: to the last part when it is text, else as a new text part."""
    if parts and parts[-1]["type"] == "text":
        parts[-1]["text"] += text
    else:
        parts.append({"type": "text", "text": text})


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def cache_capacity(decoder, positions: int) -> int:
    """The smallest KV cache capacity of at least `positions` that the decoder takes (a multiple of its
    capacity_step: the native engine keeps keys in blocks of 64 positions)."""
    return -(-positions // decoder.capacity_step) * decoder.capacity_step


ENGINES = ("auto", "native", "onnxruntime")
KV_CACHES = tuple(native.KV_DTYPES)  # the KV cache's element ("f32", "f16"); f16 needs the native engine


def check_decoder_options(engine: str, kv_cache: str) -> None:
    """FromageError for an unknown engine or KV cache type, or a pair that cannot run (an f16 cache on ONNX
    Runtime); the commands check theirs with it before loading anything."""
    if engine not in ENGINES:
        raise FromageError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
    if kv_cache not in KV_CACHES:
        raise FromageError(f"unknown KV cache type {kv_cache!r} (choose from {', '.join(KV_CACHES)})")
    if kv_cache != "f32" and engine == "onnxruntime":
        raise FromageError(f"an {kv_cache} KV cache needs the native engine, not onnxruntime")


class Fromage:
    """A loaded bundle (+ optional image index), ready to generate.

    The decoder runs on the native engine (engines/native.py: C kernels over the bundle's weights)
    when the bundle has the fused graph, the device is the CPU and the library is built; otherwise,
    or with engine="onnxruntime", on ONNX Runtime. The vision and embedding graphs always run on
    ONNX Runtime.

    One decode at a time per instance: the decoder's I/O binding is shared (use one instance per
    thread). A state's `logits` and `ret_embedding` are buffers the next
    `advance` of that state overwrites; copy them to keep them."""

    def __init__(self, bundle, index=None, device: str = "cpu", threads: int | None = None, verify: bool = True,
                 engine: str = "auto", kv_cache: str = "f32"):
        self.bundle: Bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=verify)
        m = self.bundle.model
        self.k, self.embed_dim, self.max_positions = m["k"], m["embed_dim"], m["max_positions"]
        self.layers, self.kv_heads, self.head_dim = m["num_layers"], m["kv_heads"], m["head_dim"]
        self.ret_id = self.bundle.tokens["ret"]
        self.tokenizer = Tokenizer.from_file(str(self.bundle.tokenizer_path))
        self.token_bytes = token_bytes(self.tokenizer)  # the text streams' table (runtime/detokenize.py)
        # idle ONNX Runtime workers spin for a while after a run, on the cores the decoder needs next:
        # the vision graph's sleep instead
        self.vision = OrtSession(self.bundle.graph_path("vision"), device=device, threads=threads, spin=False)
        # a plain table lookup runs in numpy (engines/gather.py); otherwise ONNX Runtime with one thread
        embed_path = self.bundle.graph_path("embed")
        self.embed = (gather_table(embed_path) if device == "cpu" else None) or OrtSession(
            embed_path, device=device, threads=1)
        io = self.bundle.manifest["graphs"]["decoder"]
        self.kv_names = io["inputs"][3:]
        # the fused graph (export/llama_graph.py) keeps the KV cache in buffers written in place
        self.fused = io.get("cache") == "in-place"
        self.engine, self.decoder, self.engine_note = self._make_decoder(engine, device, threads, kv_cache)
        # feed_token's path: the native engine's token steps read the embedding table in place
        self.token_rows_in_place = hasattr(self.decoder, "token_steps") and isinstance(self.embed, GatherTable)
        self.kv_cache, self.kv_dtype = kv_cache, np.dtype(native.KV_DTYPES[kv_cache])
        self.vocab_size, self.retrieval_dim = m["vocab_size"], m["retrieval_dim"]
        self.query_template = m.get("query_template", "{}")  # how text queries are written before [RET]
        self.index = None
        if index is not None:
            from .retrieval import ImageIndex
            self.index = index if isinstance(index, ImageIndex) else ImageIndex.open(
                index, expected_dim=m["retrieval_dim"], expected_embedder=self.bundle.vision_fingerprint)

    def _make_decoder(self, engine: str, device: str, threads: int | None, kv_cache: str):
        """-> (engine name, decoder, why the native engine is not used or None). `auto` tries the
        native engine where it can run and falls back to ONNX Runtime, saying why (not with an f16 KV cache,
        which only the native engine keeps)."""
        check_decoder_options(engine, kv_cache)
        path, why_not = self.bundle.graph_path("decoder"), None
        if engine != "onnxruntime":
            if not self.fused:
                why_not = "the bundle's decoder is not the fused Llama graph"
            elif device != "cpu":
                why_not = f"it runs on the CPU, not {device}"
            else:
                try:
                    return "native", native.NativeDecoder(path, self.bundle.model, threads=threads,
                                                          exact_columns=(self.ret_id,), kv_cache=kv_cache), None
                except FromageError as e:  # no library, no AVX2, a bundle from before the engine
                    why_not = str(e)
            if engine == "native":
                raise FromageError(f"the native engine cannot run this: {why_not}")
            if kv_cache != "f32":
                raise FromageError(f"an {kv_cache} KV cache needs the native engine, which cannot run this: {why_not}")
        graph = OrtSession(path, device=device, threads=threads)
        decoder = InPlaceDecoder(graph) if self.fused else ConcatDecoder(graph)
        return "onnxruntime", decoder, why_not and f"native engine not used: {why_not}"

    # ---- building blocks -------------------------------------------------------------
    def encode_images(self, sources: list) -> tuple[np.ndarray, np.ndarray]:
        """-> visual tokens (n, k, E), normalised retrieval embeddings (n, R)."""
        pixels = preprocess(sources, self.bundle.preprocessing)
        tokens, emb = self.vision.run({"pixel_values": pixels})
        return tokens, emb

    def embed_ids(self, ids: list[int]) -> np.ndarray:
        """(n, E) input embeddings of token ids (read-only: one id's may be a view of the table)."""
        if isinstance(self.embed, GatherTable):
            return self.embed.lookup(ids)
        return self.embed.run({"input_ids": np.asarray([ids], dtype=np.int64)})[0][0]

    def segments(self, parts: list[Part]) -> list[Segment]:
        return to_segments(parts, self.tokenizer, self.bundle.tokens["prefix"])

    def prompt_embeds(self, segments: list[Segment], visual: dict | None = None) -> np.ndarray:
        """(1, n, E) input embeddings. `visual` maps an image source to its visual tokens (k, E)
        already computed; other images are encoded (each distinct one once)."""
        visual = visual or {}
        missing = list(dict.fromkeys(s.source for s in segments
                                     if isinstance(s, ImagePart) and s.source not in visual))
        if missing:
            visual = {**visual, **dict(zip(missing, self.encode_images(missing)[0]))}
        chunks = [visual[s.source] if isinstance(s, ImagePart) else self.embed_ids(s) for s in segments]
        return np.concatenate(chunks, axis=0)[None].astype(np.float32)

    def new_state(self, cache: list | None = None, length: int = 0) -> "DecodeState":
        """A state on `cache` holding `length` positions; by default an empty cache (it grows as positions are
        fed)."""
        if cache is None:
            cache = [np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_dtype) for _ in self.kv_names]
        outputs = np.zeros(self.vocab_size, np.float32), np.zeros(self.retrieval_dim, np.float32)
        return DecodeState(cache, length, *outputs)

    def prepare_caches(self, n: int) -> None:
        """Makes n caches of a new state's first capacity, touches them and drops them: their memory is kept for
        the next ones (engines/huge_pages.py), so that a server's first requests do not wait for fresh huge pages
        to be faulted in (on a virtual machine, milliseconds each where the host has not backed them yet)."""
        if self.decoder.in_place:
            shape = (1, self.kv_heads, cache_capacity(self.decoder, min(self.max_positions, MIN_CAPACITY)),
                     self.head_dim)
            caches = [cache_arrays(shape, self.kv_dtype, len(self.kv_names)) for _ in range(n)]  # all at once
            for c in (c for cache in caches for c in cache):
                c.fill(0)

    def prefix_state(self, state: "DecodeState", n: int, decoding: bool = True) -> "DecodeState":
        """A new state holding the first n positions of `state`'s cache (logits not set: feed it more); decoding
        False: one only to keep and copy from (copy_cache)."""
        # in place: whole blocks of the layout (positions past n in the last one are never read)
        keep = cache_capacity(self.decoder, n) if self.decoder.in_place else n
        first = self.decoder.first_positions
        return self.new_state(copy_cache([first(c, keep) for c in state.cache], decoding=decoding), n)

    def start(self, embeds: np.ndarray, room: int = 0) -> "DecodeState":
        """Prefill: run the prompt (1, n, E) from an empty cache, made with room for `room` more positions too (a
        decoding loop's token budget: its steps then never stop to grow the cache)."""
        state = self.new_state()
        self._reserve(state, min(embeds.shape[1] + room, self.max_positions))
        self.advance(state, embeds)
        return state

    def advance(self, state: "DecodeState", embeds: np.ndarray) -> None:
        """Feed more positions (token embeddings or visual tokens, (1, n, E)) on the cache."""
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        total = self._reserve(state, embeds.shape[1])
        state.best = self.decoder.forward(embeds, state.cache, state.length, state.logits, state.ret_embedding,
                                          top=state.top)
        state.length = total

    def feed_token(self, state: "DecodeState", token: int) -> None:
        """Feed one token: a decoding loop's step. With the native engine and a table lookup for the embedding,
        through the decoder's token steps on this state (engines/native.py TokenSteps: the row read in place, the
        checks done once), which the Python between two steps, cache-cold after each, is mostly made of."""
        if not (state.top and self.token_rows_in_place):
            return self.advance(state, self.embed_ids([token])[None])
        total = self._reserve(state, 1)
        if state.steps is None or not state.steps.for_(state.cache, state.logits, state.ret_embedding):
            state.steps = self.decoder.token_steps(state.cache, state.logits, state.ret_embedding, self.embed.table)
        state.best = state.steps(token, state.length, state.top)
        state.length = total

    def advance_rows(self, rows: list[tuple["DecodeState", np.ndarray]]) -> None:
        """Feed each state its positions (n, E), all in one decoder call: with the native engine every
        weight is read once for all the positions, and each position is computed as a decoding step
        computes it (the same kernels whatever else is in the call: a state's outputs do not depend on
        its companions or on how its prompt was cut). With ONNX Runtime, one call per state."""
        if not hasattr(self.decoder, "forward_batch"):
            for state, embeds in rows:
                self.advance(state, embeds[None])
            return
        caches, pasts, last = [], [], []
        for state, embeds in rows:
            self._reserve(state, len(embeds))
            caches += [state.cache] * len(embeds)
            pasts += range(state.length, state.length + len(embeds))
            last.append(len(pasts) - 1)
        embeds = np.ascontiguousarray(np.concatenate([e for _, e in rows]), dtype=np.float32)
        logits = np.empty((len(last), self.vocab_size), np.float32)  # a state's last position only
        ret = np.empty((len(last), self.retrieval_dim), np.float32)
        best = np.empty(len(last), np.int32)
        self.decoder.forward_batch(embeds, caches, pasts, logits, ret, out_rows=last,
                                   top=[state.top for state, _ in rows], best=best)
        for (state, e), lg, rt, b in zip(rows, logits, ret, best.tolist()):
            state.logits, state.ret_embedding = lg, rt  # each state's own row of this call's outputs, not a copy
            state.length, state.best = state.length + len(e), b

    def _reserve(self, state: "DecodeState", n: int) -> int:
        """Room for n more positions in the state's cache (grown by doubling: amortised, not per step);
        -> the length after them."""
        total = state.length + n
        if total > self.max_positions:
            raise FromageError(f"the sequence would be {total} positions long; "
                               f"the model's context is {self.max_positions}")
        if self.decoder.in_place and total > state.cache[0].shape[2]:
            capacity = cache_capacity(self.decoder, min(self.max_positions, max(MIN_CAPACITY, _pow2(total))))
            state.steps = None
            # all of the old buffers (the native engine keeps keys in blocks, not as `length` leading rows), into
            # the same list (token steps see its buffers replaced)
            state.cache[:] = copy_cache(state.cache, capacity, first_positions=self.decoder.first_positions)
        return total

    # ---- the loop --------------------------------------------------------------------
    def prepare(self, parts: list[Part], params: SamplingParams, result: Result) -> np.ndarray:
        """Checks a request and embeds its prompt (images encoded): -> (1, n, E). Fills the result's
        prompt ids and token budget (the new tokens the context leaves room for)."""
        params.check_vocab(self.vocab_size)
        segments = self.segments(parts)
        result.prompt_token_ids = [t for s in segments if isinstance(s, list) for t in s]
        embeds = self.prompt_embeds(segments)
        length = embeds.shape[1]
        if length >= self.max_positions:
            raise FromageError(f"the prompt is {length} positions long (images count {self.k} each); "
                               f"the model's context is {self.max_positions}")
        result.token_budget = min(params.max_new_tokens, self.max_positions - length)
        return embeds

    def stream(self, parts: list[Part], params: SamplingParams | None = None, result: Result | None = None):
        """Yields TextEvent / ImageEvent as they are produced; fills `result` if given."""
        p = params or SamplingParams()
        result = result if result is not None else Result()
        t0 = time.perf_counter()
        embeds = self.prepare(parts, p, result)
        state = self.start(embeds, room=result.token_budget)
        state.top = top_logits(p)
        result.timings["prefill_s"] = time.perf_counter() - t0

        seq = Sequence(self, p, result)
        t1 = time.perf_counter()
        while (token := seq.next_token(state.logits, state.best)) is not None:
            if seq.feeds(token):
                self.feed_token(state, token)
            hits = self.index.search(state.ret_embedding, top_k=p.top_images) if token == self.ret_id else None
            yield from seq.on_token(token, hits)
        yield from seq.finish()
        n = len(result.token_ids)
        decode_s = time.perf_counter() - t1
        result.timings.update(decode_s=decode_s, new_tokens=n,
                              decode_tok_s=(n / decode_s) if decode_s > 0 and n else None)

    def generate(self, parts: list[Part], params: SamplingParams | None = None) -> Result:
        result = Result()
        for _ in self.stream(parts, params, result):
            pass
        return result


class Sequence:
    """The decisions of one generation, token by token: sampling with [RET] handled, stop tokens and
    strings, the token budget, streamed text and images. Fromage.stream drives one; the scheduler
    (scheduler.py) drives many, fed by batched decoder steps."""

    ECHO_TOKENS = 3  # after a [RET], this many tokens re-saying the answer before it end the answer
    SENTENCE_ENDS = (".", "!", "?", "\n")  # after a [RET], text is released a sentence at a time

    @staticmethod
    def echo_run(token_ids: list[int], ret_id: int) -> int:
        """After a [RET]: the length of the longest run of tokens, ending with the last one, that re-says in
        order a run of the answer's tokens before the [RET] (0: none, or no [RET]); ECHO_TOKENS when 2 or more
        such tokens re-say the end of what was said. The text of such tokens is held back; at ECHO_TOKENS the
        answer ends there, without them (after "The kangaroo is a marsupial mammal. [RET]" the LM tends to
        say " kangaroo is a marsupial mammal." again, after "A camera. [RET]", " camera.")."""
        if ret_id not in token_ids:
            return 0
        last = len(token_ids) - 1 - token_ids[::-1].index(ret_id)
        return Sequence._run(Sequence._said(token_ids[:last], ret_id), token_ids[last + 1:])

    @staticmethod
    def _said(before: list[int], ret_id: int) -> tuple[list[int], list[set]]:
        """What was said before a [RET] ([RET]s left out), and its runs of 1..ECHO_TOKENS tokens."""
        pre = [t for t in before if t != ret_id]
        return pre, [set(zip(*(pre[i:] for i in range(n)))) for n in range(1, Sequence.ECHO_TOKENS + 1)]

    @staticmethod
    def _run(said: tuple[list[int], list[set]], post: list[int]) -> int:
        pre, runs = said
        for n in range(min(len(post), Sequence.ECHO_TOKENS), 0, -1):  # longer runs decide nothing more
            tail = tuple(post[-n:])
            if tail in runs[n - 1]:
                return max(n, Sequence.ECHO_TOKENS) if n >= 2 and tuple(pre[-n:]) == tail else n
        return 0

    def __init__(self, model: "Fromage", params: SamplingParams, result: Result):
        self.p, self.result, self.ret_id = params, result, model.ret_id
        self.stop_ids = set(model.bundle.tokens["stop"] if params.stop_ids is None else params.stop_ids)
        self.allow_ret = params.retrieval and model.index is not None
        self.rng = np.random.default_rng(params.seed)
        self.text = TextStream(model.tokenizer, model.token_bytes)
        self.rets, self.done, self.held, self.echo = 0, False, "", ""
        self.sentence = ""  # after a [RET]: the sentence being said, released when it ends (an echo drops it)
        self.said, self.after = None, 0  # before the last [RET] (Sequence._said), and where its answer resumes
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # text kept back: a stop string may start in it
        result.stop_reason = "length"

    def next_token(self, logits: np.ndarray, best: int = -1) -> int | None:
        """The next token from the last position's logits (adjusted in place; best: DecodeState.best), or None
        when the generation ends: a stop token, a stop string already met, or the budget spent."""
        step = len(self.result.token_ids)
        if self.done or step >= self.result.token_budget:
            return None
        adjust_ret_logit(logits, self.ret_id, step, self.p, self.allow_ret, self.rets)
        token = sample(logits, self.p, self.rng, best, self.ret_id)
        if token in self.stop_ids:
            self.result.stop_reason = "stop"
            return None
        self.result.token_ids.append(token)
        return token

    def feeds(self, token: int) -> bool:
        """Whether the token must be fed to the decoder: unless it is the last, and even then if it is
        [RET] (its position's embedding is the retrieval query)."""
        return len(self.result.token_ids) < self.result.token_budget or token == self.ret_id

    def on_token(self, token: int, hits: list | None = None) -> list:
        """The events of a chosen token (after it was fed): an image for [RET] (`hits`: its retrieval),
        else the text it completes."""
        if token == self.ret_id:
            self.rets += 1
            self.said, self.after = self._said(self.result.token_ids[:-1], self.ret_id), len(self.result.token_ids)
            self.text.reset()
            # text held back (stop strings, an unfinished sentence, a possible echo) comes first
            events = self._text(self.sentence + self.echo, flush=True)
            self.sentence = self.echo = ""
            step = len(self.result.token_ids) - 1
            self.result.parts.append(image_part(hits, token_index=step))
            return events + [ImageEvent(hits, step)]
        delta = self.text.push(token)
        ids = self.result.token_ids
        if self.said and (run := self._run(self.said, ids[max(self.after, len(ids) - self.ECHO_TOKENS):])):
            self.echo += delta  # held back: it may be the start of a repetition
            if run >= self.ECHO_TOKENS:  # the repetition and the unfinished sentence it ends are dropped
                self.echo = self.sentence = ""
                self.result.stop_reason = "stop"
                events, self.done = self._text("", flush=True), True
                return events
            return []
        delta, self.echo = self.echo + delta, ""
        if self.said:  # " kangaroo is a kangaroo." after "a kangaroo. [RET]": no " kangaroo is" left dangling
            self.sentence += delta
            end = max(self.sentence.rfind(c) for c in self.SENTENCE_ENDS) + 1
            delta, self.sentence = self.sentence[:end], self.sentence[end:]
        return self._text(delta) if delta else []

    def finish(self) -> list:
        """The text held back for stop strings (an unfinished sentence after a [RET], a shorter echo than
        ECHO_TOKENS), at the end."""
        return [] if self.done else self._text(self.sentence + self.echo, flush=True)

    def _text(self, delta: str, flush: bool = False) -> list:
        text, self.held = self.held + delta, ""
        for stop in self.p.stop:
            if stop in text:
                text, self.done, self.result.stop_reason = text[:text.index(stop)], True, "stop"
        if not (flush or self.done) and self.hold:
            text, self.held = text[:max(0, len(text) - self.hold)], text[max(0, len(text) - self.hold):]
        if not text:
            return []
        append_text(self.result.parts, text)
        return [TextEvent(text)]
