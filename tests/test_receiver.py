"""Large request bodies received straight into the upload's staging buffers (receiver.py): the
bytes stored and hashed are exactly the body's, what follows the body on the connection is never
taken for body bytes, a quiet client holds no staging, and a client gone mid-body keeps every
byte that arrived. In-process (asyncio's loop) and in a real server process (uvloop)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from urllib.parse import urlparse

import pytest

from regserve.api.common import REGISTRY_KEY
from regserve.receiver import BadFraming, Chunked

from .conftest import digest_of, http

BLOB = os.urandom((6 << 20) + 777)
HEADERS_FIRST = 0.3  # the handler starts, and takes the body over, before the body is sent


async def _raw(port: int, head: bytes, *parts: bytes, pause: float = HEADERS_FIRST) -> bytes:
    """Send `head`, wait, send `parts`; everything the server answers, until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    await asyncio.sleep(pause)
    for part in parts:
        writer.write(part)
        await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 30)  # read() returns at the server's close
    writer.close()
    return answer


def _patch_head(path: str, length: int, start: int | None = None) -> bytes:
    lines = [f"PATCH {path} HTTP/1.1", "Host: x", f"Content-Length: {length}",
             "Content-Type: application/octet-stream"]
    if start is not None:
        lines.append(f"Content-Range: {start}-{start + length - 1}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _start(client, repo: str = "big") -> str:
    r = await client.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status == 202
    return r.headers["Location"]


async def _stored(client, loc: str) -> int:
    r = await client.get(loc)
    assert r.status == 204
    return int(r.headers["Range"].split("-")[1]) + 1


async def test_a_large_body_is_received_in_place_and_the_connection_closed(client):
    loc = await _start(client)
    answer = await _raw(client.port, _patch_head(loc, len(BLOB)), BLOB)
    head = answer.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 202") and "Connection: close" in head, head
    assert await _stored(client, loc) == len(BLOB)
    assert (await client.put(f"{loc}?digest={digest_of(BLOB)}")).status == 201
    r = await client.get(f"/v2/big/blobs/{digest_of(BLOB)}")
    assert await r.read() == BLOB


async def test_a_request_behind_the_body_is_never_read_as_body(client):
    """A pipelined request right behind the body: one response, then the connection closes;
    the upload holds the body's bytes, none of the next request's."""
    loc = await _start(client)
    behind = f"DELETE {loc} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    answer = await _raw(client.port, _patch_head(loc, len(BLOB)), BLOB + behind)
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 202"), answer[:300]
    assert await _stored(client, loc) == len(BLOB)  # and the DELETE did not run
    assert (await client.put(f"{loc}?digest={digest_of(BLOB)}")).status == 201


async def test_a_body_continuing_mid_block_is_stored_whole(client):
    """A second PATCH that starts 1,000 bytes into the upload: its head completes the file's
    partial block (through the page cache), the rest is received into aligned buffers."""
    loc = await _start(client)
    r = await client.patch(loc, data=BLOB[:1000])
    assert r.status == 202
    answer = await _raw(client.port, _patch_head(r.headers["Location"], len(BLOB) - 1000, 1000), BLOB[1000:])
    assert b"Connection: close" in answer
    assert (await client.put(f"{loc}?digest={digest_of(BLOB)}")).status == 201
    assert await (await client.get(f"/v2/big/blobs/{digest_of(BLOB)}")).read() == BLOB


async def test_a_quiet_client_holds_no_staging_and_then_finishes(client):
    """Silent mid-body past the staging-idle pause: what arrived is written and the staging
    budget comes back; when the client goes on, the upload completes as if nothing happened."""
    driver = client.app[REGISTRY_KEY].driver
    loc = await _start(client)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(_patch_head(loc, len(BLOB)))
    await asyncio.sleep(HEADERS_FIRST)
    writer.write(BLOB[:(3 << 20) + 5])
    await writer.drain()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (driver.staging.used or await _stored(client, loc) < (3 << 20) + 5):
        await asyncio.sleep(0.2)
    assert driver.staging.used == 0
    assert await _stored(client, loc) == (3 << 20) + 5  # written, the partial block too
    writer.write(BLOB[(3 << 20) + 5:])
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 202"), answer[:300]
    assert (await client.put(f"{loc}?digest={digest_of(BLOB)}")).status == 201
    assert driver.staging.used == 0


async def test_a_client_gone_mid_body_keeps_every_byte_and_resumes(client):
    """The client sends part of the body and shuts its side: every byte sent is stored, with
    its hash state; the upload resumes from there."""
    loc = await _start(client)
    sent = (3 << 20) + 4321
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(_patch_head(loc, len(BLOB)))
    await asyncio.sleep(HEADERS_FIRST)
    writer.write(BLOB[:sent])
    writer.write_eof()
    await asyncio.wait_for(reader.read(), 30)
    writer.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and await _stored(client, loc) < sent:
        await asyncio.sleep(0.1)
    assert await _stored(client, loc) == sent
    r = await client.patch(loc, data=BLOB[sent:], headers={"Content-Range": f"{sent}-{len(BLOB) - 1}"})
    assert r.status == 202
    assert (await client.put(f"{loc}?digest={digest_of(BLOB)}")).status == 201


async def test_a_body_under_the_threshold_keeps_its_connection(client):
    """Small bodies go through aiohttp's parser: no reconnect for every small chunk."""
    loc = await _start(client)
    small = BLOB[:64 << 10]
    r = await client.patch(loc, data=small)
    assert r.status == 202 and r.headers.get("Connection") != "close"


def _send_all_then_read(port: int, head: bytes, body: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head)
        time.sleep(HEADERS_FIRST)
        s.sendall(body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


def test_received_in_place_by_a_server_process(server_factory):
    """The same under uvloop, in the process `regserve serve` runs: a body whose last bytes
    share a segment with a pipelined request, then a client cut off mid-body (RST), which
    resumes from the offset the server reports."""
    server = server_factory()
    _, headers, _ = http("POST", f"{server.url}/v2/p/blobs/uploads/")
    path = urlparse(headers["Location"]).path
    behind = f"DELETE {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    answer = _send_all_then_read(server.port, _patch_head(path, len(BLOB)), BLOB + behind)
    assert answer.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in answer, answer[:300]
    assert http("PUT", f"{server.url}{path}?digest={digest_of(BLOB)}")[0] == 201

    _, headers, _ = http("POST", f"{server.url}/v2/p/blobs/uploads/")
    path = urlparse(headers["Location"]).path
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(_patch_head(path, len(BLOB)))
        time.sleep(HEADERS_FIRST)
        s.sendall(BLOB[:5 << 20])
        time.sleep(0.5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    deadline = time.time() + 10
    while time.time() < deadline:
        status, headers, _ = http("GET", f"{server.url}{path}")
        offset = int(headers["Range"].split("-")[1]) + 1
        if offset == 5 << 20:
            break
        time.sleep(0.1)
    assert offset == 5 << 20  # all of it had arrived before the reset
    status, _, _ = http("PATCH", f"{server.url}{path}", BLOB[offset:],
                        {"Content-Range": f"{offset}-{len(BLOB) - 1}", "Content-Type": "application/octet-stream"})
    assert status == 202
    assert http("PUT", f"{server.url}{path}?digest={digest_of(BLOB)}")[0] == 201
    assert http("GET", f"{server.url}/v2/p/blobs/{digest_of(BLOB)}")[2] == BLOB

    # 1-byte chunks, read a slice at a time (the loop turns between reads)
    tiny = BLOB[:50_000]
    _, headers, _ = http("POST", f"{server.url}/v2/p/blobs/uploads/")
    path = urlparse(headers["Location"]).path
    answer = _send_all_then_read(server.port, _chunked_head(path), _framed(tiny, [1]))
    assert answer.startswith(b"HTTP/1.1 202"), answer[:300]
    assert http("PUT", f"{server.url}{path}?digest={digest_of(tiny)}")[0] == 201


# -- chunked bodies (docker's and podman's streamed PATCH) -------------------------------------------

def _framed(data: bytes, sizes: list[int], extension: bytes = b"", trailer: bytes = b"") -> bytes:
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        out.append(b"%x%s\r\n%s\r\n" % (n if pos + n <= len(data) else len(data) - pos, extension, data[pos:pos + n]))
        pos, i = pos + n, i + 1
    return b"".join(out) + b"0\r\n" + trailer + b"\r\n"


def _chunked_head(path: str) -> bytes:
    return f"PATCH {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()


def test_chunked_framing_is_taken_out_in_place_wherever_reads_split_it():
    """The framing state machine alone: random frame sizes (1 byte to 100 KiB), extensions and
    trailers, received in pieces split at random points (inside size lines and CRLFs too)."""
    import random

    rnd = random.Random(7)
    for _ in range(60):
        data = os.urandom(rnd.randrange(0, 300_000))
        sizes = [rnd.choice([1, 2, 7, 4096, 32 << 10, 100_000, rnd.randrange(1, 50_000)]) for _ in range(5)]
        wire = _framed(data, sizes, rnd.choice([b"", b";ext=1", b" ;a"]), rnd.choice([b"", b"X-T: 1\r\n"]))
        wire += b"GET / HTTP/1.1\r\n\r\n" if rnd.random() < 0.5 else b""  # behind the body
        framing, buf, filled, pos = Chunked(), memoryview(bytearray(len(wire))), 0, 0
        while pos < len(wire) and not framing.done:
            n = min(rnd.choice([1, 3, 9, 512, 70_000]), len(wire) - pos)
            buf[filled:filled + n] = wire[pos:pos + n]  # a read lands right after the data so far
            pos += n
            filled = framing.unframe(buf, filled, filled + n)
        assert framing.done and bytes(buf[:filled]) == data


def test_chunked_framing_refuses_what_is_not_http():
    for wire in (b"zz\r\nab\r\n", b"2\r\nabc\r\n", b"2\nab\r\n", b"-1\r\n", b"1" * 5000,
                 b"2\r\nab\r\n0\r\nX: " + b"y" * 20000 + b"\r\n\r\n", b"1ffffffffffffffff\r\n"):
        framing, buf = Chunked(), memoryview(bytearray(wire))
        with pytest.raises(BadFraming):
            framing.unframe(buf, 0, len(wire))


async def test_a_chunked_body_is_received_in_place(client):
    """docker's 32 KiB frames, sent with the head in one write (the first frames arrive with
    it) and in pieces after; then frames of odd sizes with extensions and a trailer."""
    for wire_of in (lambda b: _framed(b, [32 << 10]),
                    lambda b: _framed(b, [1, 100_000, 7, 3 << 20], b";x=y", b"Digest: none\r\n")):
        loc = await _start(client)
        wire = wire_of(BLOB)
        answer = await _raw(client.port, _chunked_head(loc) + wire[:300_000], wire[300_000:], pause=0)
        head = answer.split(b"\r\n\r\n")[0].decode()
        assert head.startswith("HTTP/1.1 202") and "Connection: close" in head, head
        assert await _stored(client, loc) == len(BLOB)
        assert (await client.put(f"{loc}?digest={digest_of(BLOB)}")).status == 201


async def test_a_content_length_body_sent_with_its_head_is_received_whole(client):
    """The head and the first MiBs in one write: aiohttp's parser has read part of the body
    when the upload takes it over."""
    loc = await _start(client)
    answer = await _raw(client.port, _patch_head(loc, len(BLOB)) + BLOB[:3 << 20], BLOB[3 << 20:], pause=0)
    assert answer.startswith(b"HTTP/1.1 202"), answer[:300]
    assert (await client.put(f"{loc}?digest={digest_of(BLOB)}")).status == 201


async def test_a_malformed_chunked_body_is_refused_and_what_came_before_kept(client):
    loc = await _start(client)
    good = _framed(BLOB[:3 << 20], [32 << 10])[:-5]  # without the last chunk
    answer = await _raw(client.port, _chunked_head(loc), good + b"zz\r\nab\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and b"BLOB_UPLOAD_INVALID" in answer, answer[:300]
    assert 0 < await _stored(client, loc) <= 3 << 20  # the session lives on, as after a cut


async def test_a_chunked_body_nobody_takes_goes_to_aiohttp(client):
    """A chunked PATCH answered without its body (an unknown session): the body held back
    for the upload is parsed as usual, and the connection serves the next request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    wire = _framed(BLOB[:200_000], [32 << 10])
    writer.write(_chunked_head("/v2/big/blobs/uploads/no-such-session") + wire
                 + b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b"BLOB_UPLOAD_UNKNOWN"), 10)
    assert first.startswith(b"HTTP/1.1 404")
    second = await asyncio.wait_for(reader.readuntil(b"HTTP/1.1 200"), 10)
    assert second
    writer.close()


async def test_a_pipelined_request_behind_a_chunked_body_is_dropped(client):
    loc = await _start(client)
    behind = f"DELETE {loc} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    answer = await _raw(client.port, _chunked_head(loc), _framed(BLOB, [32 << 10]) + behind)
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 202"), answer[:300]
    assert (await client.put(f"{loc}?digest={digest_of(BLOB)}")).status == 201


async def test_tiny_chunks_are_read_in_small_slices(client):
    """A body of 1-byte chunks (6 bytes of framing each) costs Python work per chunk: it is
    read DENSE_READ at a time, so no read holds the loop for long, and it is stored right."""
    from regserve import receiver

    offered: list[int] = []
    real = receiver.BodyReceiver.get_buffer

    def spy(self, sizehint):
        buf = real(self, sizehint)
        offered.append(len(buf))
        return buf

    receiver.BodyReceiver.get_buffer = spy
    try:
        body = BLOB[:60_000]
        loc = await _start(client)
        answer = await _raw(client.port, _chunked_head(loc) + _framed(body, [1])[:100_000],
                            _framed(body, [1])[100_000:], pause=0)
        assert answer.startswith(b"HTTP/1.1 202"), answer[:300]
    finally:
        receiver.BodyReceiver.get_buffer = real
    assert offered and max(offered[1:] or offered) <= receiver.DENSE_READ, offered[:10]
    assert (await client.put(f"{loc}?digest={digest_of(body)}")).status == 201


async def test_a_held_body_outside_the_api_goes_to_aiohttp(aiohttp_client, app_factory):
    """With http.prefix, a chunked PATCH to an upload path outside it is answered by the root
    application (404): its held body still goes to aiohttp, and the connection serves the next
    request at once (not after aiohttp's 10 s of lingering for a body that never comes)."""
    client = await aiohttp_client(app_factory(REGISTRY_HTTP_PREFIX="/reg/"))
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(_chunked_head("/v2/big/blobs/uploads/some-session") + _framed(BLOB[:100_000], [32 << 10])
                 + b"GET /reg/v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert first.startswith(b"HTTP/1.1 404"), first
    assert await asyncio.wait_for(reader.readuntil(b"HTTP/1.1 200"), 5)
    writer.close()
