"""The HTTP server: OpenAI-compatible chat completions and legacy completions (streamed or not) over one
loaded model and its continuous-batching scheduler, retrieved images by index key, health, metrics and the
chat page."""
from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import io
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from fromage.runtime.errors import FromageError, ParameterError
from fromage.runtime.generate import Fromage, ImageEvent, TextEvent
from fromage.runtime.preprocess import ImageTooLarge, load_rgb
from fromage.runtime.scheduler import PREFIX_CACHE_BYTES, Finished, QueueFull, Scheduler

from .errors import BadRequest, error_body
from .media import MediaPolicy
from .metrics import Metrics
from .completions import TextAnswer, parse_completion_request
from .protocol import ChatAnswer, finish_reason, image_part, param_error, parse_chat_request, usage

STATIC = Path(__file__).with_name("static")
IMAGE_PX = 512  # retrieved images are served as PNG thumbnails of at most this size


@dataclass
class ServerConfig:
    bundle: str
    index: str | None = None
    engine: str = "auto"
    kv_cache: str = "f32"                   # the KV cache's element: f32, or f16 (native engine)
    device: str = "cpu"
    threads: int | None = None
    verify: bool = True
    max_batch: int = 16
    max_queue: int = 64
    prefill_rows: int | None = None         # prompt positions per step while others decode (None: Scheduler's rule)
    prefix_cache_bytes: int = PREFIX_CACHE_BYTES  # recent prompts' caches (0: none)
    api_key: str | None = None
    allowed_media_dir: str | None = None
    max_body_bytes: int = 100 * 1024 * 1024
    model_name: str | None = None
    max_prompt_tokens: int | None = None   # prompt positions per request (None: the model's context)
    max_tokens: int | None = None          # output tokens per request (None: what the context leaves)


class _State:
    def __init__(self, config: ServerConfig):
        self.config, self.model, self.scheduler, self.load_error = config, None, None, None
        self.model_name = config.model_name or Path(config.bundle).name
        self.media = MediaPolicy(Path(config.allowed_media_dir) if config.allowed_media_dir else None)
        self.metrics = Metrics(lambda: self.scheduler.counts if self.scheduler else (0, 0),
                               lambda: self.scheduler.cache_bytes if self.scheduler else (0, 0))

    def load(self, model: Fromage | None = None) -> None:
        c = self.config
        try:
            model = model or Fromage(c.bundle, index=c.index, device=c.device, threads=c.threads, verify=c.verify,
                                     engine=c.engine, kv_cache=c.kv_cache)
            self.media.index = model.index
            self.scheduler = Scheduler(model, max_batch=c.max_batch, max_queue=c.max_queue,
                                       max_prompt=c.max_prompt_tokens, max_new_tokens=c.max_tokens,
                                       prefill_rows=c.prefill_rows, prefix_cache_bytes=c.prefix_cache_bytes)
            # what is loaded now lives as long as the server: a full collection (which holds the GIL while every
            # stream waits for its next step) need not walk it again
            gc.collect()
            gc.freeze()
            self.model = model
        except FromageError as e:
            self.load_error = str(e)
        except Exception as e:  # reported by /health, not lost in a thread
            self.load_error = f"{type(e).__name__}: {e}"

    def ready(self) -> None:
        if self.model is None:
            raise BadRequest(f"the model failed to load: {self.load_error}" if self.load_error
                             else "the model is loading; retry shortly", 503)


def create_app(config: ServerConfig, model: Fromage | None = None) -> FastAPI:
    """The app; the model loads in a background thread at startup (/health answers 503 until it is
    ready), or is the one given (tests share one)."""
    state = _State(config)

    async def lifespan(app):
        loader = threading.Thread(target=state.load, args=(model,), daemon=True)
        loader.start()
        yield
        if state.scheduler:
            state.scheduler.close()

    app = FastAPI(title="fromage", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.fromage = state

    @app.exception_handler(BadRequest)
    async def bad_request(request, e: BadRequest):
        return JSONResponse(error_body(str(e), e.status, e.param), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), e.status_code), status_code=e.status_code)

    app.add_middleware(_Guard, config=config)

    @app.get("/health")
    async def health():
        if state.model is None:
            status = {"status": "error", "error": state.load_error} if state.load_error else {"status": "loading"}
            return JSONResponse(status, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/v1/models")
    async def models():
        state.ready()
        m, c = state.model, state.config
        # max_model_len as vLLM reports it; how this server runs the model, under "fromage" (an extension)
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "fromage", "max_model_len": m.max_positions,
                                            "fromage": {"engine": m.engine, "kernels": getattr(m.decoder, "kernels", None),
                                                        "kv_cache": m.kv_cache,
                                                        "precision": m.bundle.manifest.get("precision", "fp32"),
                                                        "max_batch": c.max_batch}}]}

    @app.get("/v1/images/{key}")
    async def image(key: str):
        state.ready()
        if not key.isdigit() or len(key) > 18 or state.model.index is None:
            raise BadRequest("no such image", 404)
        png = await run_in_threadpool(_thumbnail, state.model.index, int(key))
        if png is None:
            raise BadRequest("no such image", 404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def answer(request: Request, parse, Answer):
        """One generation request: parsed by `parse`, queued, its answer written by `Answer` (whole or streamed)."""
        state.ready()
        body = await _read_json(request, config.max_body_bytes)
        req = parse(body, state.media, config.max_tokens)
        t0 = time.perf_counter()
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(event):  # in the scheduler's thread; a request's end is counted even if its client left
            if isinstance(event, Finished):
                state.metrics.finished(event.result, time.perf_counter() - t0)
            loop.call_soon_threadsafe(events.put_nowait, event)
        try:
            handle = await run_in_threadpool(state.scheduler.submit, req.parts, req.params, on_event)
        except QueueFull as e:
            raise BadRequest(str(e), 429) from None
        except ParameterError as e:
            raise param_error(e, body) from None
        except FromageError as e:
            raise BadRequest(str(e), 413 if isinstance(e, ImageTooLarge) else 400) from None
        positions = handle.embeds.shape[1]
        state.metrics.prompt_tokens.inc(positions)
        outputs = _Outputs(events, state.metrics, t0)
        writer = Answer(f"{Answer.id_prefix}-{uuid.uuid4().hex}", state.model_name, req)
        if req.stream:
            return StreamingResponse(_sse(handle, outputs, writer, positions, req.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finished = await _until_finished(handle, outputs, request)
        if finished is None:  # the client went away
            return Response(status_code=499)
        if finished.error:
            raise BadRequest(finished.error, 500)
        return writer.whole(finished.result, positions)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, parse_chat_request, ChatAnswer)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, parse_completion_request, TextAnswer)

    return app


class _Outputs:
    """A request's events as the client sees them, timed for the metrics."""

    def __init__(self, events: asyncio.Queue, metrics: Metrics, t0: float):
        self.events, self.metrics, self.t0, self.last = events, metrics, t0, None

    async def next(self):
        event = await self.events.get()
        now = time.perf_counter()
        if isinstance(event, (TextEvent, ImageEvent)):
            if self.last is None:
                self.metrics.ttft.observe(now - self.t0)
            else:
                self.metrics.itl.observe(now - self.last)
            self.last = now
        return event


async def _until_finished(handle, outputs: _Outputs, request: Request):
    """Waits for the request's end; cancels it (freeing its slot) if the client disconnects first."""
    async def disconnected():  # the body is read: the next message from the server is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass
    waiter, gone = asyncio.ensure_future(_drain(outputs)), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        return waiter.result() if waiter in done else None
    finally:
        if not waiter.done():
            handle.cancel()
        waiter.cancel(), gone.cancel()


async def _drain(outputs: _Outputs) -> Finished:
    while not isinstance(event := await outputs.next(), Finished):
        pass
    return event


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(handle, outputs: _Outputs, writer, positions: int, include_usage: bool):
    """Server-sent events: the writer's opening chunks, text and image chunks, the finish chunk, usage if
    asked, [DONE]. A client that disconnects cancels this generator at its next await: the request is
    cancelled."""
    try:
        for opening in writer.opening():
            yield _data(opening)
        while True:
            event = await outputs.next()
            if isinstance(event, TextEvent):
                if (piece := writer.text(event.text)) is not None:
                    yield _data(piece)
            elif isinstance(event, ImageEvent):
                hit = event.hits[0]
                yield _data(writer.image(image_part(hit.key, hit.score, hit.caption)))
            elif isinstance(event, Finished):
                if event.error:
                    yield _data({"error": {"message": event.error, "type": "server_error", "code": 500}})
                yield _data(writer.closing(finish_reason(event.result)))
                if include_usage:
                    yield _data(writer.usage(usage(event.result, positions)))
                yield "data: [DONE]\n\n"
                return
    finally:
        handle.cancel()  # no-op when finished; frees the slot when the client went away


class _Guard:
    """The API key on /v1/* and the early refusal of a body announced too large, as plain ASGI: responses
    (token streams above all) pass through untouched, not re-streamed chunk by chunk through another task
    as under Starlette's @app.middleware("http")."""

    def __init__(self, app, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self._refusal(Request(scope))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, request: Request) -> JSONResponse | None:
        key, limit = self.config.api_key, self.config.max_body_bytes
        if request.url.path.startswith("/v1/") and key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return JSONResponse(error_body("missing or wrong API key (Authorization: Bearer KEY)", 401),
                                    status_code=401)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            return JSONResponse(error_body(f"the body is larger than {limit} bytes", 413), status_code=413)
        return None


async def _read_json(request: Request, limit: int):
    """The body, read up to `limit` bytes (413 beyond), as JSON (400 if it is not)."""
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise BadRequest(f"the body is larger than {limit} bytes", 413)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None


@functools.lru_cache(maxsize=256)
def _thumbnail_png(path: str) -> bytes:
    img = load_rgb(path)
    img.thumbnail((IMAGE_PX, IMAGE_PX))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _thumbnail(index, key: int) -> bytes | None:
    found = index.get(key)
    if found is None:
        return None
    try:
        return _thumbnail_png(found[0])
    except FromageError:
        return None

