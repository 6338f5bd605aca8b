"""The spec's grammars for repository names, tags and digests."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import DigestInvalid, NameInvalid, TagInvalid

COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"  # of a repository name
NAME_RE = re.compile(rf"{COMPONENT}(?:/{COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
NAME_MAX = 255

# Algorithms we store and verify, with the exact form of their encoded part.
ALGORITHMS = {"sha256": re.compile(r"[a-f0-9]{64}"), "sha512": re.compile(r"[a-f0-9]{128}")}


@dataclass(frozen=True, order=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


class UnknownAlgorithm(DigestInvalid):
    """A digest of the spec's grammar, of an algorithm this registry does not store: nothing can
    exist under it (GET, HEAD and DELETE answer 404), and nothing can be verified with it (400)."""


def parse_digest(value: str) -> Digest:
    """A digest of a supported algorithm; DIGEST_INVALID otherwise."""
    m = DIGEST_RE.fullmatch(value or "")
    if not m:
        raise DigestInvalid({"digest": value[:200] if isinstance(value, str) else None}, "invalid digest")
    algorithm, encoded = m.groups()
    pattern = ALGORITHMS.get(algorithm)
    if pattern is None:
        raise UnknownAlgorithm({"digest": value[:200]}, f"unsupported digest algorithm {algorithm[:40]!r}")
    if not pattern.fullmatch(encoded):
        raise DigestInvalid({"digest": value[:200]}, "invalid digest")
    return Digest(algorithm, encoded)


def is_digest(reference: str) -> bool:
    return ":" in reference


def check_name(name: str) -> str:
    if len(name) > NAME_MAX or not NAME_RE.fullmatch(name):
        raise NameInvalid({"name": name})
    return name


def check_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise TagInvalid({"tag": tag}, "invalid tag")
    return tag
