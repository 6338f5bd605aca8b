"""Access requests and grants in the Docker token spec's terms: `repository:<name>:pull,push`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Access:
    type: str            # "repository" or "registry"
    name: str            # repository name, or "catalog"
    actions: tuple[str, ...]

    def scope(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"

    def claim(self) -> dict:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


CATALOG = Access("registry", "catalog", ("*",))


def parse_scope(scope: str) -> Access | None:
    """`repository:team/app:pull,push` (names may hold ':' for ports in some clients: the last
    colon separates the actions)."""
    kind, _, rest = scope.partition(":")
    name, sep, actions = rest.rpartition(":")
    if not kind or not sep or not name:
        return None
    return Access(kind, name, tuple(a for a in actions.split(",") if a))


def parse_scopes(values: list[str]) -> list[Access]:
    """Scopes from repeated `scope` parameters, each possibly space-separated (OAuth2 style)."""
    out = []
    for value in values:
        for part in value.split():
            access = parse_scope(part)
            if access is not None:
                out.append(access)
    return out


def granted(grants: list[Access], need: Access) -> bool:
    """Whether `grants` cover every action of `need`."""
    have: set[str] = set()
    for g in grants:
        if g.type == need.type and g.name == need.name:
            have.update(g.actions)
    return "*" in have or all(a in have for a in need.actions)
