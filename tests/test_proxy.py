"""The pull-through cache (`proxy.remoteurl`) against real upstreams on loopback: another regserve,
and Debian's distribution 2.8.2 with htpasswd and with token auth (the test's own token issuer).
Upstream requests are counted where they arrive, by a recording TCP relay in front of the
upstream, which can also cut a download midway."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import digest_of, http, image_manifest

CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'


def push_blob(url: str, name: str, data: bytes, headers: dict[str, str] | None = None) -> str:
    d = digest_of(data)
    status, _, body = http("POST", f"{url}/v2/{name}/blobs/uploads/?digest={d}", data,
                           {"Content-Type": "application/octet-stream", **(headers or {})})
    assert status == 201, body
    return d


def push_image(url: str, name: str, tag: str, layers: list[bytes],
               headers: dict[str, str] | None = None) -> tuple[str, bytes]:
    config = push_blob(url, name, CONFIG, headers)
    descs = [(push_blob(url, name, layer, headers), len(layer)) for layer in layers]
    manifest = image_manifest(config, len(CONFIG), descs)
    status, h, body = http("PUT", f"{url}/v2/{name}/manifests/{tag}", manifest,
                           {"Content-Type": "application/vnd.oci.image.manifest.v1+json", **(headers or {})})
    assert status == 201, body
    return h["Docker-Content-Digest"], manifest


class Relay:
    """A TCP relay on a free port in front of `target_port`, in a thread: it records each
    request's line and Range header, and can cut the first download of a path after
    `cut_after` response bytes."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: int | None = None
        self.cut_path: str | None = None
        self.cuts = 0
        self.rate: int | None = None  # bytes a second each connection's answers are held to
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def blob_gets(self, d: str) -> list[str | None]:
        """The Range header of every GET of blob `d` (None: the whole blob)."""
        return [r for line, r in self.requests if line.startswith("GET ") and f"/blobs/{d} " in line]

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        cut = {"armed": False}

        def upward() -> None:
            buf = b""
            try:
                while chunk := client.recv(65536):
                    buf += chunk
                    while b"\r\n\r\n" in buf:  # requests have no bodies here (pulls): one head each
                        head, buf = buf.split(b"\r\n\r\n", 1)
                        lines = head.decode("latin-1").split("\r\n")
                        ranged = next((v.split(":", 1)[1].strip() for v in lines[1:]
                                       if v.lower().startswith("range:")), None)
                        self.requests.append((lines[0], ranged))
                        if self.cut_after is not None and self.cut_path and self.cut_path in lines[0] \
                                and lines[0].startswith("GET ") and not self.cuts:
                            cut["armed"] = True
                    upstream.sendall(chunk)
            except OSError:
                pass
            finally:
                _close(upstream)

        threading.Thread(target=upward, daemon=True).start()
        sent = 0
        try:
            while chunk := upstream.recv(65536):
                if cut["armed"] and self.cut_after is not None and sent + len(chunk) > self.cut_after:
                    client.sendall(chunk[:max(self.cut_after - sent, 0)])
                    self.cuts += 1
                    break
                client.sendall(chunk)
                sent += len(chunk) if cut["armed"] else 0
                if self.rate:
                    time.sleep(len(chunk) / self.rate)
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)

    def close(self) -> None:
        self._stop = True
        self.listener.close()


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


@pytest.fixture
def relay():
    relays: list[Relay] = []

    def make(port: int) -> Relay:
        r = Relay(port)
        relays.append(r)
        return r
    yield make
    for r in relays:
        r.close()


def cache_env(url: str, **extra: str) -> dict[str, str]:
    return {"REGISTRY_PROXY_REMOTEURL": url, **extra}


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return http("GET", url, None, headers)


# -- an upstream regserve ---------------------------------------------------------------------

@pytest.fixture
def upstream(server_factory, tmp_path):
    return server_factory(tmp_path / "upstream")


def test_pulls_an_image_through_and_keeps_it(server_factory, upstream, relay, tmp_path):
    layers = [os.urandom(3 << 20), os.urandom(1000)]
    digest, manifest = push_image(upstream.url, "team/app", "v1", layers)
    r = relay(upstream.port)
    cache = server_factory(tmp_path / "cache", env=cache_env(r.url))
    status, h, body = get(f"{cache.url}/v2/team/app/manifests/v1")
    assert status == 200 and body == manifest and h["Docker-Content-Digest"] == digest
    for layer in layers:
        status, h, body = get(f"{cache.url}/v2/team/app/blobs/{digest_of(layer)}")
        assert status == 200 and body == layer and h["Content-Length"] == str(len(layer))
    # Kept: the same pull again fetches no blob, and revalidates the tag with a HEAD only.
    before = list(r.requests)
    status, _, body = get(f"{cache.url}/v2/team/app/manifests/v1")
    assert status == 200 and body == manifest
    for layer in layers:
        assert get(f"{cache.url}/v2/team/app/blobs/{digest_of(layer)}")[2] == layer
    again = [line for line, _ in r.requests[len(before):]]
    assert again == ["HEAD /v2/team/app/manifests/v1 HTTP/1.1"], again
    # In distribution's layout: the cache's directory is a registry of its own.
    tag_link = tmp_path / "cache/docker/registry/v2/repositories/team/app/_manifests/tags/v1/current/link"
    assert tag_link.read_text() == digest
    assert not list((tmp_path / "cache/docker/registry/v2/repositories/team/app/_uploads").iterdir())


def test_a_moved_tag_is_followed_and_the_cache_serves_when_the_upstream_is_down(server_factory, upstream, tmp_path):
    push_image(upstream.url, "app", "latest", [b"one"])
    cache = server_factory(tmp_path / "cache", env=cache_env(upstream.url))
    assert get(f"{cache.url}/v2/app/manifests/latest")[0] == 200
    digest2, manifest2 = push_image(upstream.url, "app", "latest", [b"two"])
    status, h, body = get(f"{cache.url}/v2/app/manifests/latest")
    assert status == 200 and body == manifest2 and h["Docker-Content-Digest"] == digest2
    assert get(f"{cache.url}/v2/app/blobs/{digest_of(b'two')}")[2] == b"two"
    status, _, body = get(f"{cache.url}/v2/app/tags/list")
    assert status == 200 and json.loads(body)["tags"] == ["latest"]
    upstream.stop()
    status, h, body = get(f"{cache.url}/v2/app/manifests/latest")
    assert status == 200 and body == manifest2
    assert get(f"{cache.url}/v2/app/manifests/{digest2}")[2] == manifest2
    assert get(f"{cache.url}/v2/app/blobs/{digest_of(b'two')}")[2] == b"two"
    assert json.loads(get(f"{cache.url}/v2/app/tags/list")[2])["tags"] == ["latest"]
    # What was never cached: the upstream's absence says so, as a server error, not "unknown".
    status, _, body = get(f"{cache.url}/v2/app/manifests/other")
    assert status == 502 and json.loads(body)["errors"][0]["code"] == "UNKNOWN"
    assert get(f"{cache.url}/v2/app/blobs/{digest_of(b'never')}")[0] == 502


def test_unknown_content_is_unknown(server_factory, upstream, tmp_path):
    push_image(upstream.url, "app", "v1", [b"x"])
    cache = server_factory(tmp_path / "cache", env=cache_env(upstream.url))
    for path, code in (("/v2/app/manifests/nope", "MANIFEST_UNKNOWN"),
                       (f"/v2/app/manifests/{digest_of(b'nope')}", "MANIFEST_UNKNOWN"),
                       (f"/v2/app/blobs/{digest_of(b'nope')}", "BLOB_UNKNOWN"),
                       ("/v2/other/tags/list", "NAME_UNKNOWN")):
        status, _, body = get(cache.url + path)
        assert status == 404 and json.loads(body)["errors"][0]["code"] == code, (path, body)
    assert http("HEAD", f"{cache.url}/v2/app/blobs/{digest_of(b'nope')}")[0] == 404
    assert not (tmp_path / "cache/docker/registry/v2/blobs").exists() or \
        not list((tmp_path / "cache/docker/registry/v2/blobs").rglob("data"))


def test_head_asks_the_upstream_and_fetches_nothing(server_factory, upstream, relay, tmp_path):
    layer = os.urandom(100_000)
    push_image(upstream.url, "app", "v1", [layer])
    r = relay(upstream.port)
    cache = server_factory(tmp_path / "cache", env=cache_env(r.url))
    status, h, _ = http("HEAD", f"{cache.url}/v2/app/blobs/{digest_of(layer)}")
    assert status == 200 and h["Content-Length"] == str(len(layer))
    assert r.blob_gets(digest_of(layer)) == []


def test_pushes_and_deletes_are_refused(server_factory, upstream, tmp_path):
    digest, manifest = push_image(upstream.url, "app", "v1", [b"x"])
    cache = server_factory(tmp_path / "cache", env=cache_env(upstream.url))
    assert get(f"{cache.url}/v2/app/manifests/v1")[0] == 200
    for method, path, body in (("POST", "/v2/app/blobs/uploads/", None),
                               ("POST", f"/v2/app/blobs/uploads/?digest={digest_of(b'y')}", b"y"),
                               ("PUT", "/v2/app/manifests/v2", manifest),
                               ("DELETE", f"/v2/app/manifests/{digest}", None),
                               ("DELETE", f"/v2/app/blobs/{digest_of(b'x')}", None)):
        status, _, answer = http(method, cache.url + path, body,
                                 {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        assert status == 405, (method, path, answer)
        assert json.loads(answer)["errors"][0]["code"] == "UNSUPPORTED"
    assert get(f"{upstream.url}/v2/app/manifests/v2")[0] == 404


def test_a_range_of_a_blob_being_fetched(server_factory, upstream, tmp_path):
    layer = os.urandom(5 << 20)
    push_image(upstream.url, "app", "v1", [layer])
    cache = server_factory(tmp_path / "cache", env=cache_env(upstream.url))
    status, h, body = get(f"{cache.url}/v2/app/blobs/{digest_of(layer)}", {"Range": "bytes=1000-1999"})
    assert status == 206 and body == layer[1000:2000]
    assert h["Content-Range"] == f"bytes 1000-1999/{len(layer)}"
    assert get(f"{cache.url}/v2/app/blobs/{digest_of(layer)}")[2] == layer


def fetch_all(url: str, clients: int) -> list[tuple[int, str, int]]:
    """`clients` concurrent GETs of `url`: (status, sha256 of the body, its length) each."""
    def one(_: int) -> tuple[int, str, int]:
        h, n = hashlib.sha256(), 0
        with urllib.request.urlopen(url, timeout=300) as r:
            while chunk := r.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
            return r.status, "sha256:" + h.hexdigest(), n
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(clients)))


def big_layer(size: int) -> bytes:
    """`size` bytes that do not compress (a block of random bytes, each copy varied)."""
    block = os.urandom(1 << 20)
    return b"".join(i.to_bytes(8, "big") + block[8:] for i in range(size >> 20))


def test_32_clients_one_upstream_fetch_across_workers(server_factory, upstream, relay, tmp_path):
    layer = big_layer(1 << 30)
    push_image(upstream.url, "big", "v1", [layer])
    d = digest_of(layer)
    del layer
    r = relay(upstream.port)
    cache = server_factory(tmp_path / "cache", env=cache_env(r.url), workers=2)
    results = fetch_all(f"{cache.url}/v2/big/blobs/{d}", 32)
    assert all(x == (200, d, 1 << 30) for x in results), results[:3]
    assert r.blob_gets(d) == [None]
    assert (tmp_path / f"cache/docker/registry/v2/blobs/sha256/{d[7:9]}/{d[7:]}/data").stat().st_size == 1 << 30


def test_a_cut_upstream_download_resumes_where_it_stopped(server_factory, upstream, relay, tmp_path):
    layer = big_layer(96 << 20)
    push_image(upstream.url, "app", "v1", [layer])
    d = digest_of(layer)
    r = relay(upstream.port)
    r.cut_path, r.cut_after = f"/blobs/{d}", 40 << 20
    cache = server_factory(tmp_path / "cache", env=cache_env(r.url))
    results = fetch_all(f"{cache.url}/v2/app/blobs/{d}", 3)
    assert all(x == (200, d, len(layer)) for x in results), results
    gets = r.blob_gets(d)
    assert r.cuts == 1 and len(gets) == 2 and gets[0] is None, gets
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", gets[1]).group(1))
    assert 0 < resumed_at <= 40 << 20  # what arrived before the cut was kept


def test_a_fetcher_killed_midway_is_taken_over(server_factory, upstream, relay, tmp_path):
    """kill -9 of the process fetching: a reader in another process resumes the fetch from the
    bytes stored, and its client gets the whole blob."""
    layer = big_layer(128 << 20)
    push_image(upstream.url, "app", "v1", [layer])
    d = digest_of(layer)
    r = relay(upstream.port)
    r.rate = 16 << 20  # bytes a second: slow enough to kill it midway
    first = server_factory(tmp_path / "cache", env=cache_env(r.url))
    second = server_factory(tmp_path / "cache", env=cache_env(r.url))
    data = tmp_path / f"cache/docker/registry/v2/repositories/app/_uploads/fetch-sha256-{d[7:]}/data"
    threading.Thread(target=lambda: _ignore(fetch_all, f"{first.url}/v2/app/blobs/{d}", 1), daemon=True).start()
    deadline = time.time() + 30
    while not (data.exists() and data.stat().st_size > 8 << 20) and time.time() < deadline:
        time.sleep(0.01)
    first.stop(signal.SIGKILL)
    r.rate = None
    assert fetch_all(f"{second.url}/v2/app/blobs/{d}", 1) == [(200, d, len(layer))]
    gets = r.blob_gets(d)
    assert len(gets) == 2 and gets[0] is None and int(gets[1][6:-1]) >= 8 << 20, gets


def _ignore(f, *args):
    try:
        f(*args)
    except OSError:
        pass  # its server was killed
