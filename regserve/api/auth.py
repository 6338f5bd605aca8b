"""Authentication on every route: each handler declares what it needs, the access controller
decides. Requests are checked when they start, so a token that expires during a long upload
does not break it."""

from __future__ import annotations

import time
from typing import Awaitable, Callable

from aiohttp import web

from ..auth import CATALOG, Access, AccessController, Identity
from ..auth.htpasswd import Htpasswd, provision_if_missing
from ..auth.policy import Policy
from ..auth.tokens import TokenIssuer, TokenVerifier, load_or_create_signing_key
from ..config import Config
from .common import url_for

CONTROLLER_KEY = web.AppKey("access", AccessController)
IDENTITY_KEY = web.RequestKey("identity", Identity)
ISSUER_KEY = web.AppKey("issuer", TokenIssuer)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BASE, CATALOG_ACCESS = "base", "catalog"


def requires(*actions: str) -> Callable[[Handler], Handler]:
    """Mark a handler as needing `actions` on the repository in its path."""
    def mark(handler: Handler) -> Handler:
        handler.access = actions  # type: ignore[attr-defined]
        return handler
    return mark


def needs_for(request: web.Request) -> list[Access] | None:
    access = getattr(request.match_info.handler, "access", None)
    if access is None:
        return None  # not a registry route (the token endpoint, unknown paths)
    if access == BASE:
        return []
    if access == CATALOG_ACCESS:
        return [CATALOG]
    return [Access("repository", request.match_info.get("name", ""), tuple(access))]


def identity(request: web.Request) -> Identity | None:
    return request.get(IDENTITY_KEY)


def may(request: web.Request, repository: str, action: str) -> bool:
    """For decisions inside a handler (the source repository of a cross-mount)."""
    controller = request.app.get(CONTROLLER_KEY)
    who = identity(request)
    if controller is None or who is None:
        return True
    return controller.allows(who, Access("repository", repository, (action,)))


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    controller = request.app.get(CONTROLLER_KEY)
    needs = needs_for(request)
    if controller is not None and needs is not None:
        request[IDENTITY_KEY] = await controller.authorize(request.headers.get("Authorization"), needs,
                                                         url_for(request, "/token", absolute=True),
                                                         request.remote or "")
    return await handler(request)


def build(config: Config, clock: Callable[[], float] = time.time) -> tuple[AccessController | None, TokenIssuer | None]:
    """The access controller (None when nothing is configured) and the built-in issuer, if any."""
    policy = Policy.load(config.policy_path) if config.policy_path else None
    if config.auth_mode == "none" and policy is None:
        return None, None
    if config.htpasswd_path:
        provision_if_missing(config.htpasswd_path)
    htpasswd = Htpasswd(config.htpasswd_path) if config.htpasswd_path else None
    issuer = verifier = None
    if config.auth_mode == "token":
        roots = TokenVerifier.load_bundle(config.token_rootcertbundle) if config.token_rootcertbundle else []
        keys = TokenVerifier.load_jwks(config.token_jwks) if config.token_jwks else {}
        if config.tokenserver:
            assert config.tokenserver_key and config.tokenserver_cert
            key, cert = load_or_create_signing_key(config.tokenserver_key, config.tokenserver_cert,
                                                   config.token_issuer)
            issuer = TokenIssuer(key, cert, config.token_issuer, config.tokenserver_expiration,
                                 config.tokenserver_refresh_expiration, clock)
            roots.append(cert)
        verifier = TokenVerifier(config.token_issuer, config.token_service, roots, keys,
                                 config.token_algorithms or None, clock)
    controller = AccessController(config.auth_mode, config.auth_realm, config.token_service, htpasswd,
                                  verifier, policy, clock)
    return controller, issuer
