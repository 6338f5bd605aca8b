"""Notifications: distribution's events, POSTed to real HTTP listeners on loopback; an endpoint
that fails is retried until it answers, one that hangs never holds a push."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from regserve import config as config_mod
from regserve import notifications
from regserve.api import make_app

from . import conftest
from .authutil import basic, htpasswd_file
from .conftest import OCI_MANIFEST, digest_of, free_port, image_manifest

EVENTS = "application/vnd.docker.distribution.events.v1+json"


class Listener:
    """An endpoint that records what it is sent; `failures` answers 503 that many times first,
    `hang` never answers."""

    def __init__(self, failures: int = 0, hang: bool = False) -> None:
        self.events: list[dict[str, Any]] = []
        self.requests: list[dict[str, str]] = []
        self.failures, self.hang = failures, hang
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(dict(request.headers))
        if self.hang:
            await asyncio.Event().wait()
        if self.failures > 0:
            self.failures -= 1
            return web.Response(status=503)
        assert request.content_type == EVENTS
        self.events += (await request.json())["events"]
        self.arrived.set()
        return web.Response(status=200)

    async def wait_for(self, count: int, timeout: float = 20) -> list[dict[str, Any]]:
        async def enough() -> None:
            while len(self.events) < count:
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(enough(), timeout)
        return self.events


async def listen(aiohttp_server, listener: Listener, port: int | None = None) -> str:
    app = web.Application()
    app.router.add_post("/events", listener.handle)
    server = await aiohttp_server(app, host="127.0.0.1", **({"port": port} if port else {}))
    return f"http://127.0.0.1:{server.port}/events"


def registry_app(tmp_path: Path, notifications_section: dict[str, Any], **env: str) -> web.Application:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({
        "version": "0.1", "http": {"addr": ":5000", "relativeurls": True},
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "data")}, "delete": {"enabled": True}},
        "notifications": notifications_section}))
    return make_app(config_mod.load(str(path), env))


async def push_image(client, name: str, tag: str, headers: dict[str, str]) -> tuple[str, str, bytes]:
    layer, config = b"layer " * 1000, b'{"architecture":"amd64"}'
    for blob in (layer, config):
        r = await client.post(f"/v2/{name}/blobs/uploads/?digest={digest_of(blob)}", data=blob, headers=headers)
        assert r.status == 201
    manifest = image_manifest(digest_of(config), len(config), [(digest_of(layer), len(layer))])
    r = await client.put(f"/v2/{name}/manifests/{tag}", data=manifest,
                         headers={**headers, "Content-Type": OCI_MANIFEST})
    assert r.status == 201
    return digest_of(layer), digest_of(config), manifest


async def test_push_pull_mount_and_delete_are_announced(aiohttp_server, aiohttp_client, tmp_path):
    listener = Listener()
    url = await listen(aiohttp_server, listener)
    users = htpasswd_file(tmp_path / "htpasswd", {"alice": "pw-alice-1"})
    app = registry_app(tmp_path, {"endpoints": [{"name": "audit", "url": url, "timeout": "2s",
                                                 "headers": {"Authorization": ["Bearer sekrit"]}}]},
                       REGISTRY_AUTH_HTPASSWD_REALM="r", REGISTRY_AUTH_HTPASSWD_PATH=str(users))
    client = await aiohttp_client(app)
    auth = basic("alice", "pw-alice-1")
    layer, config, manifest = await push_image(client, "team/app", "v1", auth)
    r = await client.get("/v2/team/app/manifests/v1", headers={**auth, "Accept": OCI_MANIFEST})
    assert r.status == 200
    pull_id = r.headers["X-Request-Id"]
    assert (await client.head(f"/v2/team/app/blobs/{layer}", headers=auth)).status == 200  # no event
    assert (await client.get(f"/v2/team/app/blobs/{layer}", headers=auth)).status == 200
    r = await client.post(f"/v2/other/blobs/uploads/?mount={layer}&from=team/app", headers=auth)
    assert r.status == 201
    mdigest = digest_of(manifest)
    assert (await client.delete(f"/v2/team/app/manifests/{mdigest}", headers=auth)).status == 202
    assert (await client.delete(f"/v2/other/blobs/{layer}", headers=auth)).status == 202

    events = await listener.wait_for(8)
    assert [(e["action"], e["target"].get("mediaType")) for e in events] == [
        ("push", "application/octet-stream"), ("push", "application/octet-stream"), ("push", OCI_MANIFEST),
        ("pull", OCI_MANIFEST), ("pull", "application/octet-stream"), ("mount", "application/octet-stream"),
        ("delete", None), ("delete", "application/octet-stream")]
    push = events[2]
    assert push["target"] == {"mediaType": OCI_MANIFEST, "digest": mdigest, "repository": "team/app",
                              "url": f"/v2/team/app/manifests/{mdigest}",
                              "size": len(manifest), "length": len(manifest), "tag": "v1"}
    assert push["actor"] == {"name": "alice"} and push["request"]["method"] == "PUT"
    assert {"id", "timestamp", "source"} <= set(push) and push["source"]["instanceID"]
    assert events[3]["request"]["id"] == pull_id and events[3]["target"]["tag"] == "v1"
    assert events[0]["target"]["digest"] == layer and events[0]["target"]["size"] == 6000
    assert events[5]["target"]["repository"] == "other" and events[5]["target"]["fromRepository"] == "team/app"
    assert events[6]["target"] == {"digest": mdigest, "repository": "team/app",
                                   "url": f"/v2/team/app/manifests/{mdigest}"}
    assert len({e["id"] for e in events}) == 8
    assert all(h["Authorization"] == "Bearer sekrit" for h in listener.requests)


async def test_a_tag_deleted_in_the_web_ui_is_announced(aiohttp_server, aiohttp_client, tmp_path):
    listener = Listener()
    url = await listen(aiohttp_server, listener)
    users = htpasswd_file(tmp_path / "htpasswd", {"alice": "pw-alice-1"})
    app = registry_app(tmp_path, {"endpoints": [{"name": "audit", "url": url, "timeout": "2s"}]},
                       REGISTRY_AUTH_HTPASSWD_REALM="r", REGISTRY_AUTH_HTPASSWD_PATH=str(users))
    client = await aiohttp_client(app)
    auth = basic("alice", "pw-alice-1")
    await push_image(client, "team/app", "v1", auth)
    r = await client.post("/ui/repo/team/app/-/tag/v1/delete", headers=auth, allow_redirects=False)
    assert r.status == 303
    events = await listener.wait_for(4)
    assert events[3]["action"] == "delete" and events[3]["target"] == {"repository": "team/app", "tag": "v1"}
    assert events[3]["actor"] == {"name": "alice"} and events[3]["request"]["method"] == "POST"


async def test_ignored_actions_and_media_types_and_references(aiohttp_server, aiohttp_client, tmp_path):
    everything, filtered = Listener(), Listener()
    app = registry_app(tmp_path, {
        "events": {"includereferences": True},
        "endpoints": [{"name": "all", "url": await listen(aiohttp_server, everything)},
                      {"name": "manifest-pushes", "url": await listen(aiohttp_server, filtered),
                       "ignoredmediatypes": ["application/octet-stream"], "ignore": {"actions": ["pull"]}},
                      {"name": "off", "url": "http://127.0.0.1:9/never", "disabled": True}]})
    client = await aiohttp_client(app)
    layer, config, _ = await push_image(client, "app", "latest", {})
    assert (await client.get("/v2/app/manifests/latest")).status == 200
    assert [e["action"] for e in await everything.wait_for(4)] == ["push", "push", "push", "pull"]
    [only] = await filtered.wait_for(1)
    assert only["action"] == "push" and only["target"]["mediaType"] == OCI_MANIFEST
    assert [r["digest"] for r in only["target"]["references"]] == [config, layer]
    await asyncio.sleep(0.3)
    assert len(filtered.events) == 1


async def test_a_failing_endpoint_gets_every_event_once_it_recovers(aiohttp_server, aiohttp_client, tmp_path):
    listener = Listener(failures=5)
    app = registry_app(tmp_path, {"endpoints": [{"name": "flaky", "url": await listen(aiohttp_server, listener),
                                                 "threshold": 2, "backoff": "50ms"}]})
    client = await aiohttp_client(app)
    blobs = [f"blob {i}".encode() for i in range(6)]
    for blob in blobs:
        assert (await client.post(f"/v2/app/blobs/uploads/?digest={digest_of(blob)}", data=blob)).status == 201
    await listener.wait_for(6)
    await asyncio.sleep(0.2)
    assert [e["target"]["digest"] for e in listener.events] == [digest_of(b) for b in blobs]
    assert len(listener.requests) >= 6


async def test_a_hanging_endpoint_never_holds_a_push(aiohttp_server, aiohttp_client, tmp_path):
    listener = Listener(hang=True)
    app = registry_app(tmp_path, {"endpoints": [{"name": "stuck", "url": await listen(aiohttp_server, listener),
                                                 "timeout": "60s"}]})
    client = await aiohttp_client(app)

    async def pushes() -> None:
        for i in range(20):
            blob = f"blob {i}".encode()
            assert (await client.post(f"/v2/app/blobs/uploads/?digest={digest_of(blob)}", data=blob)).status == 201
    await asyncio.wait_for(pushes(), 10)  # an emit that waited on the endpoint would take 60 s
    assert len(listener.requests) == 1  # one batch in flight; the rest wait in the queue


async def test_a_full_queue_drops_the_oldest(aiohttp_server, monkeypatch):
    monkeypatch.setattr(notifications, "QUEUE_SIZE", 3)
    port = free_port()
    notifier = notifications.Notifier([notifications.Endpoint(
        "down", f"http://127.0.0.1:{port}/events", threshold=1, backoff=0.05)])
    await notifier.start()
    try:
        for i in range(10):
            notifier.emit("push", {"digest": f"sha256:{i:064x}", "repository": "app"}, {}, None)
            await asyncio.sleep(0.05)  # event 0 goes in flight, being retried; 7, 8 and 9 wait
        listener = Listener()
        await listen(aiohttp_server, listener, port=port)
        events = await listener.wait_for(4)
    finally:
        await notifier.stop()
    assert [int(e["target"]["digest"][7:], 16) for e in events] == [0, 7, 8, 9]


async def test_stopping_sends_what_is_queued(aiohttp_server, aiohttp_client, tmp_path):
    listener = Listener()
    app = registry_app(tmp_path, {"endpoints": [{"url": await listen(aiohttp_server, listener)}]})
    client = await aiohttp_client(app)
    blob = b"last words"
    assert (await client.post(f"/v2/app/blobs/uploads/?digest={digest_of(blob)}", data=blob)).status == 201
    await client.close()  # the app's cleanup: what is queued goes out first
    assert [e["target"]["digest"] for e in listener.events] == [digest_of(blob)]


@pytest.mark.parametrize("section, problem", [
    ({"endpoints": [{"name": "x"}]}, "http(s) url"),
    ({"endpoints": [{"url": "ftp://host/x"}]}, "http(s) url"),
    ({"endpoints": [{"url": "http://h/x", "timeout": "soon"}]}, "timeout"),
    ({"endpoints": "http://h/x"}, "endpoints"),
])
def test_bad_endpoints_are_refused_at_startup(tmp_path, section, problem):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"version": "0.1", "storage": {"filesystem": {"rootdirectory": str(tmp_path)}},
                                    "notifications": section}))
    with pytest.raises(config_mod.ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        config_mod.load(str(path), {})



def test_every_worker_of_a_served_registry_announces(server_factory, tmp_path):
    """`regserve serve` with two workers: each sends the events of the requests it served."""
    received: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            received.extend(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["events"])
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    endpoint = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=endpoint.serve_forever, daemon=True)
    thread.start()
    try:
        path = tmp_path / "config.yml"
        path.write_text(yaml.safe_dump({"version": "0.1", "notifications": {"endpoints": [
            {"url": f"http://127.0.0.1:{endpoint.server_port}/events"}]}}))
        srv = server_factory(config_file=path, workers=2)
        blobs = [f"blob {i}".encode() for i in range(12)]
        for blob in blobs:
            status, _, _ = conftest.http("POST", f"{srv.url}/v2/app/blobs/uploads/?digest={digest_of(blob)}", blob)
            assert status == 201
        srv.stop()  # workers send what they have queued before they exit
    finally:
        endpoint.shutdown()
        endpoint.server_close()
    assert sorted(e["target"]["digest"] for e in received) == sorted(digest_of(b) for b in blobs)
    assert all(e["action"] == "push" and e["target"]["url"].startswith(srv.url) for e in received)
