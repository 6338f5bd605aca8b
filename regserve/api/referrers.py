"""GET /v2/<name>/referrers/<digest> (OCI 1.1)."""

from __future__ import annotations

import json

from aiohttp import web

from ..reference import parse_digest
from ..registry.manifests import OCI_INDEX
from .auth import requires
from .common import repository


@requires("pull")
async def list_referrers(request: web.Request) -> web.Response:
    repo = repository(request)
    subject = parse_digest(request.match_info["digest"])
    artifact_type = request.query.get("artifactType") or None
    descriptors = await repo.manifests.referrers(subject, artifact_type)
    headers = {"Content-Type": OCI_INDEX}
    if artifact_type is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    return web.Response(body=json.dumps(body).encode(), headers=headers)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v2/{name:.+}/referrers/{digest:[^/]+}", list_referrers)
