"""Continuous batching: many requests decoded together by one loaded model.

One thread runs the loop. Each iteration it admits waiting requests into free slots (at most
`max_batch` running), runs one chunk of one prompt's prefill, then one decoding step for every
running request: each samples its next token (generate.Sequence, as a single generation does), the
tokens are fed in one batched decoder call (the native engine reads every weight once for all of
them; ONNX Runtime runs them one after the other), and the [RET]s of the step are searched together.
A request that finishes or is cancelled leaves at the next iteration and frees its slot.

Prefill is cut into chunks sized to take about as long as a decoding step while others decode, so a
long prompt arriving does not stall the streams already running; alone, a prompt is prefilled whole.
A request's tokens are the same as `Fromage.generate` gives it alone (native engine: a batch row
and a prompt cut into chunks of at least two positions compute exactly what a solo call does).
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .errors import FromageError, ParameterError
from .generate import DecodeState, Fromage, ImageEvent, Result, Sequence, TextEvent
from .prompt import Part
from .sampling import SamplingParams


class QueueFull(FromageError):
    """The waiting queue is at its limit: the caller should answer 'busy, retry later' at once."""


@dataclass
class Finished:
    """The last event of a request: its result (stop_reason "stop", "length", "cancelled" or "error")."""
    result: Result
    error: str | None = None


@dataclass
class Request:
    """A submitted generation. Events (TextEvent, ImageEvent, then Finished) go to `on_event`, called
    from the scheduler's thread; without one they queue up for iteration (`for event in request`)."""
    id: int
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


@dataclass
class _Slot:
    req: Request
    state: DecodeState | None = None
    fed: int = 0                     # prompt positions prefilled so far
    seq: Sequence | None = None      # set when the prompt is prefilled: the slot decodes

    @property
    def prompt_len(self) -> int:
        return self.req.embeds.shape[1]


class Scheduler:
    def __init__(self, model: Fromage, max_batch: int = 16, max_queue: int = 64, max_prompt_chunk: int = 512,
                 max_prompt: int | None = None, max_new_tokens: int | None = None):
        """max_prompt / max_new_tokens: per-request caps below the model's context (None: the context)."""
        if max_batch < 1 or max_queue < 0 or max_prompt_chunk < 2:
            raise FromageError("max_batch must be >= 1, max_queue >= 0 and max_prompt_chunk >= 2")
        self.model, self.max_batch, self.max_queue, self.max_prompt_chunk = model, max_batch, max_queue, max_prompt_chunk
        self.max_prompt, self.max_new_tokens = max_prompt, max_new_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[_Slot] = []
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._step_s, self._prefill_token_s = 0.0, 0.0  # running estimates that size the prompt chunks
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
        req = Request(next(self._ids), params, embeds, result, on_event)
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
                for slot in list(self.running):
                    self._finish(slot, "error", f"{type(e).__name__}: {e}")
        for slot in list(self.running) + [_Slot(r) for r in self.waiting]:
            self._finish(slot, "cancelled")

    def _iteration(self) -> None:
        for slot in [s for s in self.running if s.req.cancelled]:
            self._finish(slot, "cancelled")
        decoding = [s for s in self.running if s.seq is not None]
        prefilling = next((s for s in self.running if s.seq is None), None)
        if prefilling is not None:
            try:
                self._prefill_chunk(prefilling, busy=bool(decoding))
            except FromageError as e:
                self._finish(prefilling, "error", str(e))
        if decoding:
            self._decode_step(decoding)

    def _chunk(self, slot: _Slot, busy: bool) -> int:
        """Prompt positions to prefill now: all (up to max_prompt_chunk) when nothing else runs; else
        about what takes as long as a decoding step. Never leaves a single position for the last chunk
        (one position takes the decoding kernels, which round differently from the prompt's)."""
        left = slot.prompt_len - slot.fed
        n = self.max_prompt_chunk
        if busy and self._prefill_token_s > 0:
            n = int(np.clip(0.6 * self._step_s / self._prefill_token_s, 2, n))
        n = min(n, left)
        return left if left - n == 1 else max(n, min(2, left))

    def _prefill_chunk(self, slot: _Slot, busy: bool) -> None:
        n, model, t = self._chunk(slot, busy), self.model, time.perf_counter()
        piece = np.ascontiguousarray(slot.req.embeds[:, slot.fed:slot.fed + n])
        if slot.state is None:
            slot.state = model.start(piece)
        else:
            model.advance(slot.state, piece)
        slot.fed += n
        elapsed = time.perf_counter() - t
        self._prefill_token_s = 0.8 * self._prefill_token_s + 0.2 * elapsed / n if self._prefill_token_s else elapsed / n
        if slot.fed == slot.prompt_len:
            timings = slot.req.result.timings
            timings["prefill_s"] = time.perf_counter() - slot.req.submitted - timings["queue_s"]
            slot.seq = Sequence(model, slot.req.params, slot.req.result)

    def _decode_step(self, slots: list[_Slot]) -> None:
        t = time.perf_counter()
        fed, model = [], self.model
        for slot in slots:
            token = slot.seq.next_token(slot.state.logits)
            if token is None:
                self._finish(slot)
            elif slot.seq.feeds(token):
                fed.append((slot, token))
            else:
                self._emit(slot, slot.seq.on_token(token))
        if fed:
            model.advance_batch([s.state for s, _ in fed], [tok for _, tok in fed])
        rets = [s for s, tok in fed if tok == model.ret_id]
        found = {}
        if rets:  # every [RET] of the step in one search
            top = max(s.req.params.top_images for s in rets)
            hits = model.index.search_batch(np.stack([s.state.ret_embedding for s in rets]), top)
            found = {id(s): h[:s.req.params.top_images] for s, h in zip(rets, hits)}
        for slot, token in fed:
            self._emit(slot, slot.seq.on_token(token, found.get(id(slot))))
        self._step_s = 0.8 * self._step_s + 0.2 * (time.perf_counter() - t) if self._step_s else time.perf_counter() - t

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
