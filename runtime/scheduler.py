"""Continuous batching: many requests decoded together by one loaded model.

One thread runs the loop. Each iteration admits waiting requests into free slots (at most `max_batch`
running), lets every decoding request choose its next token (generate.Sequence, as a single
generation does), and feeds all those tokens together with the next piece of one waiting prompt in
ONE decoder call: the native engine reads every weight once for all the rows; ONNX Runtime runs the
requests one after the other. The [RET]s of the step are searched together. A request that finishes
or is cancelled leaves at the next iteration and frees its slot.

While others decode, prompts are fed rows worth PROMPT_ROWS_BUSY per call (or `prefill_rows`), or the batch's
empty slots' worth where that is more, the shortest first, so a long prompt arriving slows the running
streams' steps by a bounded factor instead of stalling them, and does not hold back the short prompts
behind it. A prompt that starts as a recent one did (a recent prompt, or a prompt with its answer: a chat's
next turn) is fed from where they part (prefix_cache.PrefixCache).
Every position (prompt or generated) is computed by the decoding kernels, whose rows do not depend on
what else is in the call: a request's outputs are the same alone or in any batch, however its prompt
was cut. On the native engine `Fromage.generate` prefills with the same kernels, so it gives the same
outputs again, fp32 and 4/8-bit bundles alike (README, Serving).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .errors import FromageError, ParameterError
from .generate import DecodeState, Fromage, ImageEvent, Result, Sequence, TextEvent
from .prefix_cache import PrefixCache
from .prompt import Part
from .sampling import SamplingParams, top_logits


log = logging.getLogger("fromage.scheduler")

PROMPT_ROWS_BUSY = 4  # prompt positions per call while a full batch decodes
PREFIX_CACHE_BYTES = 256 << 20
ATTENTION_POSITIONS = 2048  # a row's attention over this many positions takes as long as its matrices
CHEAP_POSITIONS = 256        # attention over fewer positions than this is not counted


def row_cost(position: int) -> float:
    """What a prompt row at `position` adds to a call, in rows near the start: its matrices, and its
    attention over the positions before it (default model, native engine, 2 threads: as long as the
    matrices at ~2,000 positions)."""
    return 1.0 + max(0, position - CHEAP_POSITIONS) / ATTENTION_POSITIONS


class QueueFull(FromageError):
    """The waiting queue is at its limit: the caller should answer 'busy, retry later' at once."""


@dataclass
class Finished:
    """The last event of a request: its result (stop_reason "stop", "length", "cancelled" or "error")."""
    result: Result
    error: str | None = None


@dataclass(eq=False)
class Request:
    """A submitted generation. Events (TextEvent, ImageEvent, then Finished) go to `on_event`, called
    from the scheduler's thread; without one they queue up for iteration (`for event in request`)."""
    params: SamplingParams
    embeds: np.ndarray
    result: Result
    on_event: object = None
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    _events: queue.Queue = field(default_factory=queue.Queue)

    def cancel(self) -> None:
        """Stop generating: the request leaves the batch within one step and frees its slot."""
        self.cancelled = True

    def emit(self, event) -> None:
        (self.on_event or self._events.put)(event)

    def __iter__(self):
        while True:
            event = self._events.get()
            yield event
            if isinstance(event, Finished):
                return


@dataclass(eq=False)  # identity: slots are found in the running list by who they are, not by their fields
class _Slot:
    req: Request
    state: DecodeState | None = None
    fed: int = 0                     # prompt positions prefilled so far
    seq: Sequence | None = None      # set when the prompt is prefilled: the slot decodes

    @property
    def prompt_len(self) -> int:
        return self.req.embeds.shape[1]


class Scheduler:
    def __init__(self, model: Fromage, max_batch: int = 16, max_queue: int = 64, max_prompt_chunk: int = 64,
                 max_prompt: int | None = None, max_new_tokens: int | None = None, prefill_rows: int | None = None,
                 prefix_cache_bytes: int = PREFIX_CACHE_BYTES):
        """max_prompt / max_new_tokens: per-request caps below the model's context (None: the context).
        prefill_rows: prompt positions per call while others decode (None: PROMPT_ROWS_BUSY); fewer keep
        the streams' inter-token latency lower, and a new request's first token comes later.
        prefix_cache_bytes: room for recent prompts' caches (0: none kept)."""
        if max_batch < 1 or max_queue < 0 or max_prompt_chunk < 1 or (prefill_rows is not None and prefill_rows < 1):
            raise FromageError("max_batch must be >= 1, max_queue >= 0, max_prompt_chunk >= 1 and prefill_rows >= 1")
        self.model, self.max_batch, self.max_queue, self.max_prompt_chunk = model, max_batch, max_queue, max_prompt_chunk
        self.prefill_rows = prefill_rows or PROMPT_ROWS_BUSY
        self.max_prompt, self.max_new_tokens = max_prompt, max_new_tokens
        self.prefixes = PrefixCache(model, prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.waiting: deque[Request] = deque()
        self.running: list[_Slot] = []
        self._cond = threading.Condition()
        self._closed = False
        model.prepare_caches(max_batch)
        self._thread = threading.Thread(target=self._loop, name="fromage-scheduler", daemon=True)
        self._thread.start()

    # ---- the caller's side ---------------------------------------------------------------------
    def submit(self, parts: list[Part], params: SamplingParams | None = None, on_event=None) -> Request:
        """Checks and embeds the prompt in the caller's thread (images are encoded here), then queues it.
        Raises FromageError for a bad request, QueueFull when the queue is at its limit."""
        params = params or SamplingParams()
        with self._cond:
            self._check_room()
        if self.max_new_tokens is not None and params.max_new_tokens > self.max_new_tokens:
            raise ParameterError("max_new_tokens", f"at most {self.max_new_tokens} here, got {params.max_new_tokens}")
        result = Result()
        embeds = self.model.prepare(parts, params, result)
        if self.max_prompt is not None and embeds.shape[1] > self.max_prompt:
            raise FromageError(f"the prompt is {embeds.shape[1]} positions long; at most {self.max_prompt} here")
        req = Request(params, embeds, result, on_event)
        with self._cond:
            self._check_room()
            self.waiting.append(req)
            self._cond.notify()
        return req

    def _check_room(self) -> None:
        if self._closed:
            raise FromageError("the scheduler is shut down")
        if len(self.waiting) + len(self.running) >= self.max_batch + self.max_queue:
            raise QueueFull(f"the server is busy: {len(self.running)} requests running and {len(self.waiting)} "
                            "waiting (the limit); retry later")

    def generate(self, parts: list[Part], params: SamplingParams | None = None) -> Result:
        """Submit and wait: the result, as Fromage.generate gives it."""
        req = self.submit(parts, params)
        for event in req:
            if isinstance(event, Finished) and event.error:
                raise FromageError(event.error)
        return req.result

    @property
    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        return len(self.running), len(self.waiting)

    @property
    def cache_bytes(self) -> tuple[int, int]:
        """(the running requests' KV caches, the prefix cache) in bytes; read from any thread."""
        running = sum(c.nbytes for slot in list(self.running) if slot.state is not None for c in slot.state.cache)
        return running, self.prefixes.bytes if self.prefixes else 0

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # ---- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self.waiting and not self.running:
                    self._cond.wait()
                if self._closed:
                    break
                while self.waiting and len(self.running) < self.max_batch:
                    req = self.waiting.popleft()
                    req.result.timings["queue_s"] = time.perf_counter() - req.submitted
                    self.running.append(_Slot(req))
            try:
                self._iteration()
            except Exception as e:  # a bug or a decoder failure: fail the running requests, keep serving
                log.exception("scheduler step failed; its %d running requests end with an error", len(self.running))
                for slot in list(self.running):
                    self._finish(slot, "error", f"{type(e).__name__}: {e}")
        for slot in list(self.running) + [_Slot(r) for r in self.waiting]:
            self._finish(slot, "cancelled")

    def _iteration(self) -> None:
        """One decoder call: a token for every decoding request and the next pieces of waiting prompts."""
        for slot in [s for s in self.running if s.req.cancelled]:
            self._finish(slot, "cancelled")
        for slot in [s for s in self.running if s.state is None]:
            self._start(slot)
        decoding = [s for s in self.running if s.seq is not None]
        rows, fed = [], []
        for slot in decoding:
            token = slot.seq.next_token(slot.state.logits, slot.state.best)
            if token is None:
                self._finish(slot)
            elif slot.seq.feeds(token):
                fed.append((slot, token))
            else:
                self._emit(slot, slot.seq.on_token(token))
        if fed:
            embeds = self.model.embed_ids([tok for _, tok in fed])
            rows = [(slot.state, embeds[i:i + 1]) for i, (slot, _) in enumerate(fed)]
        prompts = self._prompt_pieces(len(fed))
        for slot, n in prompts:
            rows.append((slot.state, slot.req.embeds[0, slot.fed:slot.fed + n]))
        if not rows:
            return
        try:
            self.model.advance_rows(rows)
        except FromageError as e:  # e.g. out of memory: those requests fail, the server goes on
            for slot in [s for s, _ in fed] + [s for s, _ in prompts]:
                self._finish(slot, "error", str(e))
            return
        for slot, n in prompts:
            slot.fed += n
            if slot.fed == slot.prompt_len:
                if self.prefixes:
                    self.prefixes.store(slot.req.embeds[0], slot.state)
                timings = slot.req.result.timings
                timings["prefill_s"] = time.perf_counter() - slot.req.submitted - timings["queue_s"]
                slot.seq = Sequence(self.model, slot.req.params, slot.req.result)
        self._after_step(fed)

    def _start(self, slot: _Slot) -> None:
        """The slot's state: empty, or holding the longest cached prefix of its prompt."""
        if self.prefixes is None:
            slot.state = self.model.new_state()
        else:
            slot.state, slot.fed = self.prefixes.start(slot.req.embeds[0])
            slot.req.result.cached_positions = slot.fed
        slot.state.top = top_logits(slot.req.params)

    def _prompt_pieces(self, decoding: int) -> list[tuple[_Slot, int]]:
        """Prompt positions to feed in this call, the prompts with the fewest left first (a long prompt
        does not hold back the short ones that arrive behind it: they join the decoding streams, and it
        takes what the call has left). Beside running requests, rows worth prefill_rows (PROMPT_ROWS_BUSY)
        or the batch's empty slots (max_batch - decoding), whichever is more: a call's cost grows with its
        rows, so the streams' steps grow by a bounded share while prompts are fed, a full batch's by the
        least (its inter-token latency's tail); a row deep in a long prompt counts for more (row_cost). A
        prompt that this call can finish may take rows worth prefill_rows and the empty slots' together:
        the call is then no longer than a full batch's with its prompt rows, and the new request decodes
        from the next step instead of queueing behind the others one call each. With none decoding,
        max_prompt_chunk rows."""
        prompts = sorted((s for s in self.running if s.seq is None), key=lambda s: s.prompt_len - s.fed)
        cost = row_cost if decoding else (lambda position: 1.0)
        empty = max(0, self.max_batch - decoding)
        # what the call's prompt rows may cost in all (ending prompts), and what a prompt that does not end may
        limit = float(self.prefill_rows + empty if decoding else self.max_prompt_chunk)
        share = float(max(self.prefill_rows, empty) if decoding else self.max_prompt_chunk)
        spent_all, pieces = 0.0, []
        for slot in prompts:
            left = slot.prompt_len - slot.fed
            n, spent = 0, 0.0
            if left <= limit - spent_all:
                spent = sum(cost(slot.fed + i) for i in range(left))
                n = left if spent_all + spent <= limit else 0  # the prompt ends in this call
            if not n:
                spent = 0.0
                while n < left and spent_all + spent + cost(slot.fed + n) <= share:
                    spent += cost(slot.fed + n)
                    n += 1
            spent_all += spent
            if n:
                pieces.append((slot, n))
        if prompts and not pieces:  # the next row costs more than the whole budget: one row a call still
            pieces = [(prompts[0], 1)]
        return pieces

    def _after_step(self, fed: list) -> None:
        """The events of the step's tokens; every [RET] of the step searched in one query batch."""
        model, found = self.model, {}
        rets = [s for s, tok in fed if tok == model.ret_id]
        if rets:
            top = max(s.req.params.top_images for s in rets)
            hits = model.index.search_batch(np.stack([s.state.ret_embedding for s in rets]), top)
            found = {id(s): h[:s.req.params.top_images] for s, h in zip(rets, hits)}
        for slot, token in fed:
            self._emit(slot, slot.seq.on_token(token, found.get(id(slot))))

    def _emit(self, slot: _Slot, events: list) -> None:
        timings = slot.req.result.timings
        for event in events:
            if "ttft_s" not in timings and isinstance(event, (TextEvent, ImageEvent)):
                timings["ttft_s"] = time.perf_counter() - slot.req.submitted
            slot.req.emit(event)

    def _finish(self, slot: _Slot, reason: str | None = None, error: str | None = None) -> None:
        if slot in self.running:
            self.running.remove(slot)
        result = slot.req.result
        if slot.seq is not None and reason is None:
            self._emit(slot, slot.seq.finish())
        if reason:
            result.stop_reason = reason
        result.timings["e2e_s"] = time.perf_counter() - slot.req.submitted
        slot.req.emit(Finished(result, error))
        if self.prefixes and slot.seq is not None and reason is None:
            self._store_answer(slot)

    def _store_answer(self, slot: _Slot) -> None:
        """Keep the prompt with its answer (the tokens fed after it): a chat's next turn re-sends both."""
        fed = slot.state.length - slot.prompt_len
        if fed > 0:
            answer = self.model.embed_ids(slot.req.result.token_ids[:fed])
            self.prefixes.store(np.concatenate([slot.req.embeds[0], answer]), slot.state)
