"""Streaming, never buffering: a server process's peak memory while it receives a 1 GiB layer is
what it is for a 16 MiB one. The client sends the same random MiB over and over (nothing of that
size on disk or in the client's memory) and hashes what it sends."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

from .conftest import ServerProcess

MIB = 1 << 20


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS


def request(sock: socket.socket, head: str) -> dict[str, str]:
    sock.sendall(head.encode())
    return response(sock)


def response(sock: socket.socket) -> dict[str, str]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    headers[":status"] = lines[0].split()[1]
    return headers


def push(port: int, mib: int, chunked: bool) -> None:
    block = os.urandom(MIB)
    digest = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        host = f"Host: 127.0.0.1:{port}\r\n"
        r = request(sock, f"POST /v2/mem/test/blobs/uploads/ HTTP/1.1\r\n{host}Content-Length: 0\r\n\r\n")
        location = r["location"]
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {mib * MIB}"
        sock.sendall(f"PATCH {location} HTTP/1.1\r\n{host}{framing}\r\n\r\n".encode())
        for _ in range(mib):
            sock.sendall(b"%x\r\n%s\r\n" % (MIB, block) if chunked else block)
            digest.update(block)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        r = response(sock)
        assert r[":status"] == "202" and r["range"] == f"0-{mib * MIB - 1}"
    with socket.create_connection(("127.0.0.1", port)) as sock:  # the PATCH's may be closed
        r = request(sock, f"PUT {r['location']}?digest=sha256:{digest.hexdigest()} HTTP/1.1\r\n{host}"
                          "Content-Length: 0\r\n\r\n")
        assert r[":status"] == "201"


def test_memory_stays_flat_whatever_the_layer_size(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    server = ServerProcess(data)
    try:
        for chunked in (True, False):
            # Warmed up: threads, caches, and the staging buffers the process keeps for reuse
            # (as many as a push may hold unwritten, which a small push under load, or a large one
            # on a fast disk, need not reach).
            push(server.port, 1024, chunked)
            reset_peak(server.proc.pid)
            push(server.port, 16, chunked)
            small = peak_rss_mib(server.proc.pid)
            reset_peak(server.proc.pid)
            push(server.port, 1024, chunked)
            large = peak_rss_mib(server.proc.pid)
            assert large <= small * 1.1 + 4, (chunked, small, large)
    finally:
        server.stop()
