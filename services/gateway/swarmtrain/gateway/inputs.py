"""Rules for client-supplied strings, checked before they reach a query or an event.

PostgreSQL text cannot hold NUL, and an event stored with one would stop the projector on it; a
lone surrogate cannot be encoded at all. Ids are the gateway's own (uuid4 hex): anything else
names nothing, so it is answered as not found without a query. Unknown query parameters are
refused like unknown body fields.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from litestar import Request
from litestar.exceptions import ClientException

_ID = re.compile(r"^[0-9a-f]{32}$")


def is_id(value: str) -> bool:
    return bool(_ID.match(value))


def storable(value: str) -> bool:
    """No control characters (NUL included) and valid UTF-8 (no lone surrogates)."""
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(value: str, limit: int = 100) -> str:
    """``value`` made safe to echo in an error message: control characters escaped, cut at ``limit``."""
    return ascii(value[:limit]) if not storable(value) else repr(value[:limit])


_NOT_QUERY = frozenset({"self", "request", "data", "gw", "state", "scope", "headers", "cookies", "query", "body"})


async def reject_unknown_query_parameters(request: Request[Any, Any, Any]) -> None:
    """``before_request``: a query parameter the route does not define is a 400, as an unknown body
    field is (a misspelt ``limit`` would otherwise be silently ignored)."""
    handler = request.route_handler
    allowed = set(handler.parsed_fn_signature.parameters) - _NOT_QUERY - set(request.path_params)
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        expected = f"expected {', '.join(sorted(allowed))}" if allowed else "it takes none"
        raise ClientException(f"unknown query parameter {printable(unknown[0])}: {expected}")
