"""OpenAI's legacy completions schema (`POST /v1/completions`), which vLLM's and llama-server's benchmark
clients and many tools speak: a text prompt continued as it is (no chat format), the same sampling
fields and checks as chat (protocol.py), `echo`. A retrieved image comes as chat's does, an extension
a plain client ignores: `choices[0].parts` (whole answer) or a chunk whose `parts` holds it (stream).
Token-id, batched (several prompts) and logprob requests are refused with a 400 that says so.
"""
from __future__ import annotations

from .errors import BadRequest
from .protocol import Answer, GenerationRequest, check_fields, finish_reason, hit_part, sampling, usage

DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for this endpoint
OWN_FIELDS = {"prompt", "echo", "logprobs", "suffix", "best_of"}


def parse_completion_request(body, media, max_tokens: int | None = None) -> GenerationRequest:
    """A decoded JSON body -> GenerationRequest (`media` unused: the prompt is text)."""
    check_fields(body, OWN_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("`prompt` must be a non-empty string (token-id and batched prompts are not supported)",
                         param="prompt")
    for name, allowed in (("logprobs", (None,)), ("suffix", (None, "")), ("best_of", (None, 1))):
        if body.get(name) not in allowed:
            raise BadRequest(f"`{name}` is not supported", param=name)
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise BadRequest("`echo` must be true or false", param="echo")
    return GenerationRequest([prompt], *sampling(body, max_tokens, default_max_tokens=DEFAULT_MAX_TOKENS),
                             echo=prompt if echo else "")


def _parts(result_parts: list) -> list:
    """A Result's parts as they are (a continuation: its leading space kept)."""
    return [{"type": "text", "text": p["text"]} if p["type"] == "text" else hit_part(p) for p in result_parts]


class TextAnswer(Answer):
    """How /v1/completions writes an answer (the same object, whole or streamed)."""
    id_prefix, chunk_kind = "cmpl", "text_completion"

    def __init__(self, rid: str, model: str, request: GenerationRequest):
        super().__init__(rid, model)
        self.echo = request.echo

    def _one(self, text: str, reason: str | None = None, **extra) -> dict:
        """A text_completion object (a whole answer or a chunk) with its one choice."""
        return self._object(self.chunk_kind, [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason,
                                               **extra}])

    def whole(self, result, positions: int) -> dict:
        parts = _parts(result.parts)
        text = self.echo + "".join(p["text"] for p in parts if p["type"] == "text")
        return {**self._one(text, finish_reason(result), parts=parts), "usage": usage(result, positions)}

    def opening(self) -> list[dict]:
        return [self._one(self.echo)] if self.echo else []

    def text(self, text: str) -> dict | None:
        return self._one(text) if text else None

    def image(self, part: dict) -> dict:
        return self._one("", parts=[part])

    def closing(self, reason: str) -> dict:
        return self._one("", reason)
