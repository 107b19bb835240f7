"""The dashboard's pages: server-side Jinja templates that call the REST API from the browser.

The pages themselves hold no data and no secret: each is the same for everyone, so serving them
needs no token. The browser keeps the access token in ``sessionStorage`` and sends it as a Bearer
header on every API call (never in a URL, so never in a log); the live curves read
``GET /sessions/{id}/stream`` with ``fetch`` and a stream reader, because ``EventSource`` cannot
send that header. A session page of someone else's session shows the API's 404, as the API does.

No page names a strategy: the new-session form lists the contract's strategies, and every page
carries the gateway's per-strategy rules as a JSON data block (``#strategy-rules``) that the script
asks (``rules.rounds``, ``rules.shared_model``) instead of comparing names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar import Controller, Response, get
from litestar.datastructures import CacheControlHeader
from litestar.params import FromPath
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from litestar.types import ControllerRouterHandler

from swarmtrain.common import models, strategies
from swarmtrain.gateway.inputs import is_id

try:
    from litestar.plugins.jinja import JinjaTemplateEngine
except ImportError:  # pragma: no cover - litestar < 2.13
    from litestar.contrib.jinja import JinjaTemplateEngine

HERE = Path(__file__).parent
PREFIX = "/ui"
_PUBLIC: dict[str, Any] = {"exclude_from_auth": True}
SECURITY_HEADERS = {
    # scripts and styles from this origin only; the API is this origin too
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
PAGES = {
    "signin": "Sign in",
    "peers": "Peers",
    "datasets": "Datasets",
    "new": "Start a session",
    "sessions": "Sessions",
}

TEMPLATES: TemplateConfig[JinjaTemplateEngine] = TemplateConfig(
    directory=HERE / "templates", engine=JinjaTemplateEngine
)


def _page(name: str, status_code: int = 200, **context: Any) -> Template:
    return Template(
        template_name=f"{name}.html",
        context={
            "page": name,
            "title": PAGES.get(name, "swarmtrain"),
            "prefix": PREFIX,
            "pages": PAGES,
            "strategy_rules": strategies.as_json(),
            "model_kinds": models.KINDS.list(),
            **context,
        },
        status_code=status_code,
        headers=SECURITY_HEADERS,
        media_type="text/html",
    )


class DashboardController(Controller):
    path = PREFIX
    include_in_schema = False
    opt = _PUBLIC

    @get(["/", "/sessions"])
    async def sessions(self) -> Template:
        return _page("sessions")

    @get("/signin")
    async def signin(self) -> Template:
        return _page("signin")

    @get("/peers")
    async def peers(self) -> Template:
        return _page("peers")

    @get("/datasets")
    async def datasets(self) -> Template:
        return _page("datasets")

    @get("/new")
    async def new_session(self) -> Template:
        return _page("new")

    @get("/sessions/{session_id:str}")
    async def session(self, session_id: FromPath[str]) -> Template:
        if not is_id(session_id):
            return _page("notfound", status_code=404, detail="no such session")
        return _page("session", session_id=session_id, title="Session")


@get("/", include_in_schema=False, opt=_PUBLIC)
async def home() -> Response[Any]:
    return Redirect(path=f"{PREFIX}/")


STATIC = create_static_files_router(
    path=f"{PREFIX}/static",
    directories=[HERE / "static"],
    name="dashboard-static",
    opt=_PUBLIC,
    include_in_schema=False,
    cache_control=CacheControlHeader(max_age=300),
)

ROUTES: list[ControllerRouterHandler] = [DashboardController, home, STATIC]
