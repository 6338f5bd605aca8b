"""The pull-through cache (`proxy.remoteurl`) against real upstreams on loopback: another regserve,
and Debian's distribution 2.8.2 with htpasswd and with token auth (the test's own token issuer).
Upstream requests are counted where they arrive, by a recording TCP relay in front of the
upstream, which can also cut a download midway."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .authutil import TokenMaker, htpasswd_file, write_pem
from .conftest import ROOT, digest_of, free_port, http, image_manifest, require_tool
from .test_layout_compat import Distribution

CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'


def push_blob(url: str, name: str, data: bytes, headers: dict[str, str] | None = None) -> str:
    d = digest_of(data)
    status, h, body = http("POST", f"{url}/v2/{name}/blobs/uploads/?digest={d}", data,
                           {"Content-Type": "application/octet-stream", **(headers or {})})
    if status == 202:  # distribution 2.8.2 opens a session instead: the bytes go with the PUT
        location = urllib.parse.urljoin(url, h["Location"])
        status, _, body = http("PUT", f"{location}{'&' if '?' in location else '?'}digest={d}", data,
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
        self.corrupt_path: str | None = None  # a GET of it gets one byte of its answer flipped,
        self.corrupt_at = 1 << 20             # the last of the first piece received after this many
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
        cut = {"armed": False, "corrupt": False}

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
                        if self.corrupt_path and self.corrupt_path in lines[0] and lines[0].startswith("GET "):
                            cut["corrupt"] = True
                    upstream.sendall(chunk)
            except OSError:
                pass
            finally:
                _close(upstream)

        threading.Thread(target=upward, daemon=True).start()
        sent = 0
        received = 0
        try:
            while chunk := upstream.recv(65536):
                received += len(chunk)
                if cut["corrupt"] and received > self.corrupt_at:
                    chunk = chunk[:-1] + bytes([chunk[-1] ^ 1])
                    cut["corrupt"] = False
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


def fetch_all(url: str, clients: int, layer: bytes | None = None) -> list[tuple[int, str, int]]:
    """`clients` concurrent GETs of `url`: (status, sha256 of the body, its length) each. Given
    the `layer` expected, bodies are compared with it instead of hashed (32 GiB hashed by the
    test would cost more than the cache's own work), and its digest stands for a body equal to it."""
    named = digest_of(layer) if layer is not None else ""

    def one(_: int) -> tuple[int, str, int]:
        h, n, same = hashlib.sha256(), 0, True
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        with urllib.request.urlopen(url, timeout=300) as r:
            while got := r.readinto(buf):
                if layer is None:
                    h.update(view[:got])
                else:
                    same = same and (buf if got == len(buf) else buf[:got]) == layer[n:n + got]  # memcmp
                n += got
            if layer is not None:
                return r.status, named if same and n == len(layer) else "other bytes", n
            return r.status, "sha256:" + h.hexdigest(), n
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(clients)))


def big_layer(size: int) -> bytes:
    """`size` bytes that do not compress (a block of random bytes, each copy varied)."""
    block = os.urandom(1 << 20)
    return b"".join(i.to_bytes(8, "big") + block[8:] for i in range(size >> 20))


def peak_rss_mib(pid: int) -> list[float]:
    """VmHWM of a process and its children (the workers)."""
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    peaks = []
    for p in pids:
        status = Path(f"/proc/{p}/status").read_text()
        peaks.append(int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024)
    return peaks


def test_32_clients_one_upstream_fetch_across_workers(server_factory, upstream, relay, tmp_path):
    layer = big_layer(1 << 30)
    push_image(upstream.url, "big", "v1", [layer])
    d = digest_of(layer)
    r = relay(upstream.port)
    cache = server_factory(tmp_path / "cache", env=cache_env(r.url), workers=2)
    results = fetch_all(f"{cache.url}/v2/big/blobs/{d}", 32, layer)
    assert all(x == (200, d, 1 << 30) for x in results), results[:3]
    peaks = peak_rss_mib(cache.proc.pid)
    print("peak RSS of the cache's processes (MiB):", peaks)
    assert max(peaks) < 200, peaks  # a 1 GiB blob, to 32 clients: never in memory
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


def _outcome(f, *args):
    try:
        return f(*args)
    except (OSError, HTTPException) as e:  # refused, or cut short (IncompleteRead)
        return e


def _ignore(f, *args):
    try:
        f(*args)
    except OSError:
        pass  # its server was killed


def test_an_upstream_blob_that_does_not_match_its_digest_is_never_kept(server_factory, upstream, relay, tmp_path):
    layer = big_layer(16 << 20)
    push_image(upstream.url, "app", "v1", [layer])
    d = digest_of(layer)
    r = relay(upstream.port)
    r.corrupt_path = f"/blobs/{d}"
    cache = server_factory(tmp_path / "cache", env=cache_env(r.url))
    with ThreadPoolExecutor(3) as pool:  # no client gets a whole body: the last bytes wait for the digest
        outcomes = list(pool.map(lambda _: _outcome(fetch_all, f"{cache.url}/v2/app/blobs/{d}", 1), range(3)))
    assert all(isinstance(o, (OSError, HTTPException)) or o[0][2] < len(layer) for o in outcomes), outcomes
    assert not list((tmp_path / "cache/docker/registry/v2").rglob("blobs/sha256/*/*/data"))
    log = cache.log_path.read_text()
    assert "does not match its digest" in log
    r.corrupt_path = None
    assert fetch_all(f"{cache.url}/v2/app/blobs/{d}", 1) == [(200, d, len(layer))]


# -- distribution 2.8.2 upstreams: htpasswd and token auth -------------------------------------

USERS = {"mirror": "mirror-secret"}


def basic_headers(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


class TokenIssuer:
    """The test's own token server for distribution's `auth.token`: Basic credentials checked
    against USERS, every action asked for granted; it counts the tokens it issued."""

    def __init__(self) -> None:
        self.maker = TokenMaker()
        self.issued: list[str] = []
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                expected = basic_headers("mirror", USERS["mirror"])["Authorization"]
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                access = []
                for scope in query.get("scope", []):
                    kind, name, actions = scope.split(":")
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
                issuer.issued.append(",".join(query.get("scope", [])))
                body = json.dumps({"token": issuer.maker.token(access, time.time(), ttl=300),
                                   "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bearer(self, scope: str) -> dict[str, str]:
        access = [{"type": "repository", "name": scope.split(":")[1], "actions": ["pull", "push"]}]
        return {"Authorization": "Bearer " + self.maker.token(access, time.time())}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def distribution_upstream(tmp_path):
    require_tool("docker-registry", "CNCF distribution 2.8.2, an upstream of the cache")
    started: list[Distribution] = []
    issuers: list[TokenIssuer] = []

    def start(auth: str) -> tuple[Distribution, dict[str, str]]:
        data = tmp_path / "distribution"
        data.mkdir(exist_ok=True)
        if auth == "htpasswd":
            path = htpasswd_file(tmp_path / "htpasswd", USERS)
            extra = f"auth: {{htpasswd: {{realm: upstream, path: {path}}}}}\n"
            headers = basic_headers("mirror", USERS["mirror"])
        else:
            issuer = TokenIssuer()
            issuers.append(issuer)
            cert = write_pem(tmp_path / "issuer.pem", issuer.maker.cert)
            extra = (f"auth: {{token: {{realm: '{issuer.url}', service: test-registry, issuer: test-issuer, "
                     f"rootcertbundle: {cert}}}}}\n")
            headers = issuer.bearer("repository:library/app:push")
        d = Distribution(data, tmp_path, extra=extra, ready=(401,))
        d.issuer = issuers[-1] if issuers else None  # type: ignore[attr-defined]
        started.append(d)
        return d, headers

    yield start
    for d in started:
        d.stop()
    for i in issuers:
        i.close()


@pytest.mark.parametrize("auth", ["htpasswd", "token"])
def test_distribution_upstream_with_credentials(server_factory, distribution_upstream, tmp_path, auth):
    upstream, headers = distribution_upstream(auth)
    layer = os.urandom(2 << 20)
    digest, manifest = push_image(upstream.url, "library/app", "v1", [layer], headers)
    secret = tmp_path / "upstream-password"
    secret.write_text(USERS["mirror"] + "\n")
    cache = server_factory(tmp_path / "cache", env=cache_env(
        upstream.url, REGISTRY_PROXY_USERNAME="mirror", REGISTRY_PROXY_PASSWORDFILE=str(secret)))
    status, h, body = get(f"{cache.url}/v2/library/app/manifests/v1")
    assert status == 200 and body == manifest and h["Docker-Content-Digest"] == digest
    assert get(f"{cache.url}/v2/library/app/blobs/{digest_of(layer)}")[2] == layer
    assert get(f"{cache.url}/v2/library/app/manifests/v1")[2] == manifest
    if auth == "token":  # one token for the repository's scope, kept while it lasts
        assert upstream.issuer.issued.count("repository:library/app:pull") == 1, upstream.issuer.issued
    # Without the credentials the upstream refuses the cache, which has nothing to answer with.
    anonymous = server_factory(tmp_path / "anonymous", env=cache_env(upstream.url))
    status, _, body = get(f"{anonymous.url}/v2/library/app/manifests/v1")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert "upstream" in anonymous.log_path.read_text()


# -- real clients through the cache -------------------------------------------------------------

def podman(tmp: Path, *args: str) -> str:
    """Rootful podman with its storage, registries and auth file of its own under `tmp`."""
    require_tool("podman", "real client pulling through the cache")
    conf = tmp / "podman"
    if not conf.exists():
        conf.mkdir()
        (conf / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{conf}/graph"\nrunroot = "{conf}/run"\n')
        (conf / "containers.conf").write_text('[engine]\nevents_logger = "file"\ncgroup_manager = "cgroupfs"\n')
        (conf / "auth.json").write_text('{"auths":{}}')
    registries = conf / "registries.conf"
    registries.write_text("")
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf / "storage.conf"),
           "CONTAINERS_CONF": str(conf / "containers.conf"), "CONTAINERS_REGISTRIES_CONF": str(registries),
           "REGISTRY_AUTH_FILE": str(conf / "auth.json")}
    r = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, f"podman {' '.join(args)}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_skopeo_and_podman_pull_a_multi_platform_image_through(server_factory, upstream, relay, tmp_path):
    from .oci_layout import build_index
    from .test_e2e_skopeo import blobs, skopeo
    require_tool("skopeo", "real client pulling through the cache")
    src = tmp_path / "src"
    index_digest = build_index(src, "multi", ROOT / "regserve")
    up = upstream.url.removeprefix("http://")
    skopeo("copy", "--all", "--preserve-digests", "--dest-tls-verify=false", f"oci:{src}:multi",
           f"docker://{up}/e2e/multi:latest")
    r = relay(upstream.port)
    cache = server_factory(tmp_path / "cache", env=cache_env(r.url))
    host = cache.url.removeprefix("http://")
    out = tmp_path / "out"
    skopeo("copy", "--all", "--preserve-digests", "--src-tls-verify=false",
           f"docker://{host}/e2e/multi:latest", f"oci:{out}:multi")
    assert json.loads((out / "index.json").read_text())["manifests"][0]["digest"] == index_digest
    assert blobs(out) == blobs(src)
    podman(tmp_path, "pull", "--tls-verify=false", "--platform", "linux/arm64", f"{host}/e2e/multi:latest")
    pulled = json.loads(podman(tmp_path, "image", "inspect", f"{host}/e2e/multi:latest"))
    assert pulled[0]["Digest"] == index_digest and pulled[0]["Architecture"] == "arm64"
    podman(tmp_path, "rmi", "--all")
    fetched = [line for line, _ in r.requests if line.startswith("GET ") and "/blobs/" in line]
    assert len(fetched) == len(set(fetched)), fetched  # every blob once, whoever pulled it


def test_cached_content_expires_after_the_ttl_and_is_fetched_again(server_factory, upstream, relay, tmp_path):
    layer = os.urandom(200_000)
    digest, manifest = push_image(upstream.url, "app", "v1", [layer])
    r = relay(upstream.port)
    cache = server_factory(tmp_path / "cache", env=cache_env(r.url, REGISTRY_PROXY_TTL="1s"))
    assert get(f"{cache.url}/v2/app/manifests/v1")[2] == manifest
    assert get(f"{cache.url}/v2/app/blobs/{digest_of(layer)}")[2] == layer
    repo = tmp_path / "cache/docker/registry/v2/repositories/app"
    deadline = time.time() + 20
    while list(repo.rglob("link")) and time.time() < deadline:
        time.sleep(0.1)
    assert list(repo.rglob("link")) == []
    assert "expired (proxy.ttl)" in cache.log_path.read_text()
    assert get(f"{cache.url}/v2/app/manifests/v1")[2] == manifest
    assert get(f"{cache.url}/v2/app/blobs/{digest_of(layer)}")[2] == layer
    assert len(r.blob_gets(digest_of(layer))) == 1  # the store still had the bytes: linked again
    gets = [line for line, _ in r.requests if line.startswith("GET ") and "/manifests/" in line]
    assert len(gets) == 2, gets


def test_metrics_count_hits_misses_and_upstream_bytes(server_factory, upstream, tmp_path):
    layer = os.urandom(300_000)
    push_image(upstream.url, "app", "v1", [layer])
    debug = f"127.0.0.1:{free_port()}"
    cache = server_factory(tmp_path / "cache", env=cache_env(
        upstream.url, REGISTRY_HTTP_DEBUG_ADDR=debug, REGISTRY_HTTP_DEBUG_PROMETHEUS_ENABLED="true"))
    get(f"{cache.url}/v2/app/manifests/v1")
    assert get(f"{cache.url}/v2/app/blobs/{digest_of(layer)}")[2] == layer
    d = digest_of(layer)
    published = tmp_path / f"cache/docker/registry/v2/blobs/sha256/{d[7:9]}/{d[7:]}/data"
    deadline = time.time() + 10
    while not published.exists() and time.time() < deadline:  # the fetch ends just after its bytes
        time.sleep(0.01)
    for _ in range(2):
        assert get(f"{cache.url}/v2/app/blobs/{d}")[2] == layer
    text = get(f"http://{debug}/metrics")[2].decode()

    def value(pattern: str) -> float:
        m = re.search("^" + pattern + r" (\S+)", text, re.M)
        assert m, pattern
        return float(m.group(1))
    assert value(r'regserve_proxy_requests_total\{kind="blob",result="miss"\}') == 1
    assert value(r'regserve_proxy_requests_total\{kind="blob",result="hit"\}') == 2
    assert value(r'regserve_proxy_requests_total\{kind="manifest",result="miss"\}') == 1
    assert value(r"regserve_proxy_upstream_bytes_total") >= len(layer)


def test_a_manifest_that_does_not_match_its_digest_is_refused_and_not_kept(server_factory, upstream, relay, tmp_path):
    digest, manifest = push_image(upstream.url, "app", "v1", [b"x"])
    r = relay(upstream.port)
    r.corrupt_path, r.corrupt_at = f"/manifests/{digest}", 0  # the last byte of the (one-piece) answer
    cache = server_factory(tmp_path / "cache", env=cache_env(r.url))
    status, _, body = get(f"{cache.url}/v2/app/manifests/v1")
    assert status == 502 and "does not match" in json.loads(body)["errors"][0]["message"] + \
        json.dumps(json.loads(body)["errors"][0].get("detail"))
    assert not (tmp_path / "cache/docker/registry/v2/repositories/app/_manifests").exists() or \
        not list((tmp_path / "cache/docker/registry/v2/repositories/app/_manifests").rglob("link"))
    r.corrupt_path = None
    assert get(f"{cache.url}/v2/app/manifests/v1")[2] == manifest


async def test_a_storage_error_mid_fetch_is_taken_over_and_nothing_partial_is_published(
        server_factory, tmp_path, aiohttp_client):
    """EIO on a write of the fetch: the download stops, nothing is published, and the waiting
    client's reader takes the fetch over from what was stored; the client gets the whole blob."""
    import errno

    from regserve.api.app import make_app, make_registry
    from regserve.storage.filesystem import FilesystemDriver

    from .conftest import make_config
    from .faults import FaultyDriver
    upstream = server_factory(tmp_path / "upstream")
    layer = big_layer(24 << 20)
    push_image(upstream.url, "app", "v1", [layer])
    d = digest_of(layer)
    (tmp_path / "cache").mkdir()
    driver = FaultyDriver(FilesystemDriver(str(tmp_path / "cache")))
    fault = driver.inject("writer.write", errno.EIO, "/_uploads/fetch-", skip=1)
    config = make_config(tmp_path / "cache", REGISTRY_PROXY_REMOTEURL=upstream.url)
    client = await aiohttp_client(make_app(config, make_registry(config, driver)))
    r = await client.get(f"/v2/app/blobs/{d}")
    assert r.status == 200 and await r.read() == layer
    assert fault.times == 0  # the fault was met
    published = tmp_path / f"cache/docker/registry/v2/blobs/sha256/{d[7:9]}/{d[7:]}/data"
    assert digest_of(published.read_bytes()) == d
