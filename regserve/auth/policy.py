"""Per-repository access control from a YAML policy file.

    groups:
      admins: [alice]
      ci: [buildbot]
    rules:
      - repositories: ["**"]            # every repository
        groups: [admins]
        actions: [pull, push, delete]
      - repositories: ["team-a/*"]      # '*' one path component, '**' any depth
        users: [bob]
        groups: [ci]
        actions: [pull, push]
      - repositories: ["public/**"]
        users: ["*"]                    # every authenticated user
        anonymous: true                 # and requests without credentials
        actions: [pull]
    catalog: [admins]                   # users or groups that may list /v2/_catalog ("*": all)

A request may do what the union of the rules matching it grants. Without a policy file,
authenticated users may do everything and anonymous requests nothing (distribution's behaviour).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..config import ConfigError, read_yaml

ACTIONS = {"pull", "push", "delete", "*"}


class PolicyError(Exception):
    pass


def _pattern(glob: str) -> re.Pattern:
    out = ""
    i = 0
    while i < len(glob):
        if glob.startswith("**", i):
            out += ".*"
            i += 2
        elif glob[i] == "*":
            out += "[^/]*"
            i += 1
        else:
            out += re.escape(glob[i])
            i += 1
    return re.compile(out)


@dataclass
class Rule:
    patterns: list[re.Pattern]
    users: set[str]
    groups: set[str]
    anonymous: bool
    actions: set[str]

    def applies(self, user: str | None, groups: set[str]) -> bool:
        if user is None:
            return self.anonymous
        return "*" in self.users or user in self.users or bool(self.groups & groups)

    def matches(self, repository: str) -> bool:
        return any(p.fullmatch(repository) for p in self.patterns)


@dataclass
class Policy:
    rules: list[Rule] = field(default_factory=list)
    memberships: dict[str, set[str]] = field(default_factory=dict)  # user -> groups
    catalog: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, path: str) -> "Policy":
        try:
            doc = read_yaml(path, "access policy")
        except ConfigError as e:
            raise PolicyError(str(e)) from None
        return cls.parse(doc, path)

    @classmethod
    def parse(cls, doc: dict, source: str = "policy") -> "Policy":
        if not isinstance(doc, dict):
            raise PolicyError(f"{source}: expected a mapping")
        unknown = set(doc) - {"groups", "rules", "catalog"}
        if unknown:
            raise PolicyError(f"{source}: unknown key {sorted(unknown)[0]!r}")
        memberships: dict[str, set[str]] = {}
        for group, members in (doc.get("groups") or {}).items():
            if not isinstance(members, list):
                raise PolicyError(f"{source}: groups.{group} must be a list of users")
            for user in members:
                memberships.setdefault(str(user), set()).add(str(group))
        rules = []
        for i, raw in enumerate(doc.get("rules") or []):
            where = f"{source}: rules[{i}]"
            if not isinstance(raw, dict):
                raise PolicyError(f"{where} must be a mapping")
            unknown = set(raw) - {"repositories", "users", "groups", "anonymous", "actions"}
            if unknown:
                raise PolicyError(f"{where}: unknown key {sorted(unknown)[0]!r}")
            repos = raw.get("repositories") or []
            actions = set(raw.get("actions") or [])
            if not repos or not isinstance(repos, list):
                raise PolicyError(f"{where}: repositories must be a non-empty list")
            if not actions or not actions <= ACTIONS:
                raise PolicyError(f"{where}: actions must be some of pull, push, delete")
            rules.append(Rule([_pattern(str(r)) for r in repos], set(map(str, raw.get("users") or [])),
                              set(map(str, raw.get("groups") or [])), bool(raw.get("anonymous", False)),
                              {"pull", "push", "delete"} if "*" in actions else actions))
        catalog = set(map(str, doc.get("catalog") or []))
        return cls(rules, memberships, catalog)

    def groups_of(self, user: str | None) -> set[str]:
        return self.memberships.get(user, set()) if user else set()

    def actions(self, user: str | None, repository: str) -> set[str]:
        groups = self.groups_of(user)
        allowed: set[str] = set()
        for rule in self.rules:
            if rule.applies(user, groups) and rule.matches(repository):
                allowed |= rule.actions
        return allowed

    def may_list_catalog(self, user: str | None) -> bool:
        if user is None:
            return False
        return "*" in self.catalog or user in self.catalog or bool(self.catalog & self.groups_of(user))
