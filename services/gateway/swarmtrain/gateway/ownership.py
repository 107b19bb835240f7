"""One rule for every route that names a resource: it is the caller's, or it is not found.

A resource of someone else's answers 404 exactly as one that does not exist, and an id that is not
one of the gateway's own (see ``inputs.is_id``) is answered so without a query.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from litestar.exceptions import NotFoundException

from swarmtrain.gateway.inputs import is_id, printable

T = TypeVar("T")


async def owned(what: str, resource_id: str, find: Callable[[str], Awaitable[T | None]]) -> T:
    """What ``find(resource_id)`` returns (it looks among the caller's own); 404 "no {what} {id}" for
    ``None`` or an id that names nothing."""
    found = await find(resource_id) if is_id(resource_id) else None
    if found is None:
        raise NotFoundException(f"no {what} {printable(resource_id)}")
    return found
