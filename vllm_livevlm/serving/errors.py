"""HTTP errors in the OpenAI error format (`{"error": {"message", "type", "param", "code"}}`)."""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
          404: "NotFoundError", 413: "RequestTooLargeError", 415: "UnsupportedMediaTypeError",
          422: "UnprocessableEntityError", 429: "RateLimitError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error a route reports to the client, with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, dict]:
    """The OpenAI error object (also sent as an SSE event or a websocket message once a response started)."""
    kind = _TYPES.get(status, HTTPStatus(status).phrase.replace(" ", "") + "Error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param))
