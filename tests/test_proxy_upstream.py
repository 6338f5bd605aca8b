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


@pytest.mark.parametrize("link,expected", [
    ('</v2/a/b/tags/list?last=x&n=100>; rel="next"', "/v2/a/b/tags/list?last=x&n=100"),
    ("</v2/a/b/tags/list?n=2&last=v9>;rel=next", "/v2/a/b/tags/list?n=2&last=v9"),
    ('<https://elsewhere.example/v2/a/b/tags/list?last=x>; rel="next"', None),  # credentials stay home
    ('</v2/other/tags/list?last=x>; rel="next"', None),
    ('</v2/a/b/tags/list?last=x>; rel="prev"', None),
    (None, None),
])
def test_tags_pages_followed_only_on_the_upstream(link, expected):
    from regserve.proxy.cache import _next_page
    assert _next_page(link, "a/b") == expected
