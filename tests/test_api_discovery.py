"""Tags list, catalog (pagination and Link), referrers (OCI 1.1)."""

import json

from .conftest import OCI_INDEX, OCI_MANIFEST, digest_of, image_manifest

CONFIG = b"{}"
EMPTY = "application/vnd.oci.empty.v1+json"


async def push_image(client, name, tags, **extra):
    await client.post(f"/v2/{name}/blobs/uploads/?digest={digest_of(CONFIG)}", data=CONFIG)
    body = image_manifest(digest_of(CONFIG), len(CONFIG), [], **extra)
    for tag in tags:
        r = await client.put(f"/v2/{name}/manifests/{tag}", data=body, headers={"Content-Type": OCI_MANIFEST})
        assert r.status == 201, await r.text()
    if not tags:
        r = await client.put(f"/v2/{name}/manifests/{digest_of(body)}", data=body,
                             headers={"Content-Type": OCI_MANIFEST})
        assert r.status == 201, await r.text()
    return body, r


async def test_tags_list_sorted(client):
    await push_image(client, "foo", ["b", "a", "C", "1.0"])
    r = await client.get("/v2/foo/tags/list")
    assert r.status == 200
    assert await r.json() == {"name": "foo", "tags": ["1.0", "C", "a", "b"]}


async def test_tags_pagination(client):
    await push_image(client, "foo", [f"t{i}" for i in range(5)])
    r = await client.get("/v2/foo/tags/list?n=2")
    assert (await r.json())["tags"] == ["t0", "t1"]
    assert r.headers["Link"] == '</v2/foo/tags/list?n=2&last=t1>; rel="next"'
    r = await client.get("/v2/foo/tags/list?n=2&last=t1")
    assert (await r.json())["tags"] == ["t2", "t3"]
    r = await client.get("/v2/foo/tags/list?n=2&last=t3")
    assert (await r.json())["tags"] == ["t4"]
    assert "Link" not in r.headers
    r = await client.get("/v2/foo/tags/list?last=t2")
    assert (await r.json())["tags"] == ["t3", "t4"]
    r = await client.get("/v2/foo/tags/list?n=0")
    assert (await r.json())["tags"] == []


async def test_tags_bad_n(client):
    await push_image(client, "foo", ["a"])
    r = await client.get("/v2/foo/tags/list?n=abc")
    assert r.status == 400


async def test_tags_of_unknown_repo(client):
    r = await client.get("/v2/nothere/tags/list")
    assert r.status == 404
    assert (await r.json())["errors"][0]["code"] == "NAME_UNKNOWN"


async def test_catalog(client):
    for name in ("b/c", "a", "b", "a/deep/er"):
        await push_image(client, name, ["x"])
    await client.post("/v2/uploadonly/blobs/uploads/")  # no manifest: not a repository yet
    r = await client.get("/v2/_catalog")
    assert await r.json() == {"repositories": ["a", "a/deep/er", "b", "b/c"]}
    r = await client.get("/v2/_catalog?n=2")
    assert (await r.json())["repositories"] == ["a", "a/deep/er"]
    assert r.headers["Link"] == '</v2/_catalog?n=2&last=a/deep/er>; rel="next"'
    r = await client.get("/v2/_catalog?n=2&last=a/deep/er")
    assert (await r.json())["repositories"] == ["b", "b/c"]


async def test_catalog_empty(client):
    r = await client.get("/v2/_catalog")
    assert await r.json() == {"repositories": []}


async def test_referrers(client):
    subject, _ = await push_image(client, "foo", ["v1"])
    sd = digest_of(subject)
    # An artifact with an explicit artifactType, and an image-style one typed by its config.
    art_body, r = await push_image(client, "foo", [], artifactType="application/vnd.example.sbom",
                                   subject={"mediaType": OCI_MANIFEST, "digest": sd, "size": len(subject)},
                                   annotations={"org.example": "yes"})
    assert r.headers["OCI-Subject"] == sd
    sig_body, _ = await push_image(client, "foo", [], subject={"mediaType": OCI_MANIFEST, "digest": sd,
                                                              "size": len(subject)},
                                   annotations={"kind": "sig"})
    r = await client.get(f"/v2/foo/referrers/{sd}")
    assert r.status == 200
    assert r.headers["Content-Type"] == OCI_INDEX
    index = await r.json()
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    by_digest = {m["digest"]: m for m in index["manifests"]}
    assert set(by_digest) == {digest_of(art_body), digest_of(sig_body)}
    art = by_digest[digest_of(art_body)]
    assert art == {"mediaType": OCI_MANIFEST, "digest": digest_of(art_body), "size": len(art_body),
                   "artifactType": "application/vnd.example.sbom", "annotations": {"org.example": "yes"}}
    assert by_digest[digest_of(sig_body)]["artifactType"] == "application/vnd.oci.image.config.v1+json"

    r = await client.get(f"/v2/foo/referrers/{sd}?artifactType=application/vnd.example.sbom")
    assert r.headers["OCI-Filters-Applied"] == "artifactType"
    assert [m["digest"] for m in (await r.json())["manifests"]] == [digest_of(art_body)]

    # Deleting a referrer removes it from the list.
    assert (await client.delete(f"/v2/foo/manifests/{digest_of(art_body)}")).status == 202
    r = await client.get(f"/v2/foo/referrers/{sd}")
    assert [m["digest"] for m in (await r.json())["manifests"]] == [digest_of(sig_body)]


async def test_referrer_accepted_before_subject_exists(client):
    missing = digest_of(b"not pushed yet")
    body, r = await push_image(client, "foo", [], subject={"mediaType": OCI_MANIFEST,
                                                           "digest": missing, "size": 10})
    assert r.headers["OCI-Subject"] == missing
    r = await client.get(f"/v2/foo/referrers/{missing}")
    assert [m["digest"] for m in (await r.json())["manifests"]] == [digest_of(body)]


async def test_referrers_of_unknown_digest_is_empty(client):
    r = await client.get(f"/v2/foo/referrers/{digest_of(b'nothing')}")
    assert r.status == 200
    assert (await r.json())["manifests"] == []


async def test_referrers_invalid_digest(client):
    r = await client.get("/v2/foo/referrers/sha256:bad")
    assert r.status == 400
    assert (await r.json())["errors"][0]["code"] == "DIGEST_INVALID"


async def test_index_with_subject(client):
    child, _ = await push_image(client, "foo", ["child"])
    idx = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "artifactType": "application/x-bundle",
                      "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest_of(child), "size": len(child)}],
                      "subject": {"mediaType": OCI_MANIFEST, "digest": digest_of(child),
                                  "size": len(child)}}).encode()
    r = await client.put("/v2/foo/manifests/bundle", data=idx, headers={"Content-Type": OCI_INDEX})
    assert r.status == 201
    r = await client.get(f"/v2/foo/referrers/{digest_of(child)}")
    (desc,) = (await r.json())["manifests"]
    assert desc["mediaType"] == OCI_INDEX and desc["artifactType"] == "application/x-bundle"


async def test_catalog_is_in_string_order_across_pages(client):
    """'-' and '.' sort before '/': a repository's name comes before names nested under it,
    and those nested under a shorter name can come after a longer sibling."""
    names = ["a", "a-b", "a.b/x", "a/c", "a/c-d", "a/c/e", "b", "b0/z"]
    for name in reversed(names):
        await push_image(client, name, ["x"])
    assert (await (await client.get("/v2/_catalog")).json())["repositories"] == sorted(names)
    got, last = [], None
    while True:
        r = await client.get("/v2/_catalog?n=3" + (f"&last={last}" if last else ""))
        page = (await r.json())["repositories"]
        got += page
        if "Link" not in r.headers:
            break
        last = page[-1]
    assert got == sorted(names)


async def test_a_catalog_page_lists_only_what_it_shows(aiohttp_client, data_dir):
    """On a registry of many repositories a page of one stops at once, and a page after `last`
    skips every subtree before it: the walk's storage calls do not grow with the registry."""
    from regserve.api import make_app
    from regserve.registry import Registry
    from regserve.storage.filesystem import FilesystemDriver

    from .conftest import make_config
    from .faults import FaultyDriver
    for i in range(2000):
        (data_dir / f"docker/registry/v2/repositories/team{i:04d}/app/_manifests").mkdir(parents=True)
    driver = FaultyDriver(FilesystemDriver(str(data_dir)))
    client = await aiohttp_client(make_app(make_config(data_dir), Registry(driver)))
    for query, expected in (("n=1", ["team0000/app"]), ("n=2&last=team1500/app", ["team1501/app", "team1502/app"])):
        driver.calls.clear()
        r = await client.get(f"/v2/_catalog?{query}")
        assert (await r.json())["repositories"] == expected
        assert len([c for c in driver.calls if c[0] == "list"]) <= 12, driver.calls  # of 4000 directories
