"""GET /v2/<name>/tags/list."""

from __future__ import annotations

from aiohttp import web

from .auth import requires
from .common import paginate, repository


@requires("pull")
async def list_tags(request: web.Request) -> web.Response:
    repo = repository(request)
    tags, headers = paginate(await repo.tags.all(), request, f"/v2/{repo.name}/tags/list")
    return web.json_response({"name": repo.name, "tags": tags}, headers=headers)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v2/{name:.+}/tags/list", list_tags)
