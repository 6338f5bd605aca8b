"""Who may do what: authentication (none, htpasswd, or tokens) and authorisation (token claims
and/or the policy file), decided the same way in every mode. Knows nothing of HTTP beyond the
Authorization header's value and the challenge it answers with."""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import Denied, Unauthorized
from .htpasswd import Htpasswd
from .policy import Policy
from .scopes import CATALOG, Access, granted
from .tokens import TokenError, TokenVerifier

ALL_ACTIONS = ("pull", "push", "delete")


@dataclass
class Identity:
    user: str | None                      # None: anonymous
    grants: list[Access] | None = None    # token claims (token mode only)
    groups: set[str] = field(default_factory=set)


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header or not header[:6].lower() == "basic ":
        return None
    try:
        user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


class AccessController:
    def __init__(self, mode: str = "none", realm: str | None = None, service: str = "",
                 htpasswd: Htpasswd | None = None, verifier: TokenVerifier | None = None,
                 policy: Policy | None = None, clock: Callable[[], float] = time.time) -> None:
        self.mode, self.realm, self.service = mode, realm, service
        self.htpasswd, self.verifier, self.policy, self.clock = htpasswd, verifier, policy, clock

    # -- decisions ---------------------------------------------------------------------------

    def allowed_actions(self, user: str | None, repository: str) -> set[str]:
        """What the policy (or, without one, the default) lets this user do in a repository."""
        if self.policy is not None:
            return self.policy.actions(user, repository)
        return set(ALL_ACTIONS) if (user is not None or self.mode == "none") else set()

    def may_list_catalog(self, user: str | None) -> bool:
        if self.policy is not None:
            return self.policy.may_list_catalog(user)
        return user is not None or self.mode == "none"

    def allows(self, identity: Identity, need: Access) -> bool:
        if identity.grants is not None:  # a token: its claims decide, narrowed by a policy if any
            if not granted(identity.grants, need):
                return False
            if self.policy is None:
                return True
        if need == CATALOG or (need.type == "registry" and need.name == "catalog"):
            return self.may_list_catalog(identity.user)
        if need.type != "repository":
            return False
        return set(need.actions) <= self.allowed_actions(identity.user, need.name)

    def grantable(self, user: str | None, requested: list[Access]) -> list[Access]:
        """What a token for `user` may carry of what was asked for (the built-in issuer)."""
        merged: dict[tuple[str, str], set[str]] = {}
        for req in requested:  # "repository:x:pull repository:x:push" is one request for x
            merged.setdefault((req.type, req.name), set()).update(req.actions)
        out = []
        for req in (Access(t, n, tuple(sorted(a))) for (t, n), a in merged.items()):
            if req.type == "registry" and req.name == "catalog":
                if self.may_list_catalog(user):
                    out.append(CATALOG)
                continue
            if req.type != "repository":
                continue
            allowed = self.allowed_actions(user, req.name)
            wanted = set(ALL_ACTIONS) if "*" in req.actions else set(req.actions)
            actions = tuple(a for a in ALL_ACTIONS if a in wanted & allowed)
            if actions:
                out.append(Access("repository", req.name, actions))
        return out

    # -- authentication ----------------------------------------------------------------------

    def _basic_challenge(self) -> str:
        return f'Basic realm="{self.realm or "regserve"}"'

    def bearer_challenge(self, realm: str, needs: list[Access], error: str | None = None) -> str:
        parts = [f'realm="{realm}"', f'service="{self.service}"']
        if needs:
            parts.append(f'scope="{" ".join(n.scope() for n in needs)}"')
        if error:
            parts.append(f'error="{error}"')
        return "Bearer " + ",".join(parts)

    async def login(self, header: str | None, client: str = "") -> str | None:
        """The htpasswd user named by Basic credentials; None without credentials;
        UNAUTHORIZED for wrong ones. `client` (the peer's address) is whom bcrypt's queue is
        fair to."""
        creds = basic_credentials(header)
        if header and creds is None:
            raise Unauthorized(None, "malformed credentials", challenge=self._basic_challenge())
        if creds is None:
            return None
        if self.htpasswd is None or not await self.htpasswd.verify(*creds, client=client):
            raise Unauthorized(None, "invalid username or password", challenge=self._basic_challenge())
        return creds[0]

    async def authorize(self, header: str | None, needs: list[Access], default_realm: str = "",
                        client: str = "") -> Identity:
        """The identity behind a request that needs `needs` (empty: just authentication, the
        `/v2/` check). Raises UNAUTHORIZED with a challenge, or DENIED."""
        if self.mode == "token":
            return self._authorize_token(header, needs, self.realm or default_realm)
        if self.mode == "htpasswd":
            user = await self.login(header, client)
            identity = Identity(user, groups=self.policy.groups_of(user) if self.policy else set())
            if user is None and (not needs or not all(self.allows(identity, n) for n in needs)):
                raise Unauthorized(None, "authentication required", challenge=self._basic_challenge())
        else:
            identity = Identity(None)
        for need in needs:
            if not self.allows(identity, need):
                raise Denied({"scope": need.scope()})
        return identity

    def _authorize_token(self, header: str | None, needs: list[Access], realm: str) -> Identity:
        if not header or header[:7].lower() != "bearer ":
            raise Unauthorized(None, "authentication required", challenge=self.bearer_challenge(realm, needs))
        assert self.verifier is not None
        try:
            claims = self.verifier.verify(header[7:].strip())
        except TokenError as e:
            raise Unauthorized(None, str(e), challenge=self.bearer_challenge(realm, needs, "invalid_token")) from None
        user = claims.subject or None
        identity = Identity(user, claims.access, self.policy.groups_of(user) if self.policy else set())
        for need in needs:
            if not self.allows(identity, need):
                raise Unauthorized({"scope": need.scope()}, "insufficient scope",
                                   challenge=self.bearer_challenge(realm, needs, "insufficient_scope"))
        return identity
