"""The upstream registry of a pull-through cache (`proxy.remoteurl`), as a client sees it.

Authentication follows the upstream's challenge, as docker does: nothing is sent until a 401
says how. `Basic` gets the configured credentials; `Bearer` (Docker Hub, GHCR, Harbor, quay.io,
distribution with token auth) gets a token from the challenge's realm for the request's scope,
with the credentials if there are any (anonymous otherwise), kept until it expires. A blob
download the upstream redirects (to an object store's presigned URL) is followed without the
credentials: they are the upstream's, not the store's, and S3 refuses a second scheme.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator
from urllib.parse import urlencode, urljoin

import aiohttp
from yarl import URL

log = logging.getLogger("regserve.proxy")
MANIFEST_TYPES = ", ".join((
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"))
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0           # an upstream that sends nothing for this long is cut off (then resumed)
TOKEN_MARGIN = 10.0           # a token is renewed this long before it expires
DEFAULT_TOKEN_SECONDS = 60.0  # the token spec's default expires_in
MAX_REDIRECTS = 5
_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


class UpstreamUnavailable(Exception):
    """The upstream could not be reached or answered with a server error: what a cache
    answers from its own copies, where it has them."""


class UpstreamDenied(Exception):
    """The upstream refused our credentials (401/403 after answering its challenge)."""


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """The scheme and parameters of a WWW-Authenticate header (its first challenge)."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for m in _PARAM_RE.finditer(rest):
        quoted = m.group(2)
        params[m.group(1).lower()] = quoted.replace('\\"', '"') if quoted is not None else m.group(3)
    return scheme.lower(), params


class Upstream:
    def __init__(self, url: str, username: str | None = None, password: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.username, self.password = username, password
        self._session: aiohttp.ClientSession | None = None
        self._scheme: str | None = None  # what the upstream asked for: None (nothing), basic, bearer
        self._challenge: dict[str, str] = {}
        self._tokens: dict[str, tuple[str, float]] = {}  # scope: (token, expiry)
        self._fetching: dict[str, asyncio.Future[str]] = {}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
            # No decompression: a blob is opaque, its digest is of the bytes as sent.
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False,
                                                  connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # -- requests -------------------------------------------------------------------------------

    @asynccontextmanager
    async def request(self, method: str, path: str, name: str,
                      headers: dict[str, str] | None = None) -> AsyncIterator[aiohttp.ClientResponse]:
        """A request to the upstream for repository `name`, authenticated as its challenge asks,
        redirects followed. UpstreamUnavailable when it cannot be had or the upstream fails (5xx)."""
        scope = f"repository:{name}:pull"
        url = self.url + path
        for attempt in range(2):
            sent = {**(headers or {}), **await self._authorization(scope)}
            try:
                response = await self._follow(method, url, sent)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                raise UpstreamUnavailable(f"{method} {path}: {e.__class__.__name__}: {e}") from None
            if response.status == 401 and attempt == 0 and "WWW-Authenticate" in response.headers:
                challenge = response.headers["WWW-Authenticate"]
                response.release()
                self._answer(challenge, scope)
                continue
            break
        try:
            if response.status >= 500:
                raise UpstreamUnavailable(f"{method} {path}: upstream answered {response.status}")
            if response.status in (401, 403):
                raise UpstreamDenied(f"{method} {path}: upstream answered {response.status}")
            yield response
        finally:
            response.release()

    async def _follow(self, method: str, url: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
        session = self._client()
        for _ in range(MAX_REDIRECTS):
            response = await session.request(method, url, headers=headers, allow_redirects=False)
            if response.status not in (301, 302, 303, 307, 308) or "Location" not in response.headers:
                return response
            target = urljoin(url, response.headers["Location"])
            response.release()
            if URL(target).origin() != URL(url).origin():
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise UpstreamUnavailable(f"{method}: more than {MAX_REDIRECTS} redirects")

    # -- authentication -------------------------------------------------------------------------

    def _answer(self, challenge: str, scope: str) -> None:
        scheme, params = parse_challenge(challenge)
        if scheme not in ("basic", "bearer"):
            raise UpstreamDenied(f"upstream asks for {scheme!r} authentication, which is not supported")
        if scheme == "basic" and not self.username:
            raise UpstreamDenied("upstream asks for Basic credentials and proxy.username is not set")
        self._scheme, self._challenge = scheme, params
        self._tokens.pop(scope, None)  # refused: a new one

    async def _authorization(self, scope: str) -> dict[str, str]:
        if self._scheme == "basic":
            pair = f"{self.username}:{self.password or ''}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
        if self._scheme == "bearer":
            return {"Authorization": "Bearer " + await self._token(scope)}
        return {}

    async def _token(self, scope: str) -> str:
        held = self._tokens.get(scope)
        if held is not None and held[1] > time.time():
            return held[0]
        pending = self._fetching.get(scope)  # one token request per scope at a time
        if pending is not None:
            return await asyncio.shield(pending)
        future = self._fetching[scope] = asyncio.get_running_loop().create_future()
        try:
            token = await self._fetch_token(scope)
            future.set_result(token)
            return token
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: no warning when nobody else waited
            raise
        finally:
            del self._fetching[scope]

    async def _fetch_token(self, scope: str) -> str:
        realm = self._challenge.get("realm")
        if not realm:
            raise UpstreamDenied("upstream's Bearer challenge names no realm")
        query = {"scope": scope}
        if self._challenge.get("service"):
            query["service"] = self._challenge["service"]
        headers = {}
        if self.username:
            pair = f"{self.username}:{self.password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        try:
            async with self._client().get(url, headers=headers) as r:
                if r.status in (401, 403):
                    raise UpstreamDenied(f"token server refused the credentials ({r.status})")
                if r.status != 200:
                    raise UpstreamUnavailable(f"token server answered {r.status}")
                doc = await r.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
            raise UpstreamUnavailable(f"token server: {e.__class__.__name__}: {e}") from None
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise UpstreamUnavailable("token server answered no token")
        try:
            lifetime = float(doc.get("expires_in") or DEFAULT_TOKEN_SECONDS)
        except (TypeError, ValueError):
            lifetime = DEFAULT_TOKEN_SECONDS
        self._tokens[scope] = (token, time.time() + max(lifetime - TOKEN_MARGIN, 1.0))
        return token
