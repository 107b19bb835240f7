"""The request-size limit, enforced without leaking spooled uploads.

Litestar raises ``RequestEntityTooLarge`` from inside ``Request.stream()``; when that happens in
the middle of a multipart upload, its form parser does not close the upload it was spooling (the
temporary file is left to the garbage collector). ``GatewayRequest`` turns the limit into an early
end of the stream instead: the parser then fails the usual way, closing its files, and the error
handler answers 413 because the request is marked.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from litestar import Request
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

TOO_LARGE = "swarmtrain_body_too_large"


class GatewayRequest(Request[Any, Any, Any]):
    async def stream(self) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in super().stream():
                yield chunk
        except RequestEntityTooLarge:
            self.scope.setdefault("state", {})[TOO_LARGE] = True
            yield b""


def body_too_large(request: Request[Any, Any, Any]) -> bool:
    return bool(request.scope.get("state", {}).get(TOO_LARGE))
