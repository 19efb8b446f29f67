"""The server's refusals, in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from fromage.runtime.errors import FromageError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class BadRequest(FromageError):
    """A request the server refuses: `status` (400, 413, ...) and the field it concerns (`param`)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def error_body(message: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": status}}
