"""A registry-shaped server that does no work: it discards uploads and sendfiles one file for
every blob download. The benchmark client is measured against it to show it is not the
bottleneck (`python -m benchmarks --calibrate`)."""

from __future__ import annotations

import asyncio
import os
import sys

from aiohttp import web

from regserve.api.sendfile import send_file

MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'


async def drain(request: web.Request) -> int:
    n = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return n
        n += len(chunk)


async def start(request: web.Request) -> web.Response:
    n = await drain(request)
    if "digest" in request.query:
        return web.Response(status=201, headers={"Location": "/v2/x/blobs/" + request.query["digest"]})
    return web.Response(status=202, headers={"Location": "/v2/x/blobs/uploads/u", "Range": f"0-{max(n - 1, 0)}"})


async def patch(request: web.Request) -> web.Response:
    n = await drain(request)
    return web.Response(status=202, headers={"Location": "/v2/x/blobs/uploads/u", "Range": f"0-{max(n - 1, 0)}"})


async def put(request: web.Request) -> web.Response:
    await drain(request)
    return web.Response(status=201, headers={"Location": "/v2/x/blobs/" + request.query.get("digest", "")})


async def blob(request: web.Request) -> web.StreamResponse:
    path = request.app["file"]
    size = os.path.getsize(path)
    start, end, status, headers = 0, size - 1, 200, {}
    rng = request.headers.get("Range")
    if rng:
        a, b = rng.split("=")[1].split("-")
        start, end, status = int(a), min(int(b), size - 1), 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return await send_file(request, web.StreamResponse(status=status, headers=headers), path, start,
                           end - start + 1)


async def manifest(request: web.Request) -> web.Response:
    return web.Response(body=MANIFEST, content_type="application/vnd.oci.image.manifest.v1+json")


def main() -> None:
    import uvloop
    port = int(sys.argv[1])
    app = web.Application()
    app["file"] = sys.argv[2]
    app.router.add_get("/v2/", lambda r: web.json_response({}))
    app.router.add_post("/v2/{name:.+}/blobs/uploads/", start)
    app.router.add_patch("/v2/{name:.+}/blobs/uploads/{id}", patch)
    app.router.add_put("/v2/{name:.+}/blobs/uploads/{id}", put)
    app.router.add_get("/v2/{name:.+}/blobs/{digest}", blob)
    app.router.add_route("*", "/v2/{name:.+}/manifests/{ref}", manifest)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None, read_bufsize=1 << 20)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
