"""GET /v2/_catalog."""

from __future__ import annotations

from aiohttp import web

from .auth import CATALOG_ACCESS
from .common import CONFIG_KEY, page_headers, page_request, registry


async def catalog(request: web.Request) -> web.Response:
    n, last = page_request(request, request.app[CONFIG_KEY].catalog_max_entries)
    names, more = await registry(request).catalog(n, last)
    return web.json_response({"repositories": names}, headers=page_headers("/v2/_catalog", names, n, more))


catalog.access = CATALOG_ACCESS  # type: ignore[attr-defined]


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v2/_catalog", catalog)
