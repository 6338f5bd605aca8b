"""GET /v2/: the API version check."""

from __future__ import annotations

from aiohttp import web

from .auth import BASE


async def version_check(request: web.Request) -> web.Response:
    return web.json_response({})


version_check.access = BASE  # type: ignore[attr-defined]  # authentication only


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v2/", version_check)
    app.router.add_get("/v2", version_check)
