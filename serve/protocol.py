"""OpenAI's chat-completions schema, in and out: a request body -> the prompt and SamplingParams; the
runtime's events -> response objects and stream chunks. The sampling fields and their checks are shared
with the legacy completions endpoint (completions.py).

Retrieved images are an extension a plain OpenAI client ignores: `message.content` (and a stream
chunk's `delta.content`) carries the text only; `message.parts` (and `delta.parts`) carries the answer
in order, text parts `{"type": "text", "text"}` and image parts
`{"type": "image_url", "image_url": {"url": "/v1/images/KEY"}, "key", "score", "caption"}`.
Besides OpenAI's fields, `ignore_eos: true` (as in vLLM) generates exactly max_tokens tokens, `top_k`
(as in vLLM and llama-server) samples among the k most likely tokens, and
`retrieval` (default true; false: [RET] is never chosen), `min_word_tokens` (default 2), `max_rets`
(default 1: one retrieval per answer; 0 = no limit), `ret_scale_factor` and `top_images` steer retrieval
as in `fromage generate`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from fromage.runtime.chat import ANSWER_STOPS, AnswerStart, answer_parts, chat_prompt
from fromage.runtime.errors import ParameterError
from fromage.runtime.sampling import MAX_STOP_STRINGS, SamplingParams

from .errors import BadRequest
from .media import image_part_from_url

DEFAULT_MAX_TOKENS = 256
# request fields that are OpenAI's but change nothing here; anything else unknown is refused
IGNORED_FIELDS = {"model", "user", "n", "presence_penalty", "frequency_penalty", "logit_bias", "metadata", "store",
                  "service_tier", "parallel_tool_calls", "response_format"}
PARAMS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
          "top_p": "top_p", "seed": "seed", "stop": "stop",
          "top_k": "top_k",  # not OpenAI's; vLLM's and llama-server's extension
          # fromage's own: retrieval in an answer (defaults as the demo's: DEFAULTS)
          "retrieval": "retrieval", "min_word_tokens": "min_word_tokens", "max_rets": "max_rets",
          "ret_scale_factor": "ret_scale_factor", "top_images": "top_images"}
COMMON_FIELDS = {"stream", "stream_options", "ignore_eos"}  # every generation request's, besides PARAMS
# an answer does not open with an image and shows at most one retrieval, as in the demo
DEFAULTS = {"min_word_tokens": 2, "max_rets": 1}


@dataclass
class GenerationRequest:
    parts: list
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: str = ""  # legacy completions' `echo`: the prompt the answer's text starts with


def check_fields(body, own: set) -> None:
    """A JSON object whose fields are the sampling ones, the ignored ones and the endpoint's `own`; n = 1."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = set(body) - set(PARAMS) - IGNORED_FIELDS - COMMON_FIELDS - own
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
    if body.get("n", 1) != 1:
        raise BadRequest("only n = 1 is supported", param="n")


def sampling(body: dict, max_tokens: int | None, format_stops: tuple = (),
             default_max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[SamplingParams, bool, bool]:
    """The request's SamplingParams (every value checked), stream and include_usage. `max_tokens`, the server's
    cap, also caps the default when the request names none; `format_stops` end an answer besides the user's
    stops (the chat format's next turn)."""
    kwargs = {**DEFAULTS, "max_new_tokens": default_max_tokens}
    if max_tokens is not None:
        kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], max_tokens)
    for name, field in PARAMS.items():
        if body.get(name) is not None:
            kwargs[field] = body[name]
    stop = kwargs.pop("stop", None)
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not isinstance(stop, list):
        raise BadRequest("`stop` must be a string or a list of strings", param="stop")
    if stop is not None and len(stop) > MAX_STOP_STRINGS - len(format_stops):
        raise BadRequest(f"stop: at most {MAX_STOP_STRINGS - len(format_stops)} strings, got {len(stop)}", param="stop")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest("`ignore_eos` must be true or false", param="ignore_eos")
    if ignore_eos:  # vLLM's extension, for benchmarks: exactly max_tokens tokens (no EOS, no end of answer)
        kwargs["stop_ids"] = []
    try:
        params = SamplingParams(**kwargs, stop=tuple(stop or ()) + (() if ignore_eos else format_stops))
    except ParameterError as e:
        raise param_error(e, body) from None
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise BadRequest("`stream` must be true or false and `stream_options` an object", param="stream")
    return params, stream, bool(options.get("include_usage", False))


def parse_chat_request(body, media, max_tokens: int | None = None) -> GenerationRequest:
    """A decoded JSON body -> GenerationRequest. `media` is the server's media.MediaPolicy; `max_tokens`, the
    server's cap."""
    check_fields(body, {"messages"})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list", param="messages")
    turns = [_message(m, i, media) for i, m in enumerate(messages)]
    if turns[-1][0] != "user":
        raise BadRequest("the last message must be the user's", param="messages")
    return GenerationRequest(chat_prompt(turns), *sampling(body, max_tokens, ANSWER_STOPS))


def param_error(e: ParameterError, body: dict) -> BadRequest:
    """A parameter refused by the runtime, named as the request named it (max_tokens or max_completion_tokens)."""
    field = next((k for k, v in PARAMS.items() if v == e.param and k in body), e.param)
    return BadRequest(f"{field}: {e.message}", param=field)


def finish_reason(result) -> str:
    return FINISH_REASONS.get(result.stop_reason, "error")


def _message(m, i: int, media) -> tuple[str, list]:
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
        raise BadRequest(f"{where} must be an object with role system, user or assistant", param="messages")
    content = m.get("content")
    if isinstance(content, str):
        return m["role"], [content]
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or a list of parts", param="messages")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict) and isinstance(part["image_url"].get("url"), str):
            parts.append(image_part_from_url(part["image_url"]["url"], media, f"{where}.content[{j}]"))
        else:
            raise BadRequest(f"{where}.content[{j}] must be a text part or an image_url part", param="messages")
    return m["role"], parts


# ---- responses --------------------------------------------------------------------------------
def image_part(key: int, score: float, caption: str | None) -> dict:
    """A retrieved image as a response part: by index key, never by path."""
    return {"type": "image_url", "image_url": {"url": f"/v1/images/{key}"}, "key": key,
            "score": round(float(score), 6), "caption": caption}


def hit_part(p: dict) -> dict:
    """A Result's image part -> the response's (by index key)."""
    return image_part(p["key"], p["score"], p.get("caption"))


def response_parts(result_parts: list) -> list:
    """A Result's parts -> the chat response's parts, from the answer's first non-blank character."""
    return answer_parts(result_parts, hit_part)


def usage(result, prompt_positions: int) -> dict:
    n = len(result.token_ids)
    return {"prompt_tokens": prompt_positions, "completion_tokens": n, "total_tokens": prompt_positions + n,
            "prompt_tokens_details": {"cached_tokens": result.cached_positions}}


FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


class Answer:
    """What the endpoints' answer writers share (ChatAnswer, completions.TextAnswer): each writes one request's
    answer whole, or as stream chunks (the app's _sse): opening(), text(), image(), closing(), usage()."""
    id_prefix = chunk_kind = ""

    def __init__(self, rid: str, model: str):
        self.rid, self.model = rid, model

    def _object(self, kind: str, choices: list) -> dict:
        return {"id": self.rid, "object": kind, "created": int(time.time()), "model": self.model, "choices": choices}

    def usage(self, usage_: dict) -> dict:
        return {**self._object(self.chunk_kind, []), "usage": usage_}


class ChatAnswer(Answer):
    """How /v1/chat/completions writes an answer."""
    id_prefix, chunk_kind = "chatcmpl", "chat.completion.chunk"

    def __init__(self, rid: str, model: str, request: GenerationRequest):
        super().__init__(rid, model)
        self.start = AnswerStart()

    def _chunk(self, delta: dict, reason: str | None = None) -> dict:
        return self._object(self.chunk_kind, [{"index": 0, "delta": delta, "finish_reason": reason}])

    def whole(self, result, positions: int) -> dict:
        parts = response_parts(result.parts)
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        message = {"role": "assistant", "content": text, "parts": parts}
        return {**self._object("chat.completion", [{"index": 0, "message": message,
                                                     "finish_reason": finish_reason(result)}]),
                "usage": usage(result, positions)}

    def opening(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def text(self, text: str) -> dict | None:
        text = self.start(text)
        return self._chunk({"content": text}) if text else None

    def image(self, part: dict) -> dict:
        return self._chunk({"parts": [part]})

    def closing(self, reason: str) -> dict:
        return self._chunk({}, reason)
