"""The resumable hasher: exact digests, and states byte-identical to Go's (distribution's) format."""

import hashlib
import os

import pytest

from regserve import hashstate
from regserve.hashstate import Hasher

# Go 1.19: sha256/sha512.New(), Write(data[:333]), MarshalBinary(), data[i] = byte(i*7).
GO_SHA256_STATE = "73686103ac4d3c27bcc7432bee63053b1e2f3c5a09219ee1c3894ebda31fdda389a11dd0c0c7ced5dce3eaf1f8ff060d14000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000014d"
GO_SHA512_STATE = "7368610779ea420eb52a3a49de095ecacc0776588161de4af432d820b775f361aea4edfff4d4af7152c00859b9d5cd44bf611a39a22cdf926632cc80f461959dc97fce6100070e151c232a31383f464d545b626970777e858c939aa1a8afb6bdc4cbd2d9e0e7eef5fc030a11181f262d343b424950575e656c737a81888f969da4abb2b9c0c7ced5dce3eaf1f8ff060d14000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000014d"
DATA = bytes((i * 7) & 255 for i in range(1000))


def test_native_openssl_state_is_available():
    assert hashstate.NATIVE, "libcrypto's SHA*_CTX should be reachable on Linux"


@pytest.mark.parametrize("algorithm,go_state", [("sha256", GO_SHA256_STATE), ("sha512", GO_SHA512_STATE)])
def test_state_matches_go_marshal_binary(algorithm, go_state):
    h = Hasher(algorithm)
    h.update(DATA[:333])
    assert h.save().hex() == go_state


@pytest.mark.parametrize("algorithm,go_state", [("sha256", GO_SHA256_STATE), ("sha512", GO_SHA512_STATE)])
def test_resume_from_go_state(algorithm, go_state):
    h = Hasher.restore(algorithm, bytes.fromhex(go_state))
    h.update(DATA[333:])
    assert h.hexdigest() == hashlib.new(algorithm, DATA).hexdigest()


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
@pytest.mark.parametrize("split", [0, 1, 63, 64, 65, 127, 128, 129, 4097])
def test_roundtrip_at_block_boundaries(algorithm, split):
    data = os.urandom(5000)
    h = Hasher(algorithm)
    h.update(data[:split])
    r = Hasher.restore(algorithm, h.save())
    r.update(memoryview(data)[split:])
    assert r.length == len(data)
    assert r.hexdigest() == hashlib.new(algorithm, data).hexdigest()


def test_hexdigest_does_not_finalise():
    h = Hasher("sha256")
    h.update(b"abc")
    assert h.hexdigest() == h.hexdigest() == hashlib.sha256(b"abc").hexdigest()
    h.update(b"def")
    assert h.hexdigest() == hashlib.sha256(b"abcdef").hexdigest()


@pytest.mark.parametrize("bad", [b"", b"sha\x03" + b"\0" * 10, b"xxx\x03" + b"\0" * 104])
def test_restore_rejects_garbage(bad):
    with pytest.raises(ValueError):
        Hasher.restore("sha256", bad)


def test_unknown_algorithm():
    with pytest.raises(ValueError):
        Hasher("md5")
