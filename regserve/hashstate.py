"""Incremental SHA-256/SHA-512 whose state can be saved and restored.

hashlib cannot export its state, so a resumed upload would have to re-read every byte already
received. OpenSSL's SHA256_CTX/SHA512_CTX are plain structs: we drive them through ctypes from the
libcrypto that Python's _hashlib already links (same assembly, so hashlib speed; ctypes releases the
GIL during the call). Saved states use Go's crypto/sha256 and crypto/sha512 MarshalBinary format,
which is what distribution writes under _uploads/<id>/hashstates/, so in-flight uploads move between
the two registries. Where libcrypto is unavailable we fall back to hashlib and callers re-hash.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import re
import struct
from dataclasses import dataclass
from typing import Callable

_GO_MAGIC = {"sha256": b"sha\x03", "sha512": b"sha\x07"}


@dataclass(frozen=True)
class _Algo:
    name: str
    ctx_size: int       # sizeof(SHAxxx_CTX)
    word: str           # struct code of one state word
    block: int          # block size in bytes
    digest_size: int
    counter_offset: int  # offset of Nl, Nh
    data_offset: int     # offset of the block buffer
    num_offset: int      # offset of `num` (bytes buffered)


_ALGOS = {
    # SHA_LONG h[8]; SHA_LONG Nl, Nh; SHA_LONG data[16]; unsigned int num, md_len;
    "sha256": _Algo("sha256", 112, "I", 64, 32, 32, 40, 104),
    # SHA_LONG64 h[8]; SHA_LONG64 Nl, Nh; union {d[16]; p[128]} u; unsigned int num, md_len;
    "sha512": _Algo("sha512", 216, "Q", 128, 64, 64, 80, 208),
}


def _load_libcrypto() -> ctypes.CDLL | None:
    import _hashlib  # noqa: F401  (makes sure the libcrypto Python uses is mapped)

    candidates: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            candidates += sorted(set(re.findall(r"\S*/libcrypto\.so[\d.]*", maps.read())))
    except OSError:
        pass
    found = ctypes.util.find_library("crypto")
    if found:
        candidates.append(found)
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            for name in ("SHA256", "SHA512"):
                for suffix, args in (("_Init", [ctypes.c_void_p]),
                                     ("_Update", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]),
                                     ("_Final", [ctypes.c_char_p, ctypes.c_void_p])):
                    fn = getattr(lib, name + suffix)
                    fn.argtypes = args
                    fn.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError):
            continue
    return None


_lib = _load_libcrypto()


def _funcs(algo: str) -> tuple[Callable, Callable, Callable]:
    prefix = algo.upper()
    return (getattr(_lib, prefix + "_Init"), getattr(_lib, prefix + "_Update"),
            getattr(_lib, prefix + "_Final"))


class Hasher:
    """An incremental digest for one algorithm, resumable through `save()`/`restore()`."""

    def __init__(self, algorithm: str) -> None:
        if algorithm not in _ALGOS:
            raise ValueError(f"unsupported digest algorithm {algorithm!r}")
        self.algorithm = algorithm
        self._algo = _ALGOS[algorithm]
        self.length = 0
        if NATIVE:
            self._ctx = ctypes.create_string_buffer(self._algo.ctx_size)
            self._init, self._update, self._final = _funcs(algorithm)
            self._init(self._ctx)
            self._py = None
        else:
            self._py = hashlib.new(algorithm)

    @property
    def resumable(self) -> bool:
        return self._py is None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if not n:
            return
        self.length += n
        if self._py is not None:
            self._py.update(data)
        elif isinstance(data, bytes):
            self._update(self._ctx, data, n)
        else:  # ctypes takes the address of a writable buffer only: copy a read-only one
            view = memoryview(data)
            if view.readonly:
                view = memoryview(bytearray(view))
            # The address of its first byte: an array type of length n per call cost 12 us.
            first = ctypes.c_char.from_buffer(view)  # held (the buffer exported) through the call
            self._update(self._ctx, ctypes.addressof(first), n)

    def hexdigest(self) -> str:
        if self._py is not None:
            return self._py.hexdigest()
        ctx = ctypes.create_string_buffer(self._ctx.raw, self._algo.ctx_size)  # Final destroys
        out = ctypes.create_string_buffer(self._algo.digest_size)
        self._final(out, ctx)
        return out.raw.hex()

    def digest(self) -> str:
        return f"{self.algorithm}:{self.hexdigest()}"

    def save(self) -> bytes:
        """The state in Go's MarshalBinary layout (what distribution stores)."""
        if self._py is not None:
            raise RuntimeError("hash state is not exportable without libcrypto")
        a, raw = self._algo, self._ctx.raw
        h = struct.unpack_from(f"=8{a.word}", raw, 0)
        num = struct.unpack_from("=I", raw, a.num_offset)[0]
        block = raw[a.data_offset:a.data_offset + num].ljust(a.block, b"\0")
        return _GO_MAGIC[a.name] + struct.pack(f">8{a.word}", *h) + block + struct.pack(">Q", self.length)

    @classmethod
    def restore(cls, algorithm: str, state: bytes) -> "Hasher":
        hasher = cls(algorithm)
        a = hasher._algo
        size = 4 + 8 * struct.calcsize(a.word) + a.block + 8
        if not hasher.resumable or len(state) != size or not state.startswith(_GO_MAGIC[algorithm]):
            raise ValueError("invalid hash state")
        wsize = struct.calcsize(a.word)
        h = struct.unpack_from(f">8{a.word}", state, 4)
        block = state[4 + 8 * wsize:4 + 8 * wsize + a.block]
        (length,) = struct.unpack_from(">Q", state, size - 8)
        num = length % a.block
        bits = length * 8
        raw = bytearray(a.ctx_size)
        struct.pack_into(f"=8{a.word}", raw, 0, *h)
        mask = (1 << (8 * wsize)) - 1
        struct.pack_into(f"=2{a.word}", raw, a.counter_offset, bits & mask, bits >> (8 * wsize))
        raw[a.data_offset:a.data_offset + a.block] = block
        struct.pack_into("=2I", raw, a.num_offset, num, a.digest_size)
        ctypes.memmove(hasher._ctx, bytes(raw), a.ctx_size)
        hasher.length = length
        return hasher


def _self_test() -> bool:
    """Check the struct layouts against hashlib before trusting them."""
    try:
        for algo in _ALGOS:
            data = bytes(range(256)) * 5 + b"x" * 77
            h = Hasher(algo)
            h.update(data[:333])
            h = Hasher.restore(algo, h.save())
            h.update(bytearray(data[333:]))
            if h.hexdigest() != hashlib.new(algo, data).hexdigest():
                return False
        return True
    except Exception:
        return False


NATIVE = _lib is not None
if NATIVE and not _self_test():
    NATIVE = False
