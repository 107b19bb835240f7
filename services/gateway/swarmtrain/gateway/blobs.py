"""Signed, object-scoped URLs of a ``file://`` store: ``GET``/``PUT /blobs/{key}?exp=…[&max=…]&sig=…``.

A peer holds no storage credential: the scheduler hands it URLs signed with
``Settings.blob_signing_secret`` (``swarmtrain.common.signing``), and these routes honour exactly
what a URL grants: one method, one key, until its expiry, and for a PUT at most ``max`` bytes. No
access token is needed (the signature is the credential); anything the signature does not cover is
403, as problem JSON. A PUT streams the body into the store (never whole in memory), stops at the
cap with 413 and writes atomically: a refused or broken upload leaves nothing behind, not even a
half-written object.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, put
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException, NotFoundException, PermissionDeniedException
from litestar.params import QueryParameter
from litestar.response import Stream

from swarmtrain.common import signing
from swarmtrain.common.blob import BlobNotFound, MiB, OutsideStore, TooLarge
from swarmtrain.common.logging import get_logger
from swarmtrain.gateway.errors import documented
from swarmtrain.gateway.state import Gateway

log = get_logger("swarmtrain.gateway")
Exp = Annotated[str | None, QueryParameter(description="When the URL expires, in Unix seconds (signed).")]
Sig = Annotated[str | None, QueryParameter(description="HMAC-SHA256 of the method, key, expiry and size (hex).")]
Max = Annotated[str | None, QueryParameter(description="The most bytes the upload may hold (signed).")]


class StoredOut(msgspec.Struct, kw_only=True):
    key: str
    sha256: str
    """Of the bytes the gateway received and stored."""
    size: int


class _BodyReader:
    """A blocking ``read(n)`` over the request's async body, for ``BlobStore.put_stream`` in a worker
    thread: a read that needs more bytes pulls chunks on the event loop until it has ``n`` (one hop
    to the loop per read, not per network chunk). ``TooLarge`` past ``cap`` bytes."""

    def __init__(self, body: AsyncGenerator[bytes, None], loop: asyncio.AbstractEventLoop, cap: int) -> None:
        self._body = body
        self._loop = loop
        self._cap = cap
        self._buffer = bytearray()
        self._done = False
        self.size = 0

    async def _fill(self, n: int) -> None:
        while not self._done and (n < 0 or len(self._buffer) < n):
            try:
                chunk = await self._body.__anext__()
            except StopAsyncIteration:
                self._done = True
                break
            self.size += len(chunk)
            if self.size > self._cap:
                raise TooLarge(f"the body is larger than the {self._cap}-byte limit")
            self._buffer += chunk

    def read(self, n: int = -1) -> bytes:
        if not self._done and (n < 0 or len(self._buffer) < n):
            asyncio.run_coroutine_threadsafe(self._fill(n), self._loop).result()
        size = len(self._buffer) if n < 0 else min(n, len(self._buffer))
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out


def _granted(
    request: Request[Any, Any, Any],
    gw: Gateway,
    method: str,
    exp: str | None,
    sig: str | None,
    max_bytes: str | None = None,
) -> str:
    """The key this request names, if its URL grants ``method`` on it now; 403 otherwise."""
    key = request.scope["path"].removeprefix(signing.ROUTE + "/")
    try:
        signing.verify(gw.settings.blob_signing_secret, method, key, exp, sig, max_bytes)
    except signing.Forbidden as exc:
        log.info("blob URL refused", method=method, reason=str(exc))
        raise PermissionDeniedException("this URL does not grant the request") from None
    return key


class BlobController(Controller):
    path = signing.ROUTE
    tags = ["blobs"]
    opt = {"exclude_from_auth": True}
    """The signature is the credential: no access token."""

    @get(
        "/{key:path}",
        media_type="application/octet-stream",
        summary="Read one object through a signed URL (handed to peers)",
        responses=documented(400, 403, 404),
    )
    async def read(
        self,
        request: Request[Any, Any, Any],
        gw: NamedDependency[Gateway],
        exp: Exp = None,
        sig: Sig = None,
    ) -> Stream:
        key = _granted(request, gw, "GET", exp=exp, sig=sig)
        try:
            exists = await asyncio.to_thread(gw.store.exists, key)
        except OutsideStore:
            raise PermissionDeniedException("this URL does not grant the request") from None
        if not exists:
            raise NotFoundException("no such object")
        return Stream(gw.store.iter_chunks(key), media_type="application/octet-stream")

    @put(
        "/{key:path}",
        status_code=201,
        summary="Write one object through a signed URL (handed to peers)",
        responses=documented(400, 403, 404, 413),
        request_max_body_size=None,  # the grant's own cap applies, below
    )
    async def write(
        self,
        request: Request[Any, Any, Any],
        gw: NamedDependency[Gateway],
        exp: Exp = None,
        sig: Sig = None,
        max: Max = None,
    ) -> StoredOut:
        key = _granted(request, gw, "PUT", exp=exp, sig=sig, max_bytes=max)
        cap = min(int(max or 0), gw.settings.blob_max_download_mb * MiB)
        announced = request.headers.get("content-length", "")
        if announced.isdigit() and int(announced) > cap:
            raise HTTPException(status_code=413, detail=f"request body larger than the {cap}-byte limit")
        body = request.stream()
        reader = _BodyReader(body, asyncio.get_running_loop(), cap)
        try:
            ref = await asyncio.to_thread(gw.store.put_stream, key, reader, -1)  # type: ignore[arg-type]
        except TooLarge:
            raise HTTPException(status_code=413, detail=f"request body larger than the {cap}-byte limit") from None
        except (OutsideStore, BlobNotFound):
            raise PermissionDeniedException("this URL does not grant the request") from None
        finally:
            await body.aclose()
        return StoredOut(key=key, sha256=ref.sha256, size=ref.size)
