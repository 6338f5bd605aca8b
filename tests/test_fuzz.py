"""Property-based fuzzing of every endpoint with what clients should never send: random names,
tags, digests, ranges, upload ids, methods and manifests, sent raw to a real server process.

Whatever arrives, the answer has a status the spec uses, never a 5xx, and (for a refusal) the
spec's JSON body with a code from the spec's table; a refused request changes nothing stored;
the server logs no traceback. Runs are derandomized (the same examples every time, so a failure
reproduces); REGSERVE_FUZZ_EXAMPLES raises their number for a longer hunt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import OCI_INDEX, OCI_MANIFEST, ServerProcess, digest_of, http
from .test_conformance_workflows import SPEC_CODES
from .test_hostile_requests import raw

EXAMPLES = int(os.environ.get("REGSERVE_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SPEC_STATUSES = {200, 201, 202, 204, 206, 304, 400, 401, 403, 404, 405, 413, 416, 429, 431}
CONFIG = b'{"fuzz": true}'

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)
names = st.one_of(
    texts,
    st.lists(st.sampled_from(["a", "b0", "x.y", "..", ".", "", "_m", "A", "a-", "-a", "a__b", "%2f", "ä"]),
             min_size=1, max_size=6).map("/".join),
    st.from_regex(r"[a-z0-9]{1,8}(/[a-z0-9._-]{1,8}){0,3}", fullmatch=True),
    st.just("a" * 300))
digests = st.one_of(
    texts,
    st.from_regex(r"[a-z0-9+._-]{1,12}:[a-zA-Z0-9=_-]{0,140}", fullmatch=True),
    st.from_regex(r"sha(256|512):[a-f0-9]{60,130}", fullmatch=True),
    st.just(digest_of(CONFIG)), st.just("sha256:" + "A" * 64))
tags = st.one_of(texts, st.from_regex(r"[a-zA-Z0-9_.-]{1,140}", fullmatch=True), digests)
numbers = st.one_of(st.integers(-5, 1 << 70).map(str), st.from_regex(r"\d{15,40}", fullmatch=True), texts)
ranges = st.one_of(texts, st.builds(lambda a, b: f"bytes={a}-{b}", numbers, numbers),
                   st.builds(lambda a, b: f"{a}-{b}", numbers, numbers))
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=120)
media_types = st.one_of(st.sampled_from([OCI_MANIFEST, OCI_INDEX, "application/vnd.docker.distribution.manifest.v2+json",
                                         "application/vnd.docker.distribution.manifest.v1+prettyjws",
                                         "application/json", ""]), header_text)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                           max_leaves=20)
descriptors = st.fixed_dictionaries({"mediaType": media_types, "digest": digests,
                                     "size": st.one_of(st.integers(-1, 1 << 64), texts)})
manifests = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"schemaVersion": st.one_of(st.just(2), json_values), "mediaType": media_types,
                           "config": st.one_of(descriptors, json_values),
                           "layers": st.one_of(st.lists(descriptors, max_size=3), json_values)},
                          optional={"subject": descriptors, "annotations": json_values,
                                    "artifactType": json_values,
                                    "manifests": st.lists(descriptors, max_size=3)}).map(
        lambda d: json.dumps(d).encode()),
    st.binary(max_size=300),
    st.just(b"[" * 3000 + b"]" * 3000))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz") / "data"
    data.mkdir()
    srv = ServerProcess(data)
    status, _, _ = http("POST", f"{srv.url}/v2/fuzz/blobs/uploads/?digest={digest_of(CONFIG)}", CONFIG)
    assert status == 201
    yield srv
    srv.stop()
    log = srv.log_path.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def stored(data: Path) -> set[tuple[str, int]]:
    return {(str(p.relative_to(data)), p.stat().st_size) for p in data.rglob("*")
            if p.is_file() and ".regserve" not in p.parts}


def send(server: ServerProcess, method: str, path: str, headers: dict[str, str] | None = None,
         body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """A raw request (no client library second-guesses it); checks the answer's form."""
    lines = [f"{method} {path} HTTP/1.1", "Host: fuzz", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
    before = stored(server.data)
    status, got, answer = raw(server.port, request)
    assert status in SPEC_STATUSES, (status, method, path, answer[:300])
    if status >= 400:
        if method != "HEAD":
            assert got.get("Content-Type", "").startswith("application/json"), (status, path, answer[:300])
            errors = json.loads(answer)["errors"]
            assert errors and {e["code"] for e in errors} <= SPEC_CODES, (path, answer[:300])
        after = stored(server.data)
        if method == "PUT" and "/blobs/uploads/" in path and '"DIGEST_INVALID"' in answer.decode("utf-8", "replace"):
            # A commit whose digest does not match cancels the session, as distribution does:
            # its files go, and nothing else changes.
            session = "/_uploads/" + path.split("/blobs/uploads/", 1)[1].split("?", 1)[0] + "/"
            assert after <= before and all(session in f"/{name}" for name, _ in before - after), (method, path)
        else:
            assert after == before, (method, path)  # refused: nothing changed
    return status, got, answer


def p(value: str) -> str:
    return quote(value, safe="/")


@FUZZ
@given(method=st.sampled_from(["GET", "HEAD", "DELETE", "PUT", "PATCH", "POST"]), name=names,
       resource=st.sampled_from(["tags/list", "manifests/", "blobs/", "blobs/uploads/", "referrers/", ""]),
       tail=tags)
def test_any_path(server, method, name, resource, tail):
    path = f"/v2/{p(name)}/{resource}" + (p(tail) if resource.endswith("/") else "")
    send(server, method, path)


@FUZZ
@given(name=st.sampled_from(["fuzz", "other"]), digest=digests, rng=st.one_of(st.none(), ranges),
       method=st.sampled_from(["GET", "HEAD", "DELETE"]))
def test_blob_digests_and_ranges(server, name, digest, rng, method):
    headers = {"Range": rng} if rng is not None and "\n" not in rng and "\r" not in rng else {}
    send(server, method, f"/v2/{name}/blobs/{p(digest)}", {k: v.encode("utf-8", "replace").decode("latin-1")
                                                            for k, v in headers.items()})


@FUZZ
@given(digest=digests, mount=st.one_of(st.none(), digests), source=st.one_of(st.none(), names),
       body=st.binary(max_size=64))
def test_upload_starts(server, digest, mount, source, body):
    query = f"digest={p(digest)}"
    if mount is not None:
        query = f"mount={p(mount)}" + (f"&from={p(source)}" if source is not None else "")
    send(server, "POST", f"/v2/fuzz/blobs/uploads/?{query}", body=body)


@FUZZ
@given(method=st.sampled_from(["PATCH", "PUT", "GET", "DELETE"]), upload=st.one_of(st.none(), texts),
       content_range=st.one_of(st.none(), ranges), digest=st.one_of(st.none(), digests),
       body=st.binary(max_size=64))
def test_upload_sessions(server, method, upload, content_range, digest, body):
    if upload is None:  # a real session, so the range and digest checks are reached
        status, headers, _ = send(server, "POST", "/v2/fuzz/blobs/uploads/")
        path = "/" + headers["Location"].split("://", 1)[-1].split("/", 1)[1]
    else:
        path = f"/v2/fuzz/blobs/uploads/{p(upload)}"
    if digest is not None:
        path += f"?digest={p(digest)}"
    headers = {"Content-Range": content_range} if content_range and content_range.isprintable() \
        and content_range.isascii() else {}
    send(server, method, path, headers, body)


@FUZZ
@given(reference=tags, body=manifests, content_type=media_types)
def test_manifest_pushes(server, reference, body, content_type):
    send(server, "PUT", f"/v2/fuzz/manifests/{p(reference)}", {"Content-Type": content_type}, body)


@FUZZ
@given(n=st.one_of(st.none(), numbers), last=st.one_of(st.none(), texts),
       where=st.sampled_from(["/v2/_catalog", "/v2/fuzz/tags/list"]))
def test_pagination(server, n, last, where):
    query = "&".join(f"{k}={p(v)}" for k, v in (("n", n), ("last", last)) if v is not None)
    send(server, "GET", f"{where}?{query}")
