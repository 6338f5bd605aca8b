"""The web UI (/ui/), in process: what each page shows against what was pushed, search and
pagination, the access policy, tag deletion and its confirmation, security headers, settings.
The browser tests (tests/test_ui_browser.py) drive the same pages in Debian's chromium."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from typing import Any

import pytest

from regserve.api import make_app
from regserve.config import ConfigError, load
from regserve.registry import Registry
from regserve.storage.filesystem import FilesystemDriver
from regserve.ui import views
from regserve.ui.views import INVENTORY_KEY as INVENTORY

from .authutil import basic, htpasswd_file
from .conftest import OCI_INDEX, OCI_MANIFEST, digest_of, make_config
from .faults import FaultyDriver
from .htmlpage import parse

SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"


@pytest.fixture(autouse=True)
def _unhurried(monkeypatch):
    """Pages wait for everything they read (a loaded machine must not make a row 'pending');
    the budget has its own test."""
    monkeypatch.setattr(views, "PAGE_BUDGET", 60.0)
SBOM = "application/spdx+json"


async def push_blob(client, name: str, data: bytes, headers: dict[str, str] | None = None) -> str:
    r = await client.post(f"/v2/{name}/blobs/uploads/?digest={digest_of(data)}", data=data, headers=headers or {})
    assert r.status == 201, await r.text()
    return digest_of(data)


async def push_manifest(client, name: str, ref: str, doc: dict, headers: dict[str, str] | None = None) -> tuple[str, int]:
    body = json.dumps(doc).encode()
    r = await client.put(f"/v2/{name}/manifests/{ref}", data=body,
                         headers={"Content-Type": doc["mediaType"], **(headers or {})})
    assert r.status == 201, await r.text()
    return digest_of(body), len(body)


async def push_image(client, name: str, tag: str, layers: list[bytes], arch: str = "amd64",
                     created: str = "2026-11-30T10:00:00Z", labels: dict[str, str] | None = None,
                     headers: dict[str, str] | None = None) -> dict[str, Any]:
    """An image; returns its digest, its size (manifest, config and layers) and its blobs."""
    config = json.dumps({"architecture": arch, "os": "linux", "created": created,
                         "config": {"Entrypoint": ["/bin/app"], "Cmd": ["--serve"], "Labels": labels or {}},
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    blobs = {await push_blob(client, name, b, headers): len(b) for b in [config, *layers]}
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(config),
                      "size": len(config)},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest_of(b),
                       "size": len(b)} for b in layers]}
    d, size = await push_manifest(client, name, tag, doc, headers)
    blobs[d] = size
    return {"digest": d, "size": sum(blobs.values()), "blobs": blobs, "manifest_size": size}


async def push_index(client, name: str, tag: str, images: dict[str, dict[str, Any]]) -> dict[str, Any]:
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX,
           "manifests": [{"mediaType": OCI_MANIFEST, "digest": img["digest"], "size": img["manifest_size"],
                          "platform": {"os": "linux", "architecture": arch}} for arch, img in images.items()]}
    d, size = await push_manifest(client, name, tag, doc)
    blobs = {d: size}
    for img in images.values():
        blobs.update(img["blobs"])
    return {"digest": d, "size": sum(blobs.values())}


async def push_referrer(client, name: str, subject: str, artifact_type: str, payload: bytes) -> str:
    empty = b"{}"
    await push_blob(client, name, empty)
    layer = await push_blob(client, name, payload)
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest_of(empty), "size": 2},
           "layers": [{"mediaType": "application/octet-stream", "digest": layer, "size": len(payload)}],
           "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1}}
    d, _ = await push_manifest(client, name, digest_of(json.dumps(doc).encode()), doc)
    return d


async def page(client, path: str, status: int = 200, headers: dict[str, str] | None = None):
    r = await client.get(path, headers=headers or {}, allow_redirects=False)
    text = await r.text()
    assert r.status == status, text[:2000]
    return parse(text), r


def rows(doc, attribute: str) -> dict[str, Any]:
    key = attribute.replace("_", "-")
    return {e.attrs[key]: e for e in doc.find_all("tr", **{attribute: True})}


def bytes_of(element) -> int:
    return int(element.find(data_bytes=True).attrs["data-bytes"])


@pytest.fixture
async def shelf(client) -> dict[str, Any]:
    """What the page tests look at: an image, a two-platform index, a signature and an SBOM
    referring to the image, and a second repository sharing one of the image's layers."""
    base = os.urandom(30_000)
    app = await push_image(client, "team/app", "v1", [base, os.urandom(20_000)],
                           labels={"org.opencontainers.image.title": "the app", "note": "<b>bold</b>"})
    amd = await push_image(client, "team/multi", "amd64-only", [os.urandom(5_000)], created="2026-11-01T00:00:00Z")
    arm = await push_image(client, "team/multi", "arm64-only", [os.urandom(7_000)], arch="arm64",
                           created="2026-11-02T00:00:00Z")
    index = await push_index(client, "team/multi", "latest", {"amd64": amd, "arm64": arm})
    sig = await push_referrer(client, "team/app", app["digest"], SIGNATURE, b"signature")
    sbom = await push_referrer(client, "team/app", app["digest"], SBOM, b'{"spdxVersion": "SPDX-2.3"}')
    other = await push_image(client, "other/tool", "1.0", [base])
    return {"app": app, "amd": amd, "arm": arm, "index": index, "sig": sig, "sbom": sbom, "other": other,
            "base": (digest_of(base), len(base))}


# -- pages ---------------------------------------------------------------------------------------

async def test_the_repository_list_shows_tags_last_push_and_size(client, shelf):
    doc, r = await page(client, "/ui/")
    listed = rows(doc, "data_repository")
    assert list(listed) == ["other/tool", "team/app", "team/multi"]
    assert listed["team/multi"].find(class_="tags").text == "3"
    assert listed["team/app"].find(class_="tags").text == "1"
    assert "UTC" in listed["team/app"].text  # last push
    # Every blob its manifests keep, each once: the image, and the referrers' own manifests and blobs.
    app = bytes_of(listed["team/app"])
    assert app > shelf["app"]["size"]
    assert bytes_of(listed["other/tool"]) == shelf["other"]["size"]
    multi = bytes_of(listed["team/multi"])
    assert multi == shelf["index"]["size"]


async def test_the_repository_page_lists_tags_with_platforms_sizes_created_and_pull_lines(client, shelf):
    doc, _ = await page(client, "/ui/repo/team/multi", headers={"X-Forwarded-Host": "registry.example:443"})
    assert doc.by_id("tag-count").text == "3"
    tags = rows(doc, "data_tag")
    assert list(tags) == ["amd64-only", "arm64-only", "latest"]
    latest = tags["latest"]
    assert latest.find("a", class_="digest").attrs["title"] == shelf["index"]["digest"]
    assert latest.find(class_="type").text == "OCI index"
    platforms = {li.attrs["data-platform"]: li.text for li in latest.find_all("li", data_platform=True)}
    assert set(platforms) == {"linux/amd64", "linux/arm64"}
    assert bytes_of(latest.find(class_="size")) == shelf["index"]["size"]
    assert latest.find(class_="created").text == "2026-11-02 00:00 UTC"  # the newest platform's
    arm = tags["arm64-only"]
    assert arm.find(class_="platforms").text == "linux/arm64"
    assert bytes_of(arm.find(class_="size")) == shelf["arm"]["size"]
    copies = [b.attrs["data-copy"] for b in latest.find_all("button", class_="copy")]
    assert copies == ["docker pull registry.example:443/team/multi:latest",
                      "podman pull registry.example:443/team/multi:latest"]


async def test_pull_lines_name_the_configured_host(app_factory, aiohttp_client):
    client = await aiohttp_client(app_factory(REGISTRY_HTTP_HOST="https://registry.example.org"))
    await push_image(client, "x", "v1", [b"layer"])
    doc, _ = await page(client, "/ui/repo/x")
    assert doc.find("button", class_="copy").attrs["data-copy"] == "docker pull registry.example.org/x:v1"


async def test_the_manifest_page_shows_layers_config_and_referrers_by_purpose(client, shelf):
    app = shelf["app"]
    doc, _ = await page(client, f"/ui/repo/team/app/-/manifest/{app['digest']}?tag=v1")
    assert doc.by_id("digest").text == app["digest"]
    assert doc.by_id("platform").text == "linux/amd64"
    assert doc.by_id("created").text == "2026-11-30 10:00 UTC"
    assert int(doc.by_id("size").attrs["data-bytes"]) == app["size"]
    layers = doc.by_id("layers").find_all("tr", class_="layer")
    assert [int(t.find(data_bytes=True).attrs["data-bytes"]) for t in layers] == [30_000, 20_000]
    config = doc.by_id("config").text
    assert '["/bin/app"]' in config and '["--serve"]' in config
    labels = doc.by_id("labels").text
    assert "the app" in labels and "<b>bold</b>" in labels  # shown as text, not markup
    groups = {s.attrs["data-purpose"]: s for s in doc.find_all("section", data_purpose=True)}
    assert set(groups) == {"Signatures", "SBOMs"}
    assert [li.attrs["data-referrer"] for li in groups["Signatures"].find_all("li")] == [shelf["sig"]]
    assert [li.attrs["data-referrer"] for li in groups["SBOMs"].find_all("li")] == [shelf["sbom"]]
    assert doc.find("h1").text.startswith("team/app:v1 ")
    doc, _ = await page(client, f"/ui/repo/team/app/-/manifest/{app['digest']}?tag=v2")  # no such tag here
    assert doc.find("h1").text.startswith("team/app sha256:")
    raw = json.loads(doc.by_id("raw").find("code").text)
    assert raw["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"


async def test_an_index_page_lists_its_platforms(client, shelf):
    doc, _ = await page(client, f"/ui/repo/team/multi/-/manifest/{shelf['index']['digest']}")
    platforms = rows(doc, "data_platform")
    assert set(platforms) == {"linux/amd64", "linux/arm64"}
    assert bytes_of(platforms["linux/arm64"]) == shelf["arm"]["size"]
    assert doc.by_id("no-referrers")


async def test_the_storage_page_counts_shared_layers_once(client, shelf):
    inventory = client.app[INVENTORY]
    await inventory.wait_for_usage()
    doc, _ = await page(client, "/ui/storage")
    usage = rows(doc, "data_repository")
    base_digest, base_size = shelf["base"]
    assert bytes_of(usage["other/tool"].find(class_="shared")) == base_size
    assert bytes_of(usage["team/app"].find(class_="shared")) == base_size
    assert bytes_of(usage["team/multi"].find(class_="shared")) == 0
    sizes = {n: bytes_of(e.find(class_="size")) for n, e in usage.items()}
    assert int(doc.by_id("total").attrs["data-bytes"]) == sum(sizes.values()) - base_size
    repo, _ = await page(client, "/ui/repo/team/app")
    assert int(repo.by_id("shared").attrs["data-bytes"]) == base_size


async def test_the_storage_page_says_it_is_counting_until_it_has_counted(client, shelf):
    doc, r = await page(client, "/ui/storage")  # the first look starts the count
    assert "Counting" in doc.text and r.headers["Refresh"] == "2"
    await client.app[INVENTORY].wait_for_usage()
    doc, r = await page(client, "/ui/storage")
    assert "Refresh" not in r.headers and doc.by_id("usage")


async def test_search_and_pages(client):
    for i in range(57):
        await push_blob(client, f"many/repo-{i:03d}", b"x")
        await push_image(client, f"many/repo-{i:03d}", "v1", [b"same layer"])
    doc, _ = await page(client, "/ui/")
    assert len(rows(doc, "data_repository")) == 50
    assert doc.find("a", rel="next").attrs["href"] == "?page=2"
    doc, _ = await page(client, "/ui/?page=2")
    assert list(rows(doc, "data_repository")) == [f"many/repo-{i:03d}" for i in range(50, 57)]
    doc, _ = await page(client, "/ui/?q=REPO-01")
    assert list(rows(doc, "data_repository")) == [f"many/repo-{i:03d}" for i in range(10, 20)]
    doc, _ = await page(client, "/ui/?q=nothing-like-it")
    assert "No repository matches" in doc.text
    doc, _ = await page(client, "/ui/?page=banana")  # a page number that is not one: the first
    assert len(rows(doc, "data_repository")) == 50
    await client.app[INVENTORY].wait_for_usage()
    doc, _ = await page(client, "/ui/storage?page=2")
    assert len(rows(doc, "data_repository")) == 7 and doc.find("a", rel="prev")


async def test_tag_search_and_pages(client):
    img = await push_image(client, "tagged", "t000", [b"layer"])
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": next(iter(img["blobs"])), "size": next(iter(img["blobs"].values()))},
                       "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                   "digest": digest_of(b"layer"), "size": 5}]})
    for i in range(1, 130):
        r = await client.put(f"/v2/tagged/manifests/t{i:03d}", data=body, headers={"Content-Type": OCI_MANIFEST})
        assert r.status == 201
    doc, _ = await page(client, "/ui/repo/tagged")
    assert doc.by_id("tag-count").text == "130"
    assert len(rows(doc, "data_tag")) == 100
    doc, _ = await page(client, "/ui/repo/tagged?page=2")
    assert list(rows(doc, "data_tag")) == [f"t{i:03d}" for i in range(100, 130)]
    doc, _ = await page(client, "/ui/repo/tagged?q=t12")
    assert list(rows(doc, "data_tag")) == [f"t{i:03d}" for i in range(120, 130)]


async def test_unknown_and_malformed_addresses_are_not_found_pages(client, shelf):
    for path in ("/ui/repo/nobody/here", "/ui/repo/UPPER", "/ui/repo/team/app/-/manifest/sha256:abc",
                 "/ui/repo/team/app/-/manifest/md5:" + "0" * 32,
                 f"/ui/repo/other/tool/-/manifest/{shelf['app']['digest']}",  # not in this repository
                 "/ui/repo/team/app/-/tag/nope/delete", "/ui/repo/team/app/-/tag/-bad/delete"):
        doc, r = await page(client, path, 404)
        assert r.content_type == "text/html", path
        assert "Not found" in doc.text
    r = await client.get("/ui/static/../../etc/passwd")
    assert r.status == 404
    r = await client.get("/ui/static/other.js")
    assert r.status == 404


async def test_pages_send_a_strict_policy_and_load_nothing_from_elsewhere(client, shelf):
    for path in ("/ui/", "/ui/repo/team/app", f"/ui/repo/team/app/-/manifest/{shelf['app']['digest']}",
                 "/ui/storage", "/ui/repo/nobody"):
        r = await client.get(path)
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        doc = parse(await r.text())
        for e in doc.find_all(src=True) + doc.find_all("link", href=True):
            assert e.attrs.get("src", e.attrs.get("href")).startswith("/ui/static/"), path
        assert not doc.find_all("script", src=False) or all("src" in s.attrs for s in doc.find_all("script"))
        assert not doc.find_all(style=True)  # no inline style: the policy would block it
    for name, kind in (("ui.css", "text/css"), ("ui.js", "text/javascript")):
        r = await client.get(f"/ui/static/{name}")
        assert r.status == 200 and r.content_type == kind
        assert "max-age" in r.headers["Cache-Control"]


async def test_summaries_are_read_once_per_digest(client, shelf):
    inventory = client.app[INVENTORY]
    reads: list[str] = []
    store = inventory.registry.blob_store
    original = store.read_small

    async def counted(d):
        reads.append(str(d))
        return await original(d)
    store.read_small = counted
    await page(client, "/ui/repo/team/app")
    first = len(reads)
    assert first > 0
    await page(client, "/ui/repo/team/app")
    await page(client, f"/ui/repo/team/app/-/manifest/{shelf['app']['digest']}")
    assert all(r not in reads[:first] for r in reads[first:] if r != shelf["app"]["digest"])


async def test_a_page_is_not_held_up_by_what_it_has_not_read_yet(aiohttp_client, data_dir, monkeypatch):
    """A repository whose manifests are slow to read shows as being counted; the reading goes on
    behind the page, and the next look shows it."""
    driver = FaultyDriver(FilesystemDriver(str(data_dir)))
    client = await aiohttp_client(make_app(make_config(data_dir), Registry(driver)))
    img = await push_image(client, "slow/repo", "v1", [b"layer"])
    await push_image(client, "quick/repo", "v1", [b"another layer"])
    await push_image(client, "slow/tags", "v1", [b"a third layer"])
    monkeypatch.setattr(views, "PAGE_BUDGET", 0.3)
    gate = driver.gate("get_content", img["digest"].split(":")[1])  # the manifest's bytes
    doc, _ = await page(client, "/ui/?q=repo")
    listed = rows(doc, "data_repository")
    assert listed["slow/repo"].find(class_="pending") and doc.by_id("pending")
    assert bytes_of(listed["quick/repo"]) > 0
    gate.set()
    for _ in range(100):
        doc, _ = await page(client, "/ui/?q=repo")
        if not doc.find_all(id="pending"):
            break
        await asyncio.sleep(0.05)
    assert bytes_of(rows(doc, "data_repository")["slow/repo"]) == img["size"]
    # A repository's page: its tags are shown while its size is still being counted.
    gate = driver.gate("stat", "slow/tags/_manifests/revisions")  # when its manifest was pushed
    doc, _ = await page(client, "/ui/repo/slow/tags")
    assert doc.by_id("pending") and list(rows(doc, "data_tag")) == ["v1"]
    gate.set()


async def test_the_first_look_lists_a_page_before_every_name_is_walked(client):
    for i in range(60):
        await push_image(client, f"r/{i:02d}", "v1", [b"layer"])
    inventory = client.app[INVENTORY]
    walked, release = inventory._refresh_names, asyncio.Event()

    async def slow_walk() -> None:
        await release.wait()
        await walked()
    inventory._refresh_names = slow_walk
    doc, _ = await page(client, "/ui/")
    assert list(rows(doc, "data_repository")) == [f"r/{i:02d}" for i in range(50)]
    assert "Listing every repository" in doc.text and doc.by_id("pending")
    assert doc.find("a", rel="next").attrs["href"] == "?page=2"
    doc, _ = await page(client, "/ui/?page=2")  # a walk to its end is all of them
    assert list(rows(doc, "data_repository")) == [f"r/{i:02d}" for i in range(50, 60)]
    assert "60 repositories" in doc.text and not doc.find_all(id="pending")
    search = asyncio.ensure_future(page(client, "/ui/?q=r/5"))  # a search waits for every name
    await asyncio.sleep(0.2)
    assert not search.done()
    release.set()
    doc, _ = await asyncio.wait_for(search, 10)
    assert list(rows(doc, "data_repository")) == [f"r/{i:02d}" for i in range(50, 60)]


async def test_a_damaged_manifest_is_shown_as_such(app_factory, aiohttp_client, data_dir, caplog):
    client = await aiohttp_client(app_factory())
    img = await push_image(client, "team/app", "v1", [b"layer"])
    hexd = img["digest"].split(":")[1]
    (data_dir / f"docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data").write_bytes(b"{not json")
    client = await aiohttp_client(app_factory())  # nothing cached
    doc, _ = await page(client, "/ui/repo/team/app")
    assert rows(doc, "data_tag")["v1"].find(class_="type").text == "unreadable manifest (see the registry's log)"
    assert f"manifest {img['digest']} is stored but cannot be read" in caplog.text


async def test_a_storage_error_is_a_page_that_says_nothing_of_the_storage(aiohttp_client, data_dir, caplog):
    driver = FaultyDriver(FilesystemDriver(str(data_dir)))
    client = await aiohttp_client(make_app(make_config(data_dir), Registry(driver)))
    img = await push_image(client, "team/app", "v1", [b"layer"])
    for path, op, where in (("/ui/", "list", "repositories"), ("/ui/repo/team/app", "get_content", "current"),
                            (f"/ui/repo/team/app/-/manifest/{img['digest']}", "list", "_refs")):
        driver.inject(op, errno.EIO, where)
        doc, r = await page(client, path, 500)
        assert r.content_type == "text/html" and "Something went wrong" in doc.text
        assert str(data_dir) not in await r.text() and "Errno" not in await r.text()
    assert "page /ui/ failed" in caplog.text
    await page(client, "/ui/")  # and the storage is fine again


async def test_a_failed_refresh_of_the_names_is_logged_and_the_last_walk_served(aiohttp_client, data_dir, caplog):
    driver = FaultyDriver(FilesystemDriver(str(data_dir)))
    client = await aiohttp_client(make_app(make_config(data_dir), Registry(driver)))
    await push_image(client, "team/app", "v1", [b"layer"])
    inventory = client.app[INVENTORY]
    now = [1000.0]
    inventory.clock = lambda: now[0]
    doc, _ = await page(client, "/ui/")
    now[0] += 60  # the walk is old: the next look starts another behind it
    await push_image(client, "team/new", "v1", [b"layer"])
    driver.inject("list", errno.EIO, "repositories/team/new", times=-1)  # met by the walk alone
    doc, _ = await page(client, "/ui/")
    assert list(rows(doc, "data_repository")) == ["team/app"]
    for _ in range(100):
        if "reading what the registry holds failed" in caplog.text:
            break
        await asyncio.sleep(0.02)
    assert "reading what the registry holds failed" in caplog.text
    driver.faults.clear()
    await page(client, "/ui/")  # starts a walk that succeeds
    for _ in range(100):
        doc, _ = await page(client, "/ui/")
        if "team/new" in rows(doc, "data_repository"):
            break
        await asyncio.sleep(0.02)
    assert list(rows(doc, "data_repository")) == ["team/app", "team/new"]


# -- who sees what -------------------------------------------------------------------------------

POLICY = """
groups:
  admins: [alice]
rules:
  - repositories: ["**"]
    groups: [admins]
    actions: [pull, push, delete]
  - repositories: ["team-a/**"]
    users: [bob]
    actions: [pull]
  - repositories: ["public/**"]
    users: ["*"]
    anonymous: true
    actions: [pull]
"""


@pytest.fixture
async def guarded(app_factory, aiohttp_client, tmp_path):
    users = htpasswd_file(tmp_path / "htpasswd", {"alice": "a", "bob": "b"})
    (tmp_path / "policy.yml").write_text(POLICY)
    client = await aiohttp_client(app_factory(REGISTRY_AUTH_HTPASSWD_REALM="registry",
                                              REGISTRY_AUTH_HTPASSWD_PATH=str(users),
                                              REGISTRY_AUTH_ACCESSCONTROL_POLICY=str(tmp_path / "policy.yml")))
    for name in ("team-a/app", "team-b/secret", "public/tools"):
        await push_image(client, name, "v1", [name.encode()], headers=basic("alice", "a"))
    return client


async def test_the_policy_decides_what_each_viewer_sees(guarded):
    seen = {}
    for who, auth in (("alice", basic("alice", "a")), ("bob", basic("bob", "b")), ("anonymous", {})):
        doc, _ = await page(guarded, "/ui/", headers=auth)
        seen[who] = list(rows(doc, "data_repository"))
    assert seen == {"alice": ["public/tools", "team-a/app", "team-b/secret"],
                    "bob": ["public/tools", "team-a/app"], "anonymous": ["public/tools"]}
    doc, _ = await page(guarded, "/ui/repo/team-b/secret", 404, headers=basic("bob", "b"))
    assert "secret" not in doc.find("main").text  # not even its name comes back
    await page(guarded, "/ui/repo/team-a/app", 404)  # anonymous
    doc, _ = await page(guarded, "/ui/repo/team-a/app", headers=basic("bob", "b"))
    assert not doc.find_all("a", class_="danger")  # bob may not delete
    doc, _ = await page(guarded, "/ui/repo/team-a/app", headers=basic("alice", "a"))
    assert doc.find_all("a", class_="danger")
    assert doc.by_id("user").text == "alice"
    await guarded.app[INVENTORY].wait_for_usage()
    doc, _ = await page(guarded, "/ui/storage", headers=basic("bob", "b"))
    assert list(rows(doc, "data_repository")) == ["public/tools", "team-a/app"]


async def test_in_token_mode_a_browser_signs_in_with_the_token_servers_users(app_factory, aiohttp_client, tmp_path):
    """Browsers do not fetch tokens: the UI checks Basic credentials against the htpasswd file the
    built-in token server issues tokens for, and the policy decides as it does for tokens."""
    open_registry = await aiohttp_client(app_factory())
    for name in ("public/tools", "team-b/secret"):
        await push_image(open_registry, name, "v1", [name.encode()])
    users = htpasswd_file(tmp_path / "htpasswd", {"alice": "a", "bob": "b"})
    (tmp_path / "policy.yml").write_text(POLICY)
    client = await aiohttp_client(app_factory(
        REGISTRY_AUTH_TOKEN_SERVICE="reg.test", REGISTRY_AUTH_TOKEN_ISSUER="regserve-test",
        REGISTRY_AUTH_TOKENSERVER_HTPASSWD=str(users),
        REGISTRY_AUTH_TOKENSERVER_SIGNINGKEY=str(tmp_path / "keys" / "token.key"),
        REGISTRY_AUTH_ACCESSCONTROL_POLICY=str(tmp_path / "policy.yml")))
    assert (await client.get("/v2/public/tools/tags/list")).status == 401  # the API wants a token
    seen = {}
    for who, auth in (("alice", basic("alice", "a")), ("bob", basic("bob", "b")), ("anonymous", {})):
        doc, _ = await page(client, "/ui/", headers=auth)
        seen[who] = list(rows(doc, "data_repository"))
    assert seen == {"alice": ["public/tools", "team-b/secret"], "bob": ["public/tools"],
                    "anonymous": ["public/tools"]}
    _, r = await page(client, "/ui/login", 401)
    assert r.headers["WWW-Authenticate"].startswith("Basic ")


async def test_signing_in_asks_the_browser_for_credentials(guarded):
    doc, _ = await page(guarded, "/ui/")
    assert doc.find("a", href="/ui/login")
    doc, r = await page(guarded, "/ui/login", 401)
    assert r.headers["WWW-Authenticate"] == 'Basic realm="registry"'
    _, r = await page(guarded, "/ui/login", 303, headers=basic("bob", "b"))
    assert r.headers["Location"] == "/ui/"
    doc, r = await page(guarded, "/ui/", 401, headers=basic("bob", "wrong"))
    assert r.headers["WWW-Authenticate"].startswith("Basic ")
    assert "invalid username or password" in doc.text


async def test_a_tag_is_deleted_after_confirmation_by_whoever_may_delete(guarded):
    admin = basic("alice", "a")
    doc, _ = await page(guarded, "/ui/repo/team-a/app/-/tag/v1/delete", headers=admin)
    assert doc.find("form", method="post")
    # A post from another site (a forged form) is refused, and the tag stays.
    for forged in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        r = await guarded.post("/ui/repo/team-a/app/-/tag/v1/delete", headers={**admin, **forged},
                               allow_redirects=False)
        assert r.status == 403
    r = await guarded.post("/ui/repo/team-a/app/-/tag/v1/delete", allow_redirects=False,
                           headers={**basic("bob", "b"), "Origin": f"http://{guarded.host}:{guarded.port}"})
    assert r.status == 403
    assert (await guarded.get("/v2/team-a/app/manifests/v1", headers=admin)).status == 200
    r = await guarded.post("/ui/repo/team-a/app/-/tag/v1/delete", allow_redirects=False,
                           headers={**admin, "Origin": f"http://{guarded.host}:{guarded.port}",
                                    "Sec-Fetch-Site": "same-origin"})
    assert r.status == 303 and r.headers["Location"] == "/ui/repo/team-a/app?deleted=v1"
    assert (await guarded.get("/v2/team-a/app/manifests/v1", headers=admin)).status == 404
    doc, _ = await page(guarded, r.headers["Location"], headers=admin)
    assert "Tag “v1” was deleted." in doc.text and not rows(doc, "data_tag")


async def test_two_deletions_of_one_tag_racing_delete_it_once(guarded):
    """Both confirmations were open; both are posted at once: one deletes, the other finds no tag."""
    headers = {**basic("alice", "a"), "Origin": f"http://{guarded.host}:{guarded.port}"}

    async def post() -> int:
        r = await guarded.post("/ui/repo/team-a/app/-/tag/v1/delete", headers=headers, allow_redirects=False)
        return r.status
    assert sorted(await asyncio.gather(post(), post())) == [303, 404]  # the tag's owner decides, once
    assert (await guarded.get("/v2/team-a/app/manifests/v1", headers=basic("alice", "a"))).status == 404
    assert (await guarded.get("/v2/team-a/app/tags/list", headers=basic("alice", "a"))).status == 200


@pytest.mark.parametrize("setting", [{"REGISTRY_STORAGE_DELETE_ENABLED": "false"},
                                     {"REGISTRY_STORAGE_MAINTENANCE_READONLY_ENABLED": "true"},
                                     {"REGISTRY_PROXY_REMOTEURL": "http://127.0.0.1:9"}])  # a cache: its upstream's
async def test_no_delete_where_the_registry_allows_none(app_factory, aiohttp_client, setting):
    writable = await aiohttp_client(app_factory())
    await push_image(writable, "x", "v1", [b"layer"])
    client = await aiohttp_client(app_factory(**setting))
    doc, _ = await page(client, "/ui/repo/x")
    assert not doc.find_all("a", class_="danger")
    r = await client.post("/ui/repo/x/-/tag/v1/delete", allow_redirects=False)
    assert r.status == 403
    assert (await client.get("/v2/x/manifests/v1")).status == 200


# -- settings ------------------------------------------------------------------------------------

async def test_the_ui_can_be_moved_or_turned_off(app_factory, aiohttp_client):
    moved = await aiohttp_client(app_factory(REGISTRY_UI_PATH="/registry-ui/"))
    await push_image(moved, "x", "v1", [b"layer"])
    doc, _ = await page(moved, "/registry-ui/")
    assert doc.find("a", href="/registry-ui/repo/x")
    assert (await moved.get("/ui/")).status == 404
    off = await aiohttp_client(app_factory(REGISTRY_UI_ENABLED="false"))
    r = await off.get("/ui/")
    assert r.status == 404 and (await r.json())["errors"][0]["code"] == "UNSUPPORTED"


def test_ui_settings_are_checked(tmp_path):
    assert load(None, {}).ui_path == "/ui"
    assert load(None, {"REGISTRY_UI_PATH": "console/"}).ui_path == "/console"
    for bad in ("/", "/v2", "/v2/ui"):
        with pytest.raises(ConfigError):
            load(None, {"REGISTRY_UI_PATH": bad})
