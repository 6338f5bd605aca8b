"""The OCI Distribution Spec 1.1 conformance workflows, as checks of our own.

The official suite (opencontainers/distribution-spec/conformance, Go + ginkgo v2) cannot be built
offline here, so this module re-states its four workflows — pull, push, content discovery, content
management, with cross-repository mount — in the same order, against a real server process,
with the same expectations, including the lenient ones the spec allows. Tests run in file order
and share one registry and namespace, as the suite does.
"""

from __future__ import annotations

import base64
import json
import os
import re
import uuid
from urllib.parse import urlparse

import pytest

from .conftest import ServerProcess, digest_of, http

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"
# The OCI Distribution Spec's table: "The code field MUST be one of the following".
SPEC_CODES = {"BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
              "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
              "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED", "TOOMANYREQUESTS"}
# A real tar.gz of one small text file, as the suite uses.
LAYER = base64.b64decode(
    "H4sIAAAAAAAAA+3OQQrCMBCF4a49xXgBSUnaHMCTRBptQRNpp6i3t0UEV7oqIv7fYgbmzeJpHHSjVy0"
    "WZCa1c/MufWVe94N3RWlrZ72x3k/30nhbFWKWLPU0Dhp6keJ8im//PuU/6pZH2WVtYx8b0Sz7LjWSR5VLG6YRBumSzOlGtjkd+qD"
    "jMWiX07Befbs7AAAAAAAAAAAAAAAAAPyzO34MnqoAKAAA")
ANNOTATION = "org.opencontainers.conformance.test"
TYPE_A, TYPE_B = "application/vnd.nhl.peanut.butter.bagel", "application/vnd.nba.strawberry.jam.croissant"
TYPE_INDEX = "application/vnd.food.stand"


def dumps(doc: dict) -> bytes:
    return json.dumps(doc, indent="\t").encode()


def desc(media_type: str, data: bytes) -> dict:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}


class Suite:
    """The suite's fixtures: unique configs and manifests per workflow, referrer artifacts."""

    def __init__(self, srv: ServerProcess) -> None:
        self.url = srv.url
        self.ns = f"conformance/{uuid.uuid4().hex[:8]}"
        self.cross = f"conformance-{uuid.uuid4()}"
        self.configs = [dumps({"architecture": "amd64", "os": "linux", "author": uuid.uuid4().hex,
                               "rootfs": {"type": "layers", "diff_ids": []}}) for _ in range(5)]
        layer = desc("application/vnd.oci.image.layer.v1.tar+gzip", LAYER)
        self.manifests = [dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                 "config": dict(desc("application/vnd.oci.image.config.v1+json", c),
                                                data=base64.b64encode(c).decode(),
                                                newUnspecifiedField=base64.b64encode(b"hello world").decode()),
                                 "layers": [layer]}) for c in self.configs]
        self.blob_a = os.urandom(42)
        self.blob_b = os.urandom(42)
        self.ref_a = b"NHL Peanut Butter on my NHL bagel"
        self.ref_b = b"NBA Strawberry Jam on my NBA croissant"
        self.empty = b"{}"
        m3, m4 = self.manifests[3], self.manifests[4]
        subject4 = desc(OCI_MANIFEST, m4)
        self.annotations: dict[str, str] = {}

        def artifact(note: str | None, subject: dict, artifact_type: str | None, config: dict,
                     layers: list[dict]) -> bytes:
            doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers,
                   "subject": subject}
            if artifact_type:
                doc["artifactType"] = artifact_type
            if note:
                doc["annotations"] = {ANNOTATION: note}
            body = dumps(doc)
            if note:
                self.annotations[digest_of(body)] = note
            return body

        empty_desc = desc(EMPTY, self.empty)
        self.a_config = artifact("test config a", subject4, None, desc(TYPE_A, self.ref_a), [empty_desc])
        self.b_config = artifact("test config b", subject4, None, desc(TYPE_B, self.ref_b), [empty_desc])
        self.a_layer = artifact("test layer a", subject4, TYPE_A, empty_desc, [desc(TYPE_A, self.ref_a)])
        self.b_layer = artifact("test layer b", subject4, TYPE_B, empty_desc, [desc(TYPE_B, self.ref_b)])
        self.c_layer = artifact(None, desc(OCI_MANIFEST, m3), TYPE_B, empty_desc, [desc(TYPE_B, self.ref_b)])
        self.index = dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "artifactType": TYPE_INDEX,
                            "manifests": [desc(OCI_MANIFEST, self.a_config), desc(OCI_MANIFEST, self.a_layer)],
                            "subject": subject4, "annotations": {ANNOTATION: "test index"}})
        self.annotations[digest_of(self.index)] = "test index"
        self.empty_layers = dumps({"schemaVersion": 2,
                                   "config": desc("application/vnd.oci.image.config.v1+json", self.configs[1]),
                                   "layers": []})
        self.state: dict = {}

    # -- requests, as reggie builds them -----------------------------------------------------

    def req(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            name: str | None = None, **query: str):
        path = path.replace("<name>", name or self.ns)
        if body is None and headers:  # Go's net/http ignores a Content-Length header without a body
            headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
        if query:
            path += ("&" if "?" in path else "?") + "&".join(f"{k}={v}" for k, v in query.items())
        return http(method, self.url + path, body, headers)

    @staticmethod
    def rel(headers: dict) -> str:
        u = urlparse(headers["Location"])
        return u.path + (f"?{u.query}" if u.query else "")

    def push_blob(self, data: bytes) -> None:
        st, h, _ = self.req("POST", "/v2/<name>/blobs/uploads/")
        assert st == 202
        st, _, _ = self.req("PUT", self.rel(h), data, {"Content-Type": "application/octet-stream",
                                                       "Content-Length": str(len(data))},
                            digest=digest_of(data))
        assert st == 201

    def put_manifest(self, ref: str, body: bytes, media_type: str = OCI_MANIFEST):
        return self.req("PUT", f"/v2/<name>/manifests/{ref}", body, {"Content-Type": media_type})


def ok(status: int) -> bool:
    return 200 <= status < 300


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    data = tmp_path_factory.mktemp("conformance") / "data"
    data.mkdir()
    srv = ServerProcess(data)
    yield Suite(srv)
    srv.stop()


# -- Pull --------------------------------------------------------------------------------------

def test_pull(suite):
    s = suite
    s.push_blob(s.configs[0])
    s.push_blob(LAYER)
    assert ok(s.put_manifest("tagtest0", s.manifests[0])[0])
    st, _, body = s.req("GET", "/v2/<name>/tags/list")
    tag = json.loads(body)["tags"][0]
    dummy = digest_of(b"hello world")
    cd, md = digest_of(s.configs[0]), digest_of(s.manifests[0])

    assert s.req("HEAD", f"/v2/<name>/blobs/{dummy}")[0] == 404
    st, h, _ = s.req("HEAD", f"/v2/<name>/blobs/{cd}")
    assert st == 200 and h["Docker-Content-Digest"] == cd
    assert s.req("GET", f"/v2/<name>/blobs/{dummy}")[0] == 404
    assert s.req("GET", f"/v2/<name>/blobs/{cd}")[0] == 200

    assert s.req("HEAD", "/v2/<name>/manifests/.INVALID_MANIFEST_NAME")[0] == 404
    for method in ("HEAD", "GET"):
        for ref in (md, tag):
            st, h, _ = s.req(method, f"/v2/<name>/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
            assert st == 200 and h["Docker-Content-Digest"] == md
    assert s.req("GET", "/v2/<name>/manifests/.INVALID_MANIFEST_NAME")[0] == 404

    st, _, body = s.put_manifest("sha256:totallywrong", b"blablabla")
    assert st in (400, 404)
    if st == 400:
        assert json.loads(body)["errors"][0]["code"] in SPEC_CODES

    assert s.req("DELETE", f"/v2/<name>/manifests/{md}")[0] in (202,)
    assert s.req("DELETE", f"/v2/<name>/blobs/{cd}")[0] == 202
    assert s.req("DELETE", f"/v2/<name>/blobs/{digest_of(LAYER)}")[0] == 202


# -- Push --------------------------------------------------------------------------------------

def test_push_setup_and_streamed(suite):
    s = suite
    s.push_blob(s.empty)
    s.push_blob(s.ref_a)
    st, h, _ = s.req("POST", "/v2/<name>/blobs/uploads/")
    st, h, _ = s.req("PATCH", s.rel(h), s.blob_a, {"Content-Type": "application/octet-stream"})
    assert st == 202
    st, h, _ = s.req("PUT", s.rel(h), None, {"Content-Type": "application/octet-stream",
                                             "Content-Length": str(len(s.blob_a))},
                     digest=digest_of(s.blob_a))
    assert st == 201 and h["Location"]


def test_push_monolithic(suite):
    s = suite
    assert s.req("GET", f"/v2/<name>/blobs/{digest_of(b'hello world')}")[0] == 404
    c1 = s.configs[1]
    st, h, _ = s.req("POST", "/v2/<name>/blobs/uploads/", c1, {"Content-Length": str(len(c1)),
                                                               "Content-Type": "application/octet-stream"},
                     digest=digest_of(c1))
    assert st in (201, 202) and h["Location"]
    assert s.req("GET", f"/v2/<name>/blobs/{digest_of(c1)}")[0] == (404 if st == 202 else 200)
    st, h, _ = s.req("POST", "/v2/<name>/blobs/uploads/")
    assert st == 202
    st, h, _ = s.req("PUT", s.rel(h), c1, {"Content-Length": str(len(c1)),
                                           "Content-Type": "application/octet-stream"}, digest=digest_of(c1))
    assert st == 201 and h["Location"]
    assert s.req("GET", f"/v2/<name>/blobs/{digest_of(c1)}")[0] == 200
    s.push_blob(LAYER)
    assert s.req("GET", f"/v2/<name>/blobs/{digest_of(LAYER)}")[0] == 200


def test_push_chunked(suite):
    s = suite
    blob = s.blob_b
    st, h, _ = s.req("POST", "/v2/<name>/blobs/uploads/", None, {"Content-Length": "0"})
    minimum = int(h.get("OCI-Chunk-Min-Length", "0"))
    if minimum > len(blob) // 2 + 1:  # the suite grows its blob to the advertised minimum
        blob = s.blob_b = os.urandom(minimum * 2 - 2)
    half = len(blob) // 2 + 1
    c1, c2 = blob[:half], blob[half:]
    r1, r2 = f"0-{half - 1}", f"{half}-{len(blob) - 1}"
    st, _, _ = s.req("PATCH", s.rel(h), c2, {"Content-Type": "application/octet-stream",
                                             "Content-Length": str(len(c2)), "Content-Range": r2})
    assert st == 416
    st, first, _ = s.req("POST", "/v2/<name>/blobs/uploads/", None, {"Content-Length": "0"})
    st, h, _ = s.req("PATCH", s.rel(first), c1, {"Content-Type": "application/octet-stream",
                                                 "Content-Length": str(len(c1)), "Content-Range": r1})
    assert st == 202 and h["Range"] == r1
    st, _, _ = s.req("PATCH", s.rel(first), c1, {"Content-Type": "application/octet-stream",
                                                 "Content-Length": str(len(c1)), "Content-Range": r1})
    assert st == 416
    st, h, _ = s.req("GET", s.rel(first))
    assert st == 204 and h["Location"] and h["Range"] == r1
    st, h, _ = s.req("PATCH", s.rel(h), c2, {"Content-Length": str(len(c2)), "Content-Range": r2,
                                             "Content-Type": "application/octet-stream"})
    assert st == 202 and h["Range"] == f"0-{len(blob) - 1}" and h["Location"]
    st, h, _ = s.req("PUT", s.rel(h), None, {"Content-Length": "0", "Content-Type": "application/octet-stream"},
                     digest=digest_of(blob))
    assert st == 201 and h["Location"]


def test_push_cross_repository_mount(suite):
    s = suite
    st, h, _ = s.req("POST", "/v2/<name>/blobs/uploads/", name=s.cross, mount=digest_of(b"hello world"))
    assert st == 202 and h["Location"]
    st, h, _ = s.req("POST", "/v2/<name>/blobs/uploads/", name=s.cross, mount=digest_of(s.blob_a), **{"from": s.ns})
    assert st in (201, 202)
    if st == 201:
        assert s.rel(h) == f"/v2/{s.cross}/blobs/{digest_of(s.blob_a)}"
        assert s.req("GET", s.rel(h))[0] == 200
    else:
        assert s.rel(h).startswith(f"/v2/{s.cross}/blobs/uploads/")


def test_push_manifests(suite):
    s = suite
    assert s.req("GET", "/v2/<name>/manifests/.INVALID_MANIFEST_NAME")[0] == 404
    for i in range(4):
        st, h, _ = s.put_manifest(f"test{i}", s.manifests[1])
        assert st == 201 and h["Location"]
    st, h, _ = s.put_manifest("emptylayer", s.empty_layers)
    assert st == 201 and h["Location"]  # the suite only warns; we support it
    st, _, _ = s.req("GET", f"/v2/<name>/manifests/{digest_of(s.manifests[1])}", headers={"Accept": OCI_MANIFEST})
    assert st == 200
    # An artifact typed by its config, and one by artifactType with the empty config.
    config_typed = dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": desc(TYPE_A, s.ref_a),
                          "layers": [desc("application/vnd.oci.image.layer.v1.tar+gzip", LAYER)]})
    artifact_typed = dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": TYPE_A,
                            "config": desc(EMPTY, s.empty), "layers": [desc(TYPE_A, s.ref_a)]})
    for body in (config_typed, artifact_typed):
        assert ok(s.put_manifest(digest_of(body), body)[0])
    # An index of a pushed image, and an index of that index.
    s.push_blob(s.configs[0])
    assert ok(s.put_manifest("tagtest0", s.manifests[0])[0])
    idx = dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "artifactType": TYPE_INDEX,
                 "manifests": [desc(OCI_MANIFEST, s.manifests[0])], "annotations": {ANNOTATION: "test index"}})
    assert ok(s.put_manifest(digest_of(idx), idx, OCI_INDEX)[0])
    nested = dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "artifactType": TYPE_INDEX,
                    "manifests": [desc(OCI_INDEX, idx)], "annotations": {ANNOTATION: "test index"}})
    assert ok(s.put_manifest(digest_of(nested), nested, OCI_INDEX)[0])
    # A dangling subject is accepted and answered with OCI-Subject. (Its layer must exist: we
    # validate referenced blobs, so it is pushed first.)
    s.push_blob(s.ref_b)
    st, h, _ = s.put_manifest(digest_of(s.c_layer), s.c_layer)
    assert ok(st)
    assert re.fullmatch(r"[a-z0-9]+:[a-f0-9]+", h["OCI-Subject"])
    s.state["push_cleanup"] = [digest_of(config_typed), digest_of(artifact_typed), digest_of(s.empty_layers)]


def test_push_teardown(suite):
    s = suite
    assert s.req("DELETE", f"/v2/<name>/manifests/{digest_of(s.manifests[1])}")[0] == 202
    for d in s.state["push_cleanup"]:
        assert s.req("DELETE", f"/v2/<name>/manifests/{d}")[0] == 202
    for blob in (s.configs[1], LAYER, s.empty):
        assert s.req("DELETE", f"/v2/<name>/blobs/{digest_of(blob)}")[0] in (202, 404)


# -- Content discovery -------------------------------------------------------------------------

def test_discovery_setup(suite):
    s = suite
    s.push_blob(s.configs[2])
    s.push_blob(LAYER)
    for i in range(4):
        assert ok(s.put_manifest(f"test{i}", s.manifests[2])[0])
    m3, m4 = digest_of(s.manifests[3]), digest_of(s.manifests[4])
    s.push_blob(s.empty)
    s.push_blob(s.ref_a)
    for body, media_type in ((s.a_config, OCI_MANIFEST), (s.a_layer, OCI_MANIFEST), (s.index, OCI_INDEX)):
        st, h, _ = s.put_manifest(digest_of(body), body, media_type)  # before their subject exists
        assert ok(st) and h["OCI-Subject"] == m4
    s.push_blob(s.configs[4])
    s.push_blob(LAYER)
    assert ok(s.put_manifest("tagtest0", s.manifests[4])[0])
    s.push_blob(s.ref_b)
    for body in (s.b_config, s.b_layer):
        st, h, _ = s.put_manifest(digest_of(body), body)
        assert ok(st) and h["OCI-Subject"] == m4
    st, h, _ = s.put_manifest(digest_of(s.c_layer), s.c_layer)
    assert ok(st) and h["OCI-Subject"] == m3


def test_discovery_tags(suite):
    s = suite
    st, _, body = s.req("GET", "/v2/<name>/tags/list")
    assert st == 200
    tags = json.loads(body)["tags"]
    n = len(tags) // 2
    st, _, body = s.req("GET", "/v2/<name>/tags/list", n=str(n))
    assert st == 200
    page = json.loads(body)["tags"]
    assert len(page) == n
    st, _, body = s.req("GET", "/v2/<name>/tags/list", n=str(n), last=page[-1])
    assert st == 200
    rest = json.loads(body)["tags"]
    assert len(rest) <= n and page[-1] not in rest and rest == tags[n:2 * n]


def test_discovery_referrers(suite):
    s = suite
    st, h, body = s.req("GET", f"/v2/<name>/referrers/{digest_of(b'hello world')}")
    assert st == 200 and h["Content-Type"] == OCI_INDEX and json.loads(body)["manifests"] == []
    st, h, body = s.req("GET", f"/v2/<name>/referrers/{digest_of(s.manifests[4])}")
    assert st == 200 and h["Content-Type"] == OCI_INDEX
    found = json.loads(body)["manifests"]
    assert len(found) == 5 and len({m["digest"] for m in found}) == 5
    for m in found:
        assert m["annotations"] == {ANNOTATION: s.annotations[m["digest"]]}
    st, h, body = s.req("GET", f"/v2/<name>/referrers/{digest_of(s.manifests[4])}", artifactType=TYPE_A)
    assert st == 200 and h["OCI-Filters-Applied"] == "artifactType"
    found = json.loads(body)["manifests"]
    assert sorted(m["digest"] for m in found) == sorted([digest_of(s.a_config), digest_of(s.a_layer)])
    st, _, body = s.req("GET", f"/v2/<name>/referrers/{digest_of(s.manifests[3])}")
    assert [m["digest"] for m in json.loads(body)["manifests"]] == [digest_of(s.c_layer)]


def test_discovery_teardown(suite):
    s = suite
    for body in (s.a_config, s.a_layer, s.b_config, s.b_layer, s.c_layer, s.index, s.manifests[2],
                 s.manifests[4]):
        assert s.req("DELETE", f"/v2/<name>/manifests/{digest_of(body)}")[0] in (202, 404)
    st, _, body = s.req("GET", f"/v2/<name>/referrers/{digest_of(s.manifests[4])}")
    assert json.loads(body)["manifests"] == []


# -- Content management ------------------------------------------------------------------------

def test_management(suite):
    s = suite
    s.push_blob(s.configs[3])
    s.push_blob(LAYER)
    assert ok(s.put_manifest("tagtest0", s.manifests[3])[0])
    num_tags = len(json.loads(s.req("GET", "/v2/<name>/tags/list")[2])["tags"])
    assert s.req("DELETE", "/v2/<name>/manifests/tagtest0")[0] == 202
    assert s.req("DELETE", f"/v2/<name>/manifests/{digest_of(s.manifests[3])}")[0] in (202, 404)
    assert s.req("GET", f"/v2/<name>/manifests/{digest_of(s.manifests[3])}")[0] == 404
    assert len(json.loads(s.req("GET", "/v2/<name>/tags/list")[2])["tags"]) < num_tags
    assert s.req("DELETE", f"/v2/<name>/blobs/{digest_of(s.configs[3])}")[0] == 202
    assert s.req("DELETE", f"/v2/<name>/blobs/{digest_of(LAYER)}")[0] in (202, 404)
    assert s.req("GET", f"/v2/<name>/blobs/{digest_of(s.configs[3])}")[0] == 404
