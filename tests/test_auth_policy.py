"""The access policy, enforced in htpasswd mode (token mode: see test_auth_token)."""

import os

import pytest

from regserve import config as config_mod
from regserve.api import make_app
from regserve.auth.policy import Policy, PolicyError

from .authutil import basic, htpasswd_file
from .conftest import digest_of

POLICY = """
groups:
  admins: [alice]
  ci: [robot]
rules:
  - repositories: ["**"]
    groups: [admins]
    actions: [pull, push, delete]
  - repositories: ["team-a/*"]
    users: [bob]
    groups: [ci]
    actions: [pull, push]
  - repositories: ["shared/**"]
    users: ["*"]
    actions: [pull]
  - repositories: ["public/**"]
    anonymous: true
    actions: [pull]
catalog: [admins]
"""
BLOB = os.urandom(10_000)


@pytest.fixture
async def client(aiohttp_client, data_dir, tmp_path):
    users = htpasswd_file(tmp_path / "htpasswd", {"alice": "a", "bob": "b", "robot": "r", "carol": "c"})
    (tmp_path / "policy.yml").write_text(POLICY)
    env = {"REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(data_dir), "REGISTRY_HTTP_RELATIVEURLS": "true",
           "REGISTRY_STORAGE_DELETE_ENABLED": "true", "REGISTRY_AUTH_HTPASSWD_REALM": "r",
           "REGISTRY_AUTH_HTPASSWD_PATH": str(users),
           "REGISTRY_AUTH_ACCESSCONTROL_POLICY": str(tmp_path / "policy.yml")}
    c = await aiohttp_client(make_app(config_mod.load(None, env)))
    for repo in ("team-a/app", "shared/base", "public/tools", "private/x"):
        r = await c.post(f"/v2/{repo}/blobs/uploads/?digest={digest_of(BLOB)}", data=BLOB, headers=basic("alice", "a"))
        assert r.status == 201
    return c


async def push_status(client, repo, auth):
    r = await client.post(f"/v2/{repo}/blobs/uploads/?digest={digest_of(BLOB)}", data=BLOB, headers=auth)
    return r.status, r


async def test_team_member_pushes_own_repositories(client):
    assert (await push_status(client, "team-a/app", basic("bob", "b")))[0] == 201
    assert (await push_status(client, "team-a/app", basic("robot", "r")))[0] == 201


async def test_push_to_read_only_repository_is_denied(client):
    status, r = await push_status(client, "shared/base", basic("bob", "b"))
    assert status == 403 and (await r.json())["errors"][0]["code"] == "DENIED"
    assert (await client.get(f"/v2/shared/base/blobs/{digest_of(BLOB)}", headers=basic("carol", "c"))).status == 200


async def test_no_access_at_all(client):
    r = await client.get(f"/v2/private/x/blobs/{digest_of(BLOB)}", headers=basic("bob", "b"))
    assert r.status == 403
    # '*' matches one path component only
    assert (await push_status(client, "team-a/app/sub", basic("bob", "b")))[0] == 403


async def test_anonymous_pull_of_chosen_repositories(client):
    assert (await client.get(f"/v2/public/tools/blobs/{digest_of(BLOB)}")).status == 200
    r = await client.get(f"/v2/shared/base/blobs/{digest_of(BLOB)}")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="r"'
    status, r = await push_status(client, "public/tools", {})
    assert status == 401
    assert (await client.get("/v2/")).status == 401  # `docker login` still needs the challenge


async def test_delete_needs_delete(client):
    r = await client.delete(f"/v2/team-a/app/blobs/{digest_of(BLOB)}", headers=basic("bob", "b"))
    assert r.status == 403
    r = await client.delete(f"/v2/team-a/app/blobs/{digest_of(BLOB)}", headers=basic("alice", "a"))
    assert r.status == 202


async def test_catalog_without_the_right(client):
    assert (await client.get("/v2/_catalog", headers=basic("alice", "a"))).status == 200
    r = await client.get("/v2/_catalog", headers=basic("bob", "b"))
    assert r.status == 403 and (await r.json())["errors"][0]["code"] == "DENIED"
    assert (await client.get("/v2/_catalog")).status == 401


async def test_mount_needs_pull_on_the_source(client):
    # bob may push team-a/app but may not read private/x: no mount, a plain upload session instead
    r = await client.post(f"/v2/team-a/app/blobs/uploads/?mount={digest_of(BLOB)}&from=private/x",
                          headers=basic("bob", "b"))
    assert r.status == 202
    r = await client.post(f"/v2/team-a/app/blobs/uploads/?mount={digest_of(BLOB)}&from=shared/base",
                          headers=basic("bob", "b"))
    assert r.status == 201


@pytest.mark.parametrize("doc,message", [
    ({"rules": [{"repositories": ["x"], "actions": ["fly"]}]}, "actions"),
    ({"rules": [{"actions": ["pull"]}]}, "repositories"),
    ({"rules": [{"repositories": ["x"], "actions": ["pull"], "colour": 1}]}, "colour"),
    ({"groups": {"g": "alice"}}, "groups.g"),
    ({"extra": 1}, "extra"),
])
def test_bad_policies_are_named(doc, message):
    with pytest.raises(PolicyError, match=message):
        Policy.parse(doc)


def test_patterns():
    p = Policy.parse({"rules": [{"repositories": ["a/*", "b/**", "c"], "users": ["u"], "actions": ["pull"]}]})
    assert p.actions("u", "a/x") == {"pull"} and p.actions("u", "a/x/y") == set()
    assert p.actions("u", "b/x/y/z") == {"pull"} and p.actions("u", "c") == {"pull"}
    assert p.actions("u", "cc") == set() and p.actions("v", "c") == set() and p.actions(None, "c") == set()
