"""htpasswd authentication: challenges, bcrypt caching, reload, refusal of other hashes."""

import asyncio
import os
import shutil
import subprocess

import pytest

from regserve import config as config_mod
from regserve.api import make_app
from regserve.api.auth import build
from regserve.auth import htpasswd as htpasswd_mod
from regserve.auth.htpasswd import HtpasswdError

from .authutil import add_user_cli, basic, htpasswd_file
from .conftest import digest_of, http, require_tool

BLOB = os.urandom(20_000)


@pytest.fixture
def users(tmp_path):
    return htpasswd_file(tmp_path / "htpasswd", {"alice": "wonderland", "bob": "builder"})


def cfg(data_dir, users, **extra):
    env = {"REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(data_dir), "REGISTRY_HTTP_RELATIVEURLS": "true",
           "REGISTRY_STORAGE_DELETE_ENABLED": "true", "REGISTRY_AUTH_HTPASSWD_REALM": "Registry Realm",
           "REGISTRY_AUTH_HTPASSWD_PATH": str(users)}
    env.update(extra)
    return config_mod.load(None, env)


@pytest.fixture
async def client(aiohttp_client, data_dir, users):
    return await aiohttp_client(make_app(cfg(data_dir, users)))


async def test_v2_challenges_without_credentials(client):
    r = await client.get("/v2/")
    assert r.status == 401
    assert r.headers["WWW-Authenticate"] == 'Basic realm="Registry Realm"'
    assert (await r.json())["errors"][0]["code"] == "UNAUTHORIZED"


async def test_login_probe_and_push_pull(client):
    assert (await client.get("/v2/", headers=basic("alice", "wonderland"))).status == 200
    r = await client.post(f"/v2/a/blobs/uploads/?digest={digest_of(BLOB)}", data=BLOB,
                          headers=basic("alice", "wonderland"))
    assert r.status == 201
    r = await client.get(f"/v2/a/blobs/{digest_of(BLOB)}", headers=basic("bob", "builder"))
    assert r.status == 200 and await r.read() == BLOB


@pytest.mark.parametrize("user,password", [("alice", "wrong"), ("mallory", "wonderland"), ("alice", "")])
async def test_bad_credentials(client, user, password):
    r = await client.get("/v2/foo/tags/list", headers=basic(user, password))
    assert r.status == 401
    assert r.headers["WWW-Authenticate"].startswith("Basic ")


async def test_malformed_authorization(client):
    r = await client.get("/v2/", headers={"Authorization": "Basic !!!notbase64"})
    assert r.status == 401


async def test_anonymous_request_is_challenged_everywhere(client):
    for method, path in [("GET", "/v2/_catalog"), ("GET", "/v2/a/tags/list"), ("POST", "/v2/a/blobs/uploads/"),
                         ("DELETE", f"/v2/a/blobs/{digest_of(b'x')}")]:
        r = await client.request(method, path)
        assert r.status == 401, path


async def test_bcrypt_runs_once_per_credential(client, monkeypatch):
    calls = []
    real = htpasswd_mod._checkpw

    def counting(password, hashed):
        calls.append(1)
        return real(password, hashed)

    monkeypatch.setattr(htpasswd_mod, "_checkpw", counting)
    # A burst of concurrent requests (a 50-layer push) shares one bcrypt run.
    results = await asyncio.gather(*[client.get("/v2/", headers=basic("bob", "builder")) for _ in range(50)])
    assert {r.status for r in results} == {200}
    assert len(calls) == 1
    assert (await client.get("/v2/", headers=basic("bob", "wrong"))).status == 401
    assert len(calls) == 2


async def test_changed_file_takes_effect_without_restart(client, users):
    assert (await client.get("/v2/", headers=basic("bob", "builder"))).status == 200
    proc = add_user_cli(users, "bob", "new-secret")
    assert proc.returncode == 0, proc.stderr
    assert (await client.get("/v2/", headers=basic("bob", "builder"))).status == 401
    assert (await client.get("/v2/", headers=basic("bob", "new-secret"))).status == 200
    proc = add_user_cli(users, "carol", "c")
    assert (await client.get("/v2/", headers=basic("carol", "c"))).status == 200


async def test_broken_file_on_reload_keeps_old_users(client, users):
    text = users.read_text()
    users.write_text(text + "eve:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    assert (await client.get("/v2/", headers=basic("alice", "wonderland"))).status == 200


def test_non_bcrypt_hash_is_refused_at_start_naming_the_line(tmp_path, data_dir):
    f = tmp_path / "htpasswd"
    f.write_text("# users\nalice:$apr1$abc$def\n")
    with pytest.raises(HtpasswdError, match="line 2.*alice.*MD5"):
        build(cfg(data_dir, f))
    f.write_text("alice:plaintext\n")
    with pytest.raises(HtpasswdError, match="line 1"):
        build(cfg(data_dir, f))


def test_start_fails_with_a_message(tmp_path, data_dir):
    import sys
    f = tmp_path / "htpasswd"
    f.write_text("bob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    env = dict(os.environ, REGISTRY_AUTH_HTPASSWD_PATH=str(f), REGISTRY_AUTH_HTPASSWD_REALM="r",
               REGISTRY_HTTP_ADDR="127.0.0.1:0", REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY=str(data_dir))
    r = subprocess.run([sys.executable, "-m", "regserve", "serve"], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "line 1" in r.stderr and "SHA-1" in r.stderr


@pytest.mark.skipif(shutil.which("htpasswd") is None, reason="apache2-utils not installed")
def test_apache_htpasswd_interoperates(tmp_path):
    """The seed deployment's `htpasswd -Bbn` lines load; our lines verify with Apache's tool."""
    f = tmp_path / "htpasswd"
    line = subprocess.run(["htpasswd", "-Bbn", "myuser", "Swordfish"], capture_output=True, text=True,
                          check=True).stdout.strip()
    f.write_text(line + "\n")
    h = htpasswd_mod.Htpasswd(str(f))
    assert asyncio.run(h.verify("myuser", "Swordfish"))
    assert not asyncio.run(h.verify("myuser", "swordfish"))
    assert add_user_cli(f, "other", "pa:ss word").returncode == 0
    ok = subprocess.run(["htpasswd", "-vb", str(f), "other", "pa:ss word"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert subprocess.run(["htpasswd", "-vb", str(f), "myuser", "Swordfish"], capture_output=True).returncode == 0
    # Apache adds a user to our file; we read it.
    subprocess.run(["htpasswd", "-Bb", str(f), "third", "x"], check=True, capture_output=True)
    assert asyncio.run(htpasswd_mod.Htpasswd(str(f)).verify("third", "x"))


def test_cli_add_remove_list(tmp_path):
    import sys
    f = tmp_path / "pw"
    assert add_user_cli(f, "u1", "p1").returncode == 0
    assert add_user_cli(f, "u2", "p2").returncode == 0
    out = subprocess.run([sys.executable, "-m", "regserve", "htpasswd", "list", str(f)], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["u1", "u2"]
    assert oct(f.stat().st_mode & 0o777) == "0o600"
    subprocess.run([sys.executable, "-m", "regserve", "htpasswd", "remove", str(f), "u1"], check=True)
    assert [line.split(":")[0] for line in f.read_text().splitlines()] == ["u2"]
    r = subprocess.run([sys.executable, "-m", "regserve", "htpasswd", "add", str(f), "u3"], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, timeout=30)
    assert r.returncode != 0  # no password on argv, and no terminal to ask on


async def test_big_unauthenticated_patch_keeps_connection(aiohttp_server, data_dir, users):
    """oras sends each request without credentials first, 16 MiB PATCH bodies included: answer 401
    and keep the connection usable."""
    import aiohttp
    server = await aiohttp_server(make_app(cfg(data_dir, users)))
    auth = basic("alice", "wonderland")
    body = os.urandom(16 << 20)
    conn = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=conn) as s:
        r = await s.post(server.make_url("/v2/big/blobs/uploads/"), headers=auth)
        loc = r.headers["Location"]
        r = await s.patch(server.make_url(loc), data=body)
        assert r.status == 401
        await r.read()
        r = await s.patch(server.make_url(loc), data=body, headers=auth)
        assert r.status == 202
        r = await s.put(server.make_url(loc + f"?digest={digest_of(body)}"), headers=auth)
        assert r.status == 201


async def test_missing_file_is_provisioned_like_distribution(aiohttp_client, data_dir, tmp_path, caplog):
    """The seed deployment starts the registry before creating /auth/htpasswd."""
    path = tmp_path / "auth" / "htpasswd"
    with caplog.at_level("WARNING"):
        client = await aiohttp_client(make_app(cfg(data_dir, path)))
    line = path.read_text().strip()
    assert line.startswith("docker:$2y$") and oct(path.stat().st_mode & 0o777) == "0o600"
    password = caplog.text.split("password ")[-1].split()[0]
    assert (await client.get("/v2/", headers=basic("docker", password))).status == 200
    htpasswd_file(path, {"myuser": "Swordfish"})  # then the operator adds users, as the seed does
    assert (await client.get("/v2/", headers=basic("myuser", "Swordfish"))).status == 200


def test_cli_prompts_for_the_password_on_a_terminal(tmp_path):
    """Without --stdin the password is asked twice on the terminal, never taken from argv."""
    import pty
    import sys
    import time
    f = tmp_path / "pw"
    pid, fd = pty.fork()
    if pid == 0:  # the child: regserve on a real terminal
        os.execv(sys.executable, [sys.executable, "-m", "regserve", "htpasswd", "add", str(f), "tty-user",
                                  "--cost", "4"])
    output = b""
    answers = [b"typed secret\n", b"typed secret\n"]
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
        if answers and output.count(b"password:") >= 3 - len(answers):
            os.write(fd, answers.pop(0))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output
    assert b"typed secret" not in output  # not echoed
    assert asyncio.run(htpasswd_mod.Htpasswd(str(f)).verify("tty-user", "typed secret"))


async def test_unknown_users_cost_a_bcrypt_like_wrong_passwords(users, monkeypatch):
    """No telling which users exist by the answer's timing: an unknown user is checked against
    a hash of the file's own cost, once, as a wrong password is."""
    checked: list[bytes] = []
    real = htpasswd_mod._checkpw
    monkeypatch.setattr(htpasswd_mod, "_checkpw", lambda pw, hashed: checked.append(hashed) or real(pw, hashed))
    store = htpasswd_mod.Htpasswd(str(users))
    assert not await store.verify("alice", "wrong")
    assert not await store.verify("mallory", "wrong")
    assert len(checked) == 2
    assert checked[0].split(b"$")[2] == checked[1].split(b"$")[2] == b"04"  # the same cost


def test_passwords_over_72_bytes_work_as_with_apache(tmp_path):
    """bcrypt reads 72 bytes of a password; bcrypt 5 refuses more instead of truncating. Like
    Apache's htpasswd, regserve uses the first 72 bytes, both ways."""
    htpasswd = require_tool("htpasswd", "Apache's htpasswd, from apache2-utils")
    long_password = "x" * 72 + "y" * 40
    path = tmp_path / "ours"
    result = add_user_cli(path, "long", long_password)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    check = subprocess.run([htpasswd, "-vb", str(path), "long", long_password], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    theirs = tmp_path / "theirs"
    subprocess.run([htpasswd, "-Bbc", str(theirs), "long", long_password], check=True, capture_output=True)

    async def verify(file, password):
        return await htpasswd_mod.Htpasswd(str(file)).verify("long", password)
    assert asyncio.run(verify(theirs, long_password))
    assert asyncio.run(verify(path, long_password))
    assert asyncio.run(verify(path, "x" * 72))  # what Apache's truncation means, both ways
    assert not asyncio.run(verify(path, "x" * 71))


def test_a_flood_of_wrong_passwords_does_not_delay_a_real_login(server_factory, tmp_path):
    """120 wrong-password requests at once from another address: a real user's login is served
    after at most the bcrypt runs already under way, not behind the flood; the flood past its
    share gets TOOMANYREQUESTS at once."""
    import socket
    import threading
    import time
    path = htpasswd_file(tmp_path / "htpasswd", {"alice": "wonderland", "bob": "builder"}, cost=10)
    srv = server_factory(env={"REGISTRY_AUTH_HTPASSWD_REALM": "r", "REGISTRY_AUTH_HTPASSWD_PATH": str(path)})
    statuses: list[bytes] = []

    def attacker(i: int) -> None:  # each guess another password: no two share a bcrypt run
        header = basic("alice", f"guess-{i}")["Authorization"]
        s = socket.create_connection(("127.0.0.1", srv.port), source_address=("127.0.0.2", 0))
        s.sendall(f"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: {header}\r\n\r\n".encode())
        s.settimeout(60)
        statuses.append(s.recv(64).split(b" ")[1])
        s.close()
    flood = [threading.Thread(target=attacker, args=(i,)) for i in range(120)]
    for t in flood:
        t.start()
    time.sleep(0.3)  # the flood is queued
    start = time.time()
    status, _, _ = http("GET", f"{srv.url}/v2/", headers=basic("bob", "builder"))
    waited = time.time() - start
    for t in flood:
        t.join()
    assert status == 200
    assert waited < 1.5, f"a real login waited {waited:.2f} s behind the flood"
    assert sorted(set(statuses)) == [b"401", b"429"] and len(statuses) == 120
    assert statuses.count(b"429") >= 60  # beyond what was queued for it and run meanwhile
