"""GET /v2/_catalog."""

from __future__ import annotations

from aiohttp import web

from .auth import CATALOG_ACCESS
from .common import CONFIG_KEY, paginate, registry


async def catalog(request: web.Request) -> web.Response:
    names, headers = paginate(await registry(request).catalog(), request, "/v2/_catalog",
                              request.app[CONFIG_KEY].catalog_max_entries)
    return web.json_response({"repositories": names}, headers=headers)


catalog.access = CATALOG_ACCESS  # type: ignore[attr-defined]


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v2/_catalog", catalog)
