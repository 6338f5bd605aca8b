"""GET /v2/<name>/tags/list."""

from __future__ import annotations

from aiohttp import web

from .auth import requires
from .common import PROXY_KEY, page, page_headers, page_request, repository


@requires("pull")
async def list_tags(request: web.Request) -> web.Response:
    repo = repository(request)
    n, last = page_request(request)
    proxy = request.app.get(PROXY_KEY)
    tags, more = page(await (proxy.tags(repo) if proxy is not None else repo.tags.all()), n, last)
    return web.json_response({"name": repo.name, "tags": tags},
                             headers=page_headers(f"/v2/{repo.name}/tags/list", tags, n, more))


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v2/{name:.+}/tags/list", list_tags)
