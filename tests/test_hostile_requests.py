"""Hostile and malformed requests: every one gets the spec's status and JSON error body with a
code from the spec's table, nothing internal leaks, and the log holds no traceback."""

import errno
import json
import re
import socket

import pytest

from regserve.api import make_app
from regserve.registry import Registry
from regserve.storage.filesystem import FilesystemDriver

from .conftest import OCI_MANIFEST, digest_of, image_manifest, make_config
from .faults import FaultyDriver
from .test_conformance_workflows import SPEC_CODES


def raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; the status, headers and body of the answer."""
    bodyless = request.startswith(b"HEAD ")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = re.search(rb"(?im)^content-length: *(\d+)", head)
                status = head.split(b" ", 2)[1]
                if bodyless or status in (b"204", b"304") or length and len(body) >= int(length.group(1)):
                    break
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def spec_error(status: int, headers: dict[str, str], body: bytes) -> str:
    assert headers.get("Content-Type", "").startswith("application/json"), (status, headers, body)
    errors = json.loads(body)["errors"]
    assert errors and all(e["code"] in SPEC_CODES for e in errors), body
    return errors[0]["code"]


NESTED = b'{"schemaVersion": 2, "config": ' + b"[" * 5000 + b"]" * 5000 + b"}"

CASES = [
    ("unknown path", b"GET /foo HTTP/1.1\r\nHost: x\r\n\r\n", 404, "UNSUPPORTED"),
    ("unknown path under /v2", b"GET /v2/a/b/c HTTP/1.1\r\nHost: x\r\n\r\n", 404, "UNSUPPORTED"),
    ("CR LF in a name", b"GET /v2/a%0d%0ab/manifests/x HTTP/1.1\r\nHost: x\r\n\r\n", 400, "NAME_INVALID"),
    ("raw ..", b"GET /v2/../../etc/passwd/blobs/sha256:aa HTTP/1.1\r\nHost: x\r\n\r\n", 400, "NAME_INVALID"),
    ("encoded ..", b"GET /v2/a/%2e%2e/b/manifests/x HTTP/1.1\r\nHost: x\r\n\r\n", 400, "NAME_INVALID"),
    ("NUL in a name", b"GET /v2/a%00b/tags/list HTTP/1.1\r\nHost: x\r\n\r\n", 400, "NAME_INVALID"),
    ("raw UTF-8 in the path", "GET /v2/ä/manifests/x HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400, "UNSUPPORTED"),
    ("header over 8 KiB", b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431,
     "UNSUPPORTED"),
    ("TLS on the plain port", bytes.fromhex("16030100f8010000f40303") + bytes(200), 400, "UNSUPPORTED"),
    ("unknown method", b"BREW /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "UNSUPPORTED"),
    ("method not allowed", b"POST /v2/a/tags/list HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405,
     "UNSUPPORTED"),
    ("unknown digest algorithm", b"GET /v2/a/blobs/md5:abcd HTTP/1.1\r\nHost: x\r\n\r\n", 404, "BLOB_UNKNOWN"),
    ("malformed digest", b"GET /v2/a/blobs/sha256:xyz HTTP/1.1\r\nHost: x\r\n\r\n", 400, "DIGEST_INVALID"),
    ("unknown algorithm to verify", b"POST /v2/a/blobs/uploads/?digest=md5:abcd HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: 1\r\n\r\nx", 400, "DIGEST_INVALID"),
    ("n not a number", b"GET /v2/_catalog?n=abc HTTP/1.1\r\nHost: x\r\n\r\n", 400, "UNSUPPORTED"),
    ("n negative", b"GET /v2/a/tags/list?n=-1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "UNSUPPORTED"),
    ("n of 5000 digits", b"GET /v2/a/tags/list?n=" + b"9" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400,
     "UNSUPPORTED"),
    ("manifest nested 5000 deep", b"PUT /v2/a/manifests/v1 HTTP/1.1\r\nHost: x\r\nContent-Type: "
     + OCI_MANIFEST.encode() + b"\r\nContent-Length: " + str(len(NESTED)).encode() + b"\r\n\r\n" + NESTED,
     400, "MANIFEST_INVALID"),
    ("upload id with a slash", b"PATCH /v2/a/blobs/uploads/..%2f.. HTTP/1.1\r\nHost: x\r\nContent-Length: 0"
     b"\r\n\r\n", 404, "BLOB_UPLOAD_UNKNOWN"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from .conftest import ServerProcess
    data = tmp_path_factory.mktemp("hostile") / "data"
    data.mkdir()
    srv = ServerProcess(data, env={"REGISTRY_LOG_ACCESSLOG_DISABLED": "true"})
    yield srv
    srv.stop()
    log = srv.log_path.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log


@pytest.mark.parametrize("name,request_bytes,status,code", CASES, ids=[c[0] for c in CASES])
def test_malformed_requests_get_spec_errors(server, name, request_bytes, status, code):
    got, headers, body = raw(server.port, request_bytes)
    assert got == status, body
    assert spec_error(got, headers, body) == code
    assert b"Traceback" not in body


def test_content_range_of_5000_digits(server):
    _, headers, _ = raw(server.port, b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    location = headers["Location"].split("://", 1)[-1].split("/", 1)[1]
    got, headers, body = raw(server.port, f"PATCH /{location} HTTP/1.1\r\nHost: x\r\nContent-Range: 0-{'9' * 5000}"
                             f"\r\nContent-Length: 1\r\n\r\nx".encode())
    assert got == 400 and spec_error(got, headers, body) == "BLOB_UPLOAD_INVALID"


def test_a_range_of_5000_digits_is_ignored(server):
    blob = b"range me"
    raw(server.port, b"POST /v2/a/blobs/uploads/?digest=" + digest_of(blob).encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 8\r\n\r\n" + blob)
    got, _, body = raw(server.port, f"GET /v2/a/blobs/{digest_of(blob)} HTTP/1.1\r\nHost: x\r\n"
                       f"Range: bytes=0-{'9' * 5000}\r\n\r\n".encode())
    assert got == 200 and body == blob  # malformed: the whole blob, as RFC 9110 allows


async def test_a_storage_error_answers_500_without_internals(aiohttp_client, data_dir, caplog):
    """A 500 says "internal error"; the path and errno text go to the log only."""
    driver = FaultyDriver(FilesystemDriver(str(data_dir)))
    client = await aiohttp_client(make_app(make_config(data_dir), Registry(driver)))
    config = b"{}"
    assert (await client.post(f"/v2/a/blobs/uploads/?digest={digest_of(config)}", data=config)).status == 201
    driver.inject("put_content", errno.EIO, "/_manifests/")
    r = await client.put("/v2/a/manifests/v1", data=image_manifest(digest_of(config), 2, []),
                         headers={"Content-Type": OCI_MANIFEST})
    body = await r.read()
    assert r.status == 500
    assert json.loads(body) == {"errors": [{"code": "UNKNOWN", "message": "internal error", "detail": None}]}
    assert str(data_dir).encode() not in body and b"docker/registry" not in body
    assert "Input/output error" in caplog.text  # but the operator sees what happened


async def test_error_details_do_not_mirror_what_was_sent(client):
    r = await client.get("/v2/" + "a" * 300 + "%0a/tags/list")
    detail = (await r.json())["errors"][0]["detail"]
    assert r.status == 400 and len(json.dumps(detail)) < 400


def test_bodiless_patches_one_after_another(server):
    """aiohttp reads every empty body from one shared object, which after its first use says
    "chunk boundary" forever: the second bodiless PATCH of a process used to spin its event
    loop, and the worker answered no one again."""
    for _ in range(3):
        _, headers, _ = raw(server.port, b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        location = headers["Location"].split("://", 1)[-1].split("/", 1)[1]
        got, _, _ = raw(server.port, f"PATCH /{location} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        assert got == 202
    assert raw(server.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
