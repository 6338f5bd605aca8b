"""Blob uploads: monolithic, POST+PUT, chunked, streamed, status, cancel, mount, digest checks."""

import asyncio
import logging
import os

import pytest

from .conftest import digest_of

BLOB = os.urandom(200_000)
DIGEST = digest_of(BLOB)


async def start(client, name="foo/bar"):
    r = await client.post(f"/v2/{name}/blobs/uploads/")
    assert r.status == 202, await r.text()
    return r


def err_code(body):
    return body["errors"][0]["code"]


async def test_monolithic_post(client):
    r = await client.post(f"/v2/foo/blobs/uploads/?digest={DIGEST}", data=BLOB,
                          headers={"Content-Type": "application/octet-stream"})
    assert r.status == 201
    assert r.headers["Location"] == f"/v2/foo/blobs/{DIGEST}"
    assert r.headers["Docker-Content-Digest"] == DIGEST
    r = await client.get(f"/v2/foo/blobs/{DIGEST}")
    assert r.status == 200 and await r.read() == BLOB


async def test_monolithic_post_sha512(client):
    d = digest_of(BLOB, "sha512")
    r = await client.post(f"/v2/foo/blobs/uploads/?digest={d}", data=BLOB)
    assert r.status == 201
    r = await client.get(f"/v2/foo/blobs/{d}")
    assert r.status == 200 and await r.read() == BLOB


async def test_monolithic_post_wrong_digest_commits_nothing(client, data_dir):
    wrong = digest_of(b"something else")
    r = await client.post(f"/v2/foo/blobs/uploads/?digest={wrong}", data=BLOB)
    assert r.status == 400
    assert err_code(await r.json()) == "DIGEST_INVALID"
    assert (await client.head(f"/v2/foo/blobs/{wrong}")).status == 404
    assert (await client.head(f"/v2/foo/blobs/{DIGEST}")).status == 404
    uploads = data_dir / "docker/registry/v2/repositories/foo/_uploads"
    assert not uploads.exists() or not list(uploads.iterdir())
    blobs = data_dir / "docker/registry/v2/blobs"
    leftovers = [p for p in blobs.rglob("*") if p.is_file()] if blobs.exists() else []
    assert leftovers == []  # no temp file, no blob under the claimed digest
    assert not (blobs / "sha256" / wrong.split(":")[1][:2] / wrong.split(":")[1]).exists()


async def test_post_then_put_with_body(client):
    r = await start(client)
    assert r.headers["Range"] == "0-0"
    assert r.headers["Docker-Upload-UUID"]
    assert int(r.headers["OCI-Chunk-Min-Length"]) > 0
    loc = r.headers["Location"]
    r = await client.put(f"{loc}?digest={DIGEST}", data=BLOB)
    assert r.status == 201
    assert r.headers["Docker-Content-Digest"] == DIGEST
    assert (await client.head(f"/v2/foo/bar/blobs/{DIGEST}")).status == 200


async def test_chunked_upload_with_content_range(client):
    loc = (await start(client)).headers["Location"]
    r = await client.patch(loc, data=BLOB[:1000], headers={"Content-Range": "0-999"})
    assert r.status == 202
    assert r.headers["Range"] == "0-999"
    loc = r.headers["Location"]
    # oras sends the range without a unit; others use "bytes=".
    r = await client.patch(loc, data=BLOB[1000:5000], headers={"Content-Range": "bytes=1000-4999"})
    assert r.status == 202 and r.headers["Range"] == "0-4999"
    r = await client.put(f"{loc}?digest={DIGEST}", data=BLOB[5000:],
                         headers={"Content-Range": f"5000-{len(BLOB) - 1}"})
    assert r.status == 201
    r = await client.get(f"/v2/foo/bar/blobs/{DIGEST}")
    assert await r.read() == BLOB


async def test_out_of_order_chunk_is_416_with_current_range(client):
    loc = (await start(client)).headers["Location"]
    r = await client.patch(loc, data=BLOB[10:20], headers={"Content-Range": "10-19"})
    assert r.status == 416
    assert r.headers["Range"] == "0-0"
    assert err_code(await r.json()) == "BLOB_UPLOAD_INVALID"
    r = await client.patch(loc, data=BLOB[:10], headers={"Content-Range": "0-9"})
    assert r.status == 202
    r = await client.patch(loc, data=BLOB[:10], headers={"Content-Range": "0-9"})  # repeated
    assert r.status == 416 and r.headers["Range"] == "0-9"


async def test_content_length_must_match_content_range(client):
    loc = (await start(client)).headers["Location"]
    r = await client.patch(loc, data=BLOB[:10], headers={"Content-Range": "0-19"})
    assert r.status == 416


async def test_malformed_content_range(client):
    loc = (await start(client)).headers["Location"]
    r = await client.patch(loc, data=b"abc", headers={"Content-Range": "zero-to-two"})
    assert r.status == 400
    assert err_code(await r.json()) == "BLOB_UPLOAD_INVALID"


async def test_streamed_patch_without_content_range(client):
    loc = (await start(client)).headers["Location"]

    async def gen():
        for i in range(0, len(BLOB), 7000):
            yield BLOB[i:i + 7000]

    r = await client.patch(loc, data=gen())  # chunked transfer encoding, like docker
    assert r.status == 202
    assert r.headers["Range"] == f"0-{len(BLOB) - 1}"
    r = await client.put(f"{r.headers['Location']}?digest={DIGEST}")
    assert r.status == 201


@pytest.mark.parametrize("takes_pieces", [True, False], ids=["pieces", "readany"])
async def test_large_streamed_patch_through_the_pipeline(client, monkeypatch, takes_pieces):
    """Frames of odd sizes, enough of them for the hashing and writing threads: the pieces are
    taken from aiohttp's buffer as they are, or (with an aiohttp lacking that buffer) joined by
    readany(). Either way the blob is every byte, and the digest checks."""
    from regserve.api import common
    monkeypatch.setattr(common, "_TAKES_PIECES", takes_pieces)
    data = os.urandom(6 << 20)
    loc = (await start(client)).headers["Location"]

    async def gen():
        for i in range(0, len(data), 32771):
            yield data[i:i + 32771]

    r = await client.patch(loc, data=gen())
    assert r.status == 202
    assert r.headers["Range"] == f"0-{len(data) - 1}"
    r = await client.put(f"{r.headers['Location']}?digest={digest_of(data)}")
    assert r.status == 201
    r = await client.get(f"/v2/foo/bar/blobs/{digest_of(data)}")
    assert await r.read() == data


async def test_put_with_sha512_digest_after_chunks(client):
    loc = (await start(client)).headers["Location"]
    await client.patch(loc, data=BLOB)
    d = digest_of(BLOB, "sha512")
    r = await client.put(f"{loc}?digest={d}")
    assert r.status == 201
    assert (await client.head(f"/v2/foo/bar/blobs/{d}")).status == 200


async def test_status_of_upload(client):
    r = await start(client)
    loc, uuid = r.headers["Location"], r.headers["Docker-Upload-UUID"]
    await client.patch(loc, data=BLOB[:1234])
    r = await client.get(loc)
    assert r.status == 204
    assert r.headers["Range"] == "0-1233"
    assert r.headers["Docker-Upload-UUID"] == uuid
    assert r.headers["Location"].endswith(uuid)


async def test_cancel_upload(client):
    loc = (await start(client)).headers["Location"]
    r = await client.delete(loc)
    assert r.status == 204
    r = await client.get(loc)
    assert r.status == 404
    assert err_code(await r.json()) == "BLOB_UPLOAD_UNKNOWN"
    assert (await client.delete(loc)).status == 404


@pytest.mark.parametrize("upload_id", ["nonexistent", "a..b", "-leading", "x" * 200])
async def test_unknown_upload(client, upload_id):
    r = await client.patch(f"/v2/foo/blobs/uploads/{upload_id}", data=b"x")
    assert r.status in (404,)
    assert err_code(await r.json()) == "BLOB_UPLOAD_UNKNOWN"


async def test_put_wrong_digest_is_invalid_and_cancels(client):
    loc = (await start(client)).headers["Location"]
    await client.patch(loc, data=BLOB)
    r = await client.put(f"{loc}?digest={digest_of(b'nope')}")
    assert r.status == 400
    assert err_code(await r.json()) == "DIGEST_INVALID"
    assert (await client.get(loc)).status == 404


async def test_put_without_digest(client):
    loc = (await start(client)).headers["Location"]
    r = await client.put(loc, data=BLOB)
    assert r.status == 400
    assert err_code(await r.json()) == "DIGEST_INVALID"


@pytest.mark.parametrize("bad", ["sha256:xyz", "sha256", "notadigest", "sha256:" + "A" * 64])
async def test_malformed_digest(client, bad):
    r = await client.post(f"/v2/foo/blobs/uploads/?digest={bad}", data=b"x")
    assert r.status == 400
    assert err_code(await r.json()) == "DIGEST_INVALID"


async def test_unsupported_digest_algorithm(client):
    """An algorithm this registry does not verify: the upload is refused as an invalid digest
    (400), and nothing can exist under such a digest (404)."""
    md5 = "md5:" + "0" * 32
    r = await client.post(f"/v2/foo/blobs/uploads/?digest={md5}", data=b"x")
    assert r.status == 400 and err_code(await r.json()) == "DIGEST_INVALID"
    for method in ("GET", "HEAD", "DELETE"):
        r = await client.request(method, f"/v2/foo/blobs/{md5}")
        assert r.status == 404
        if method != "HEAD":
            assert err_code(await r.json()) == "BLOB_UNKNOWN"
    for method in ("GET", "DELETE"):
        r = await client.request(method, f"/v2/foo/manifests/{md5}")
        assert r.status == 404 and err_code(await r.json()) == "MANIFEST_UNKNOWN"
    r = await client.get(f"/v2/foo/referrers/{md5}")
    assert r.status == 400 and err_code(await r.json()) == "DIGEST_INVALID"


@pytest.mark.parametrize("name", ["UPPER", "a//b", "-a", "a-", "a/.b", "a__-b", "x" * 256])
async def test_invalid_names(client, name):
    r = await client.post(f"/v2/{name}/blobs/uploads/")
    assert r.status in (400, 404)
    if r.status == 400:
        assert err_code(await r.json()) == "NAME_INVALID"


async def test_cross_repository_mount(client):
    await client.post(f"/v2/src/blobs/uploads/?digest={DIGEST}", data=BLOB)
    r = await client.post(f"/v2/dst/blobs/uploads/?mount={DIGEST}&from=src")
    assert r.status == 201
    assert r.headers["Location"] == f"/v2/dst/blobs/{DIGEST}"
    assert r.headers["Docker-Content-Digest"] == DIGEST
    assert (await client.get(f"/v2/dst/blobs/{DIGEST}")).status == 200


async def test_mount_of_missing_blob_starts_an_upload(client):
    r = await client.post(f"/v2/dst/blobs/uploads/?mount={DIGEST}&from=src")
    assert r.status == 202
    assert "/v2/dst/blobs/uploads/" in r.headers["Location"]


async def test_mount_without_from_starts_an_upload(client):
    await client.post(f"/v2/src/blobs/uploads/?digest={DIGEST}", data=BLOB)
    r = await client.post(f"/v2/dst/blobs/uploads/?mount={DIGEST}")
    assert r.status == 202


async def test_mount_from_repo_without_blob_does_not_leak(client):
    """A blob stored for one repository is not mountable from a repository that lacks it."""
    await client.post(f"/v2/src/blobs/uploads/?digest={DIGEST}", data=BLOB)
    r = await client.post(f"/v2/dst/blobs/uploads/?mount={DIGEST}&from=other")
    assert r.status == 202
    assert (await client.head(f"/v2/dst/blobs/{DIGEST}")).status == 404


async def test_blob_visible_only_where_pushed(client):
    await client.post(f"/v2/a/blobs/uploads/?digest={DIGEST}", data=BLOB)
    assert (await client.head(f"/v2/a/blobs/{DIGEST}")).status == 200
    r = await client.get(f"/v2/b/blobs/{DIGEST}")
    assert r.status == 404
    assert err_code(await r.json()) == "BLOB_UNKNOWN"


async def test_empty_blob(client):
    d = digest_of(b"")
    r = await client.post(f"/v2/foo/blobs/uploads/?digest={d}", data=b"")
    assert r.status == 201
    r = await client.get(f"/v2/foo/blobs/{d}")
    assert r.status == 200 and await r.read() == b""


async def test_concurrent_pushes_of_one_blob(client):
    import asyncio

    async def push():
        loc = (await start(client, "race")).headers["Location"]
        r = await client.patch(loc, data=BLOB)
        r = await client.put(f"{r.headers['Location']}?digest={DIGEST}")
        return r.status

    assert await asyncio.gather(*[push() for _ in range(8)]) == [201] * 8
    r = await client.get(f"/v2/race/blobs/{DIGEST}")
    assert await r.read() == BLOB


async def test_readonly_mode_refuses_writes(aiohttp_client, app_factory):
    c = await aiohttp_client(app_factory(REGISTRY_STORAGE_MAINTENANCE_READONLY_ENABLED="true"))
    r = await c.post("/v2/foo/blobs/uploads/")
    assert r.status == 405
    assert err_code(await r.json()) == "UNSUPPORTED"


async def test_repush_after_blob_removed_by_another_process(client, data_dir):
    """The size cache must not make a commit skip writing a blob that was removed behind our back
    (garbage-collect, another replica)."""
    import shutil
    await client.post(f"/v2/foo/blobs/uploads/?digest={DIGEST}", data=BLOB)
    assert (await client.head(f"/v2/foo/blobs/{DIGEST}")).status == 200  # now cached
    hexd = DIGEST.split(":")[1]
    shutil.rmtree(data_dir / f"docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}")
    r = await client.post(f"/v2/foo/blobs/uploads/?digest={DIGEST}", data=BLOB)
    assert r.status == 201
    r = await client.get(f"/v2/foo/blobs/{DIGEST}")
    assert r.status == 200 and await r.read() == BLOB


async def test_content_encoding_is_not_decoded(client):
    """A blob is opaque: gzip bytes sent with Content-Encoding: gzip are stored as sent, as
    distribution stores them (their digest is of those bytes)."""
    import gzip
    data = gzip.compress(os.urandom(300_000))
    d = digest_of(data)
    r = await client.post(f"/v2/enc/blobs/uploads/?digest={d}", data=data,
                          headers={"Content-Encoding": "gzip"})
    assert r.status == 201, await r.text()
    r = await start(client, "enc")
    r = await client.patch(r.headers["Location"], data=data, headers={"Content-Encoding": "gzip"})
    assert r.status == 202
    r = await client.put(f"{r.headers['Location']}?digest={d}")
    assert r.status == 201
    r = await client.get(f"/v2/enc/blobs/{d}")
    assert r.status == 200 and await r.read() == data


async def test_a_patch_cut_off_midway_is_one_log_line(client, caplog):
    """A client that drops a PATCH midway is routine for resumable uploads: the bytes that
    arrived are kept, and the log says so in one INFO line, not an ERROR with a traceback."""
    caplog.set_level(logging.INFO)
    location = (await start(client)).headers["Location"]
    data = os.urandom(3 << 20)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                 f"Content-Length: {2 * len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    for _ in range(200):  # until most of it is written (the last batch waits for more)
        r = await client.get(location)
        if int(r.headers["Range"].split("-")[1]) >= 2 << 20:
            break
        await asyncio.sleep(0.05)
    writer.transport.abort()
    for _ in range(200):  # until the server has settled the request
        if any("client disconnected" in rec.getMessage() for rec in caplog.records):
            break
        await asyncio.sleep(0.05)
    r = await client.get(location)
    assert r.status == 204 and r.headers["Range"] == f"0-{len(data) - 1}"
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert not errors, [rec.getMessage() for rec in errors]
    assert [rec.levelno for rec in caplog.records if "client disconnected during PATCH" in rec.getMessage()] \
        == [logging.INFO]
    r = await client.put(f"{location}&digest={digest_of(data)}" if "?" in location
                         else f"{location}?digest={digest_of(data)}")
    assert r.status == 201


async def test_a_long_patch_saves_hash_states_midway_only_where_a_crash_keeps_the_bytes(
        client, monkeypatch, storage_kind):
    """On the filesystem and in memory, a long PATCH saves its hash state every CHECKPOINT_BYTES
    (a resume after a crash hashes only what came after); on S3, whose parts are found only once
    the writer closes, such a state would lie past the data a crash leaves: only the end's."""
    from regserve.registry import uploads
    monkeypatch.setattr(uploads, "CHECKPOINT_BYTES", 1 << 20)
    saved: list[int] = []
    save = uploads.UploadSession._save_states

    async def recording(self, hashers, states):
        saved.append(hashers[0].length)
        await save(self, hashers, states)

    monkeypatch.setattr(uploads.UploadSession, "_save_states", recording)
    blob = os.urandom(12 << 20)
    r = await client.post("/v2/big/blobs/uploads/")
    loc = r.headers["Location"]
    r = await client.patch(loc, data=blob)
    assert r.status == 202
    assert saved[-1] == len(blob)
    if storage_kind == "s3":
        assert saved == [len(blob)]
    else:
        assert len(saved) >= 4 and saved == sorted(saved)
    r = await client.put(f"{loc}?digest={digest_of(blob)}")
    assert r.status == 201
