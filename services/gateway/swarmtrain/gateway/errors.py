"""Errors as RFC 9457 problem JSON (``type, title, status, detail``); never a stack trace."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import asyncpg
import nats.errors
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.types import ExceptionHandlersMap

from swarmtrain.common.logging import get_logger
from swarmtrain.gateway.limits import body_too_large

PROBLEM_JSON = "application/problem+json"
log = get_logger("swarmtrain.gateway")


def problem(status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> Response[Any]:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **extra,
    }
    return Response(content=body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _validation_detail(exc: ValidationException) -> str:
    messages = [str(e.get("message", "")) for e in exc.extra or [] if isinstance(e, dict)]  # type: ignore[union-attr]
    messages = [m for m in messages if m]
    return "; ".join(messages) if messages else exc.detail


def _on_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if body_too_large(request):  # the body was cut at the limit: what failed after is a symptom
        exc = RequestEntityTooLarge()
    if isinstance(exc, ValidationException):
        return problem(exc.status_code, _validation_detail(exc), exc.headers)
    if isinstance(exc, RequestEntityTooLarge):
        limit = request.app.state.settings.max_upload_mb
        return problem(exc.status_code, f"request body larger than the {limit} MiB limit", exc.headers)
    if exc.status_code >= 500:
        log.error("request failed", path=request.url.path, status=exc.status_code, error=exc.detail)
    return problem(exc.status_code, exc.detail, exc.headers)


def _on_unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if isinstance(exc, nats.errors.Error):
        what = "event store"
    elif isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        what = "read-model database"
    else:
        what = "storage"
    log.warning("backend unavailable", path=request.url.path, backend=what, error=repr(exc))
    return problem(503, f"the {what} is unavailable; try again shortly", {"Retry-After": "1"})


def _on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error", path=request.url.path, method=request.method)
    return problem(500, "internal server error")


def handlers() -> ExceptionHandlersMap:
    return {
        HTTPException: _on_http_exception,
        nats.errors.Error: _on_unavailable,
        asyncpg.UndefinedTableError: _on_unavailable,  # the projector has not created its schema yet
        asyncpg.PostgresConnectionError: _on_unavailable,
        asyncpg.CannotConnectNowError: _on_unavailable,
        asyncpg.InterfaceError: _on_unavailable,
        OSError: _on_unavailable,
        Exception: _on_unexpected,
    }
