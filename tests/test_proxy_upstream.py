"""The upstream client's reading of WWW-Authenticate challenges (the flows themselves are tested
against distribution 2.8.2 in test_proxy.py)."""

from __future__ import annotations

import pytest

from regserve.proxy.upstream import parse_challenge


@pytest.mark.parametrize("header,expected", [
    ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
     'scope="repository:library/alpine:pull"',
     ("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                 "scope": "repository:library/alpine:pull"})),
    ('Bearer realm="https://ghcr.io/token", service="ghcr.io", scope="repository:a/b:pull,push"',
     ("bearer", {"realm": "https://ghcr.io/token", "service": "ghcr.io", "scope": "repository:a/b:pull,push"})),
    ('Basic realm="Registry Realm"', ("basic", {"realm": "Registry Realm"})),
    ("Basic realm=registry", ("basic", {"realm": "registry"})),
    ('BEARER Realm="a \\"quoted\\" realm"', ("bearer", {"realm": 'a "quoted" realm'})),
    ("Negotiate", ("negotiate", {})),
])
def test_challenges(header, expected):
    assert parse_challenge(header) == expected
