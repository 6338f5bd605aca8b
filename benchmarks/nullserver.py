"""A registry-shaped server that does no work: it discards uploads and sendfiles one file for
every blob download. The benchmark client is measured against it to show it is not the
bottleneck (`python -m benchmarks --calibrate`). It is an aiohttp app, whose body parsing costs
per chunk; `raw_sink` answers streamed PATCHes from a bare socket instead, for the client's own
push ceiling with small chunked frames."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
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


def _discard_body(conn: socket.socket, pending: bytes, head: bytes) -> tuple[int, bytes]:
    """Read and drop one request body; (its decoded size, the bytes after it)."""
    lower = head.lower()
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    data, total = pending, 0
    if b"transfer-encoding: chunked" not in lower:
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0]) if b"content-length:" in lower else 0
        left = length - len(data)
        while left > 0:
            left -= conn.recv_into(view, min(len(buf), left))
        return length, b""
    while True:  # chunked: size line, data, CRLF ... "0", trailer, CRLF
        while b"\r\n" not in data:
            data += conn.recv(65536)
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            while b"\r\n\r\n" not in b"\r\n" + data:
                data += conn.recv(65536)
            return total, (b"\r\n" + data).split(b"\r\n\r\n", 1)[1]
        total += size
        skip = size + 2
        if len(data) >= skip:
            data = data[skip:]
            continue
        skip -= len(data)
        data = b""
        while skip > 0:
            n = conn.recv_into(view, min(len(buf), skip + 65536))
            if n > skip:
                data = bytes(view[skip:n])
            skip -= n


def _sink(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    more = conn.recv(65536)
                    if not more:
                        break
                    data += more
                if b"\r\n\r\n" not in data:
                    break
                head, _, data = data.partition(b"\r\n\r\n")
                size, data = _discard_body(conn, data, head)
                conn.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n"
                             b"Location: /v2/x/blobs/uploads/u\r\nRange: 0-%d\r\n\r\n" % max(size - 1, 0))


def raw_sink() -> tuple[str, multiprocessing.Process]:
    """A process that answers each request with 202 after dropping its body: (its URL, it)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    proc = multiprocessing.get_context("fork").Process(target=_sink, args=(listener,), daemon=True)
    proc.start()
    listener.close()
    return f"http://127.0.0.1:{port}", proc


def main() -> None:
    import uvloop

    from regserve.server import tune_malloc
    tune_malloc()  # as regserve does: aiohttp's body buffers stay in the heap
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
