"""API errors: every error is a JSON body `{"error": {"code", "message"}}` (a 4xx status for bad input; stack
traces and server paths stay in the server log), the app's handlers that render them, the upload-size limit
(413), and `loggable`, which escapes what a request says before it reaches a log line."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lensmith.serve")

STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


LOGGED_CHARS = 300  # longest piece of a request (a path, a method) written to a log line


class ApiError(StarletteHTTPException):
    """An HTTP error with a machine-readable code; rendered as {"error": {"code", "message"}} (plus `headers`,
    e.g. Retry-After on a 503)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


def loggable(text: object, limit: int = LOGGED_CHARS) -> str:
    """`text` from a request, safe for a log line: control characters, line breaks and other unprintable
    characters escaped (\\n, \\x1b, \\u2028...), backslashes doubled, and cut to `limit` characters, so
    a request cannot forge log lines or terminal escapes."""
    value = str(text)
    cut = len(value) > limit
    value = value[:limit]
    if not value.isprintable() or "\\" in value:
        value = "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii") for c in value)
    return value + ("..." if cut else "")


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def http_error_response(exc: StarletteHTTPException) -> JSONResponse:
    """The JSON error answer for an HTTP error (ours carry a code; Starlette's and FastAPI's get one)."""
    code = getattr(exc, "code", None) or STATUS_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 400 and message == "There was an error parsing the body":
        code, message = "malformed_body", "the request body is not valid multipart/form-data"
    response = error_response(exc.status_code, code, message)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    if exc.status_code == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return http_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5])
        return error_response(422, "invalid_request", problems or "invalid request")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", loggable(request.method), loggable(request.url.path))
        return error_response(500, "internal_error", "internal error; the server log has the details")


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "too_large", f"request body exceeds the upload limit of {limit} bytes")


class BodyLimitMiddleware:
    """Refuse bodies above `limit` bytes: at once from Content-Length, else while streaming."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]], send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = error_response(413, "too_large", f"request body exceeds the upload limit of {self.limit} bytes")
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)  # an HTTPException: FastAPI's form parsing re-raises it as is
            return message

        await self.app(scope, limited_receive, send)
