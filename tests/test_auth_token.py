"""Token auth: challenges and scopes, JWT validation against an injected clock, long uploads,
the built-in issuer (GET and OAuth2 POST), and key trust by x5c and kid."""

import json
import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from regserve import config as config_mod
from regserve.api import make_app

from .authutil import Clock, TokenMaker, add_user_cli, basic, bearer, htpasswd_file, pull, push, write_pem
from .conftest import digest_of

BLOB = os.urandom(30_000)


@pytest.fixture
def maker():
    return TokenMaker()


@pytest.fixture
def clock():
    return Clock()


def token_config(data_dir, tmp_path, maker, **extra):
    bundle = write_pem(tmp_path / "bundle.pem", maker.cert)
    env = {"REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(data_dir), "REGISTRY_HTTP_RELATIVEURLS": "true",
           "REGISTRY_STORAGE_DELETE_ENABLED": "true", "REGISTRY_AUTH_TOKEN_REALM": "https://auth.example/token",
           "REGISTRY_AUTH_TOKEN_SERVICE": maker.service, "REGISTRY_AUTH_TOKEN_ISSUER": maker.issuer,
           "REGISTRY_AUTH_TOKEN_ROOTCERTBUNDLE": str(bundle)}
    env.update(extra)
    return config_mod.load(None, env)


@pytest.fixture
async def client(aiohttp_client, data_dir, tmp_path, maker, clock):
    return await aiohttp_client(make_app(token_config(data_dir, tmp_path, maker), clock=clock))


async def test_challenge_names_realm_service_and_scope(client, maker):
    r = await client.get("/v2/foo/bar/tags/list")
    assert r.status == 401
    assert r.headers["WWW-Authenticate"] == (
        f'Bearer realm="https://auth.example/token",service="{maker.service}",scope="repository:foo/bar:pull"')
    r = await client.post("/v2/foo/blobs/uploads/")
    assert 'scope="repository:foo:pull,push"' in r.headers["WWW-Authenticate"]
    r = await client.get("/v2/")
    assert r.status == 401 and "scope=" not in r.headers["WWW-Authenticate"]


async def test_valid_token_pull_and_push(client, maker, clock):
    t = maker.token(push("foo"), clock.now)
    r = await client.post(f"/v2/foo/blobs/uploads/?digest={digest_of(BLOB)}", data=BLOB, headers=bearer(t))
    assert r.status == 201
    r = await client.get(f"/v2/foo/blobs/{digest_of(BLOB)}", headers=bearer(maker.token(pull("foo"), clock.now)))
    assert r.status == 200
    assert (await client.get("/v2/", headers=bearer(t))).status == 200


async def test_insufficient_scope(client, maker, clock):
    t = maker.token(pull("foo"), clock.now)
    r = await client.post("/v2/foo/blobs/uploads/", headers=bearer(t))
    assert r.status == 401
    assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    assert 'scope="repository:foo:pull,push"' in r.headers["WWW-Authenticate"]


async def test_token_for_wrong_repository(client, maker, clock):
    r = await client.get("/v2/other/tags/list", headers=bearer(maker.token(push("foo"), clock.now)))
    assert r.status == 401 and "insufficient_scope" in r.headers["WWW-Authenticate"]


async def test_expiry_uses_the_clock_with_leeway(client, maker, clock):
    t = maker.token(pull("foo"), clock.now, ttl=300)
    clock.now += 300 + 30  # within the leeway
    assert (await client.get("/v2/foo/tags/list", headers=bearer(t))).status in (200, 404)
    clock.now += 600
    r = await client.get("/v2/foo/tags/list", headers=bearer(t))
    assert r.status == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]


async def test_not_yet_valid(client, maker, clock):
    t = maker.token(pull("foo"), clock.now + 3600)
    assert (await client.get("/v2/foo/tags/list", headers=bearer(t))).status == 401


@pytest.mark.parametrize("kwargs", [{"aud": "someone-else"}, {"iss": "rogue"}])
async def test_wrong_audience_or_issuer(client, maker, clock, kwargs):
    r = await client.get("/v2/foo/tags/list", headers=bearer(maker.token(pull("foo"), clock.now, **kwargs)))
    assert r.status == 401


async def test_wrong_key_and_unsigned(client, maker, clock):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = maker.token(pull("foo"), clock.now, key=other)  # x5c says trusted cert, signature says not
    assert (await client.get("/v2/foo/tags/list", headers=bearer(forged))).status == 401
    import jwt
    unsigned = jwt.encode({"iss": maker.issuer, "aud": maker.service, "exp": clock.now + 60,
                           "access": pull("foo")}, None, algorithm="none")
    assert (await client.get("/v2/foo/tags/list", headers=bearer(unsigned))).status == 401
    assert (await client.get("/v2/foo/tags/list", headers=bearer("garbage"))).status == 401


async def test_kid_names_a_bundle_key(client, maker, clock):
    t = maker.token(pull("foo"), clock.now, header="kid")
    assert (await client.get("/v2/foo/tags/list", headers=bearer(t))).status in (200, 404)


async def test_catalog_needs_its_scope(client, maker, clock):
    t = maker.token(pull("foo"), clock.now)
    r = await client.get("/v2/_catalog", headers=bearer(t))
    assert r.status == 401 and 'scope="registry:catalog:*"' in r.headers["WWW-Authenticate"]
    t = maker.token([{"type": "registry", "name": "catalog", "actions": ["*"]}], clock.now)
    assert (await client.get("/v2/_catalog", headers=bearer(t))).status == 200


async def test_token_expiring_mid_upload_does_not_break_it(client, maker, clock):
    t = maker.token(push("foo"), clock.now, ttl=60)
    r = await client.post("/v2/foo/blobs/uploads/", headers=bearer(t))
    loc = r.headers["Location"]

    async def slow_body():
        import asyncio
        yield BLOB[:10_000]
        await asyncio.sleep(0.2)  # the server has checked the token and is reading the body
        clock.now += 3600  # the token expires while the body is still arriving
        yield BLOB[10_000:]

    r = await client.patch(loc, data=slow_body(), headers=bearer(t))
    assert r.status == 202


# -- the built-in issuer ------------------------------------------------------------------------

@pytest.fixture
async def issuing(aiohttp_client, data_dir, tmp_path, clock):
    users = htpasswd_file(tmp_path / "htpasswd", {"alice": "a-pass", "bob": "b-pass"})
    policy = tmp_path / "policy.yml"
    policy.write_text("""
rules:
  - repositories: ["**"]
    users: [alice]
    actions: [pull, push, delete]
  - repositories: ["shared/**"]
    users: [bob]
    actions: [pull]
  - repositories: ["public/**"]
    anonymous: true
    actions: [pull]
catalog: [alice]
""")
    env = {"REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(data_dir), "REGISTRY_HTTP_RELATIVEURLS": "true",
           "REGISTRY_AUTH_TOKEN_SERVICE": "reg.test", "REGISTRY_AUTH_TOKEN_ISSUER": "regserve-test",
           "REGISTRY_AUTH_TOKENSERVER_HTPASSWD": str(users),
           "REGISTRY_AUTH_TOKENSERVER_SIGNINGKEY": str(tmp_path / "keys" / "token.key"),
           "REGISTRY_AUTH_ACCESSCONTROL_POLICY": str(policy)}
    return await aiohttp_client(make_app(config_mod.load(None, env), clock=clock)), tmp_path


async def get_token(client, scopes, auth=None):
    q = "&".join(f"scope={s}" for s in scopes)
    r = await client.get(f"/token?service=reg.test&{q}", headers=auth or {})
    return r.status, (await r.json() if r.status == 200 else None)


async def test_issuer_full_flow(issuing):
    client, tmp = issuing
    assert (tmp / "keys" / "token.key").exists() and (tmp / "keys" / "token.key.crt").exists()
    assert oct((tmp / "keys" / "token.key").stat().st_mode & 0o777) == "0o600"
    r = await client.get("/v2/shared/lib/tags/list")
    assert r.headers["WWW-Authenticate"].startswith('Bearer realm="http://127.0.0.1:')
    assert '/token",service="reg.test"' in r.headers["WWW-Authenticate"]
    status, body = await get_token(client, ["repository:team/app:pull,push"], basic("alice", "a-pass"))
    assert status == 200 and body["token"] == body["access_token"] and body["expires_in"] == 300
    r = await client.post(f"/v2/team/app/blobs/uploads/?digest={digest_of(BLOB)}", data=BLOB,
                          headers=bearer(body["token"]))
    assert r.status == 201


async def test_issuer_grants_only_what_the_policy_allows(issuing):
    client, _ = issuing
    status, body = await get_token(client, ["repository:shared/lib:pull,push,delete"], basic("bob", "b-pass"))
    import jwt
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert claims["access"] == [{"type": "repository", "name": "shared/lib", "actions": ["pull"]}]
    r = await client.post("/v2/shared/lib/blobs/uploads/", headers=bearer(body["token"]))
    assert r.status == 401 and "insufficient_scope" in r.headers["WWW-Authenticate"]
    assert (await client.get("/v2/shared/lib/tags/list", headers=bearer(body["token"]))).status == 404


async def test_issuer_anonymous_and_bad_credentials(issuing):
    client, _ = issuing
    status, body = await get_token(client, ["repository:public/base:pull", "repository:team/app:pull"])
    import jwt
    assert jwt.decode(body["token"], options={"verify_signature": False})["access"] == [
        {"type": "repository", "name": "public/base", "actions": ["pull"]}]
    status, _ = await get_token(client, ["repository:team/app:pull"], basic("alice", "nope"))
    assert status == 401
    status, _ = await get_token(client, ["repository:team/app:pull"], basic("nobody", "x"))
    assert status == 401
    r = await client.get("/token?service=other")
    assert r.status == 400


async def test_catalog_right(issuing):
    client, _ = issuing
    for user, password, expected in (("alice", "a-pass", 200), ("bob", "b-pass", 401)):
        _, body = await get_token(client, ["registry:catalog:*"], basic(user, password))
        assert (await client.get("/v2/_catalog", headers=bearer(body["token"]))).status == expected


async def test_oauth2_password_and_refresh(issuing, clock):
    client, _ = issuing
    r = await client.post("/token", data={"grant_type": "password", "username": "alice", "password": "a-pass",
                                          "service": "reg.test", "client_id": "test", "access_type": "offline",
                                          "scope": "repository:team/app:pull repository:team/app:push"})
    assert r.status == 200
    body = await r.json()
    assert body["refresh_token"] and body["scope"] == "repository:team/app:pull,push"
    clock.now += 3600  # the access token is long gone; the refresh token still works
    r = await client.post("/token", data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"],
                                          "service": "reg.test", "client_id": "test",
                                          "scope": "repository:team/app:pull"})
    assert r.status == 200
    fresh = (await r.json())["access_token"]
    assert (await client.get("/v2/team/app/tags/list", headers=bearer(fresh))).status == 404
    r = await client.post("/token", data={"grant_type": "password", "username": "alice", "password": "x",
                                          "service": "reg.test", "client_id": "test"})
    assert r.status == 401 and (await r.json())["error"] == "invalid_grant"
    r = await client.post("/token", data={"grant_type": "client_credentials", "service": "reg.test"})
    assert r.status == 400


async def test_expired_issued_token(issuing, clock):
    client, _ = issuing
    _, body = await get_token(client, ["repository:team/app:pull"], basic("alice", "a-pass"))
    clock.now += 301 + 60
    r = await client.get("/v2/team/app/tags/list", headers=bearer(body["token"]))
    assert r.status == 401 and "invalid_token" in r.headers["WWW-Authenticate"]


async def test_jwks_keys_by_kid(aiohttp_client, data_dir, tmp_path, clock):
    import jwt as pyjwt
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "key-2026"
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    env = {"REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(data_dir), "REGISTRY_AUTH_TOKEN_REALM": "https://a/token",
           "REGISTRY_AUTH_TOKEN_SERVICE": "svc", "REGISTRY_AUTH_TOKEN_ISSUER": "iss",
           "REGISTRY_AUTH_TOKEN_JWKS": str(tmp_path / "jwks.json")}
    client = await aiohttp_client(make_app(config_mod.load(None, env), clock=clock))
    claims = {"iss": "iss", "aud": "svc", "sub": "ci", "exp": clock.now + 60, "access": pull("foo")}
    good = pyjwt.encode(claims, key, algorithm="RS256", headers={"kid": "key-2026"})
    assert (await client.get("/v2/foo/tags/list", headers=bearer(good))).status == 404  # authorised; no repo
    unknown = pyjwt.encode(claims, key, algorithm="RS256", headers={"kid": "other"})
    assert (await client.get("/v2/foo/tags/list", headers=bearer(unknown))).status == 401


async def _refresh(client, token):
    return await client.post("/token", data={"grant_type": "refresh_token", "refresh_token": token,
                                             "service": "reg.test", "client_id": "test"})


async def test_refresh_tokens_die_with_the_credential(issuing, tmp_path):
    """A refresh token is bound to the password it was issued for: a password change or the
    user's removal ends it, and one for another user is unaffected."""
    client, _ = issuing
    tokens = {}
    for user, password in (("alice", "a-pass"), ("bob", "b-pass")):
        r = await client.post("/token", data={"grant_type": "password", "username": user, "password": password,
                                              "service": "reg.test", "client_id": "test", "access_type": "offline"})
        tokens[user] = (await r.json())["refresh_token"]
    _, body = await get_token(client, ["repository:team/app:pull"], basic("alice", "a-pass"))
    assert (await _refresh(client, tokens["alice"])).status == 200
    add_user_cli(tmp_path / "htpasswd", "alice", "new-pass")
    r = await _refresh(client, tokens["alice"])
    assert r.status == 401 and (await r.json())["error"] == "invalid_grant"
    assert (await _refresh(client, tokens["bob"])).status == 200
    remove = subprocess.run([sys.executable, "-m", "regserve", "htpasswd", "remove", str(tmp_path / "htpasswd"),
                             "bob"], capture_output=True, timeout=60)
    assert remove.returncode == 0
    assert (await _refresh(client, tokens["bob"])).status == 401
    add_user_cli(tmp_path / "htpasswd", "bob", "b-pass")  # the same password again: the same hash? no
    assert (await _refresh(client, tokens["bob"])).status == 401  # a new salt: a new credential
