"""The browser dashboard: pages (``pages``), their templates and the vendored chart library."""

from swarmtrain.gateway.dashboard.pages import ROUTES, TEMPLATES

__all__ = ["ROUTES", "TEMPLATES"]
