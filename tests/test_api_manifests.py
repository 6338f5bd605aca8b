"""Manifests: put/get/head/delete by tag and digest, validation, media types, schema1 refusal."""

import json
import os

import pytest

from .conftest import OCI_INDEX, OCI_MANIFEST, digest_of, image_manifest

DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
LAYER = os.urandom(5000)


async def push_blobs(client, name="foo"):
    for blob in (CONFIG, LAYER):
        r = await client.post(f"/v2/{name}/blobs/uploads/?digest={digest_of(blob)}", data=blob)
        assert r.status == 201


def manifest(**extra):
    return image_manifest(digest_of(CONFIG), len(CONFIG), [(digest_of(LAYER), len(LAYER))], **extra)


def code(body):
    return body["errors"][0]["code"]


async def test_put_get_head_by_tag_and_digest(client):
    await push_blobs(client)
    body = manifest()
    d = digest_of(body)
    r = await client.put("/v2/foo/manifests/v1", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201
    assert r.headers["Docker-Content-Digest"] == d
    assert r.headers["Location"] == f"/v2/foo/manifests/{d}"
    for ref in ("v1", d):
        r = await client.get(f"/v2/foo/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
        assert r.status == 200
        assert await r.read() == body  # stored bytes, unchanged
        assert r.headers["Content-Type"] == OCI_MANIFEST
        assert r.headers["Docker-Content-Digest"] == d
        r = await client.head(f"/v2/foo/manifests/{ref}")
        assert r.status == 200
        assert r.headers["Content-Length"] == str(len(body))
        assert r.headers["Docker-Content-Digest"] == d


async def test_put_by_digest(client):
    await push_blobs(client)
    body = manifest()
    r = await client.put(f"/v2/foo/manifests/{digest_of(body)}", data=body,
                         headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201
    r = await client.get("/v2/foo/tags/list")
    assert (await r.json())["tags"] == []


async def test_put_by_wrong_digest(client):
    await push_blobs(client)
    r = await client.put(f"/v2/foo/manifests/{digest_of(b'x')}", data=manifest(),
                         headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 400
    assert code(await r.json()) == "DIGEST_INVALID"


async def test_whitespace_is_preserved(client):
    await push_blobs(client)
    body = json.dumps(json.loads(manifest()), indent=3).encode() + b"\n"
    r = await client.put("/v2/foo/manifests/pretty", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.headers["Docker-Content-Digest"] == digest_of(body)
    assert await (await client.get("/v2/foo/manifests/pretty")).read() == body


async def test_missing_blob_is_manifest_blob_unknown(client):
    r = await client.put("/v2/foo/manifests/v1", data=manifest(), headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 400
    body = await r.json()
    assert code(body) == "MANIFEST_BLOB_UNKNOWN"
    assert (await client.get("/v2/foo/manifests/v1")).status == 404


async def test_blob_of_other_repo_does_not_count(client):
    await push_blobs(client, "other")
    r = await client.put("/v2/foo/manifests/v1", data=manifest(), headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 400 and code(await r.json()) == "MANIFEST_BLOB_UNKNOWN"


@pytest.mark.parametrize("body,ctype", [
    (b"blablabla", OCI_MANIFEST),
    (b"[1,2]", OCI_MANIFEST),
    (b'{"schemaVersion": 3}', OCI_MANIFEST),
    (b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": []}', OCI_MANIFEST),
    (b'{"schemaVersion": 2, "config": {"mediaType": "x", "digest": "sha256:zz", "size": 1}, "layers": []}', OCI_MANIFEST),
    (b'{"schemaVersion": 2, "config": {"mediaType": "x", "digest": "' + digest_of(b"a").encode() + b'", "size": -1}, "layers": []}', OCI_MANIFEST),
    (b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}', OCI_MANIFEST),
    (b'{"schemaVersion": 2, "manifests": "nope"}', OCI_INDEX),
    (b'{"schemaVersion": 2, "layers": []}', "application/vnd.example.unknown+json"),
])
async def test_invalid_manifests(client, body, ctype):
    r = await client.put("/v2/foo/manifests/bad", data=body, headers={"Content-Type": ctype})
    assert r.status == 400, await r.text()
    assert code(await r.json()) == "MANIFEST_INVALID"


async def test_schema1_is_refused(client):
    body = json.dumps({"schemaVersion": 1, "name": "foo", "tag": "v1", "fsLayers": [],
                       "history": [], "signatures": []}).encode()
    r = await client.put("/v2/foo/manifests/v1", data=body,
                         headers={"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"})
    assert r.status == 400
    err = (await r.json())["errors"][0]
    assert err["code"] == "MANIFEST_INVALID" and "schema1" in err["message"]


async def test_too_big(client):
    body = b'{"schemaVersion": 2, "pad": "' + b"x" * (4 << 20) + b'"}'
    r = await client.put("/v2/foo/manifests/big", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 413
    assert code(await r.json()) == "MANIFEST_INVALID"


async def test_docker_schema2_and_manifest_list(client):
    await push_blobs(client)
    m = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_V2,
                    "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                               "digest": digest_of(CONFIG), "size": len(CONFIG)},
                    "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                                "digest": digest_of(LAYER), "size": len(LAYER)}]}).encode()
    r = await client.put("/v2/foo/manifests/amd64", data=m, headers={"Content-Type": DOCKER_V2})
    assert r.status == 201
    lst = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [
        {"mediaType": DOCKER_V2, "digest": digest_of(m), "size": len(m),
         "platform": {"architecture": "amd64", "os": "linux"}}]}).encode()
    r = await client.put("/v2/foo/manifests/multi", data=lst, headers={"Content-Type": DOCKER_LIST})
    assert r.status == 201
    r = await client.get("/v2/foo/manifests/multi")
    assert r.headers["Content-Type"] == DOCKER_LIST and await r.read() == lst
    assert (await client.get("/v2/foo/manifests/amd64")).headers["Content-Type"] == DOCKER_V2


async def test_index_requires_children(client):
    idx = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest_of(b"child"), "size": 5}]}).encode()
    r = await client.put("/v2/foo/manifests/idx", data=idx, headers={"Content-Type": OCI_INDEX})
    assert r.status == 400 and code(await r.json()) == "MANIFEST_BLOB_UNKNOWN"


async def test_content_type_mismatch(client):
    await push_blobs(client)
    r = await client.put("/v2/foo/manifests/v1", data=manifest(), headers={"Content-Type": DOCKER_V2})
    assert r.status == 400 and code(await r.json()) == "MANIFEST_INVALID"


async def test_unknown_manifest(client):
    for ref in ("nope", digest_of(b"nope")):
        r = await client.get(f"/v2/foo/manifests/{ref}")
        assert r.status == 404
        assert code(await r.json()) == "MANIFEST_UNKNOWN"


async def test_invalid_tag(client):
    for method in ("GET", "HEAD", "DELETE"):
        r = await client.request(method, "/v2/foo/manifests/.INVALID_MANIFEST_NAME")
        assert r.status == 404
    r = await client.put("/v2/foo/manifests/-bad", data=b"{}", headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 400 and code(await r.json()) == "MANIFEST_INVALID"  # the spec has no TAG_INVALID


async def test_retag_moves_tag(client):
    await push_blobs(client)
    a, b = manifest(), manifest(annotations={"x": "y"})
    await client.put("/v2/foo/manifests/latest", data=a, headers={"Content-Type": OCI_MANIFEST})
    await client.put("/v2/foo/manifests/latest", data=b, headers={"Content-Type": OCI_MANIFEST})
    r = await client.get("/v2/foo/manifests/latest")
    assert r.headers["Docker-Content-Digest"] == digest_of(b)
    assert (await client.get(f"/v2/foo/manifests/{digest_of(a)}")).status == 200


async def test_delete_by_tag_keeps_manifest(client):
    await push_blobs(client)
    body = manifest()
    await client.put("/v2/foo/manifests/v1", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert (await client.delete("/v2/foo/manifests/v1")).status == 202
    assert (await client.get("/v2/foo/manifests/v1")).status == 404
    assert (await client.get(f"/v2/foo/manifests/{digest_of(body)}")).status == 200
    assert (await client.delete("/v2/foo/manifests/v1")).status == 404


async def test_delete_by_digest_removes_its_tags(client):
    await push_blobs(client)
    body = manifest()
    for tag in ("a", "b"):
        await client.put(f"/v2/foo/manifests/{tag}", data=body, headers={"Content-Type": OCI_MANIFEST})
    r = await client.delete(f"/v2/foo/manifests/{digest_of(body)}")
    assert r.status == 202
    assert (await client.get(f"/v2/foo/manifests/{digest_of(body)}")).status == 404
    assert (await (await client.get("/v2/foo/tags/list")).json())["tags"] == []
    r = await client.delete(f"/v2/foo/manifests/{digest_of(body)}")
    assert r.status == 404 and code(await r.json()) == "MANIFEST_UNKNOWN"


async def test_delete_disabled(aiohttp_client, app_factory):
    c = await aiohttp_client(app_factory(REGISTRY_STORAGE_DELETE_ENABLED="false"))
    await push_blobs(c)
    await c.put("/v2/foo/manifests/v1", data=manifest(), headers={"Content-Type": OCI_MANIFEST})
    r = await c.delete("/v2/foo/manifests/v1")
    assert r.status == 405 and code(await r.json()) == "UNSUPPORTED"


async def test_foreign_layers_need_not_exist(client):
    await push_blobs(client)
    doc = json.loads(manifest())
    doc["layers"].append({"mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                          "digest": digest_of(b"windows base"), "size": 12,
                          "urls": ["https://example.invalid/layer"]})
    r = await client.put("/v2/foo/manifests/win", data=json.dumps(doc).encode(),
                         headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201


async def test_a_refused_delete_leaves_no_trace(client):
    """DELETE of a manifest or tag that is not there (in a repository that does not exist, or
    one that does) is refused before the repository's lock is taken: no repository appears."""
    digest = digest_of(b"nothing")
    for ref in (digest, "v1"):
        r = await client.delete(f"/v2/ghost/manifests/{ref}")
        assert r.status == 404 and code(await r.json()) == "MANIFEST_UNKNOWN"
    r = await client.get("/v2/ghost/tags/list")
    assert r.status == 404 and code(await r.json()) == "NAME_UNKNOWN"
    assert "ghost" not in (await (await client.get("/v2/_catalog")).json())["repositories"]
