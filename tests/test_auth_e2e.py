"""Auth end to end with real clients and real processes: skopeo with --creds against htpasswd and
against the built-in token issuer, oras with basic auth (its unauthenticated first tries of
16 MiB chunks included), and TLS with and without client certificates."""

from __future__ import annotations

import os
import shutil
import ssl
import urllib.request
from pathlib import Path

import pytest

from .authutil import htpasswd_file, make_cert, write_pem
from .conftest import ROOT, require_tool
from .oci_layout import build_image
from .test_e2e_skopeo import skopeo


def auth_config(tmp_path: Path, body: str) -> Path:
    cfg = tmp_path / "config.yml"
    cfg.write_text("version: 0.1\n" + body)
    return cfg


@pytest.fixture
def users(tmp_path):
    return htpasswd_file(tmp_path / "htpasswd", {"alice": "s3cret", "bob": "builder"})


def push_as_alice_pull_as_bob(tmp_path, host: str, repo: str):
    """skopeo copies an image in as alice and out as bob; returns the source layout."""
    src = tmp_path / "src"
    build_image(src, "v1", ROOT / "regserve", big_bytes=2 << 20)
    skopeo("copy", "--preserve-digests", "--dest-tls-verify=false", "--dest-creds", "alice:s3cret",
           f"oci:{src}:v1", f"docker://{host}/{repo}:v1")
    skopeo("copy", "--src-tls-verify=false", "--src-creds", "bob:builder", f"docker://{host}/{repo}:v1",
           f"oci:{tmp_path / 'out'}:v1")
    return src


def test_skopeo_with_htpasswd(server_factory, tmp_path, users):
    require_tool("skopeo", "real client for end-to-end tests")
    cfg = auth_config(tmp_path, f"auth:\n  htpasswd:\n    realm: test\n    path: {users}\n")
    srv = server_factory(config_file=cfg)
    host = srv.url.removeprefix("http://")
    push_as_alice_pull_as_bob(tmp_path, host, "auth/app")
    with pytest.raises(AssertionError):
        skopeo("inspect", "--tls-verify=false", "--creds", "alice:wrong", f"docker://{host}/auth/app:v1")
    with pytest.raises(AssertionError):
        skopeo("inspect", "--tls-verify=false", "--no-creds", f"docker://{host}/auth/app:v1")


def test_skopeo_with_builtin_token_issuer(server_factory, tmp_path, users):
    require_tool("skopeo", "real client for end-to-end tests")
    policy = tmp_path / "policy.yml"
    policy.write_text("rules:\n  - repositories: ['**']\n    users: [alice]\n    actions: [pull, push, delete]\n"
                      "  - repositories: ['**']\n    users: [bob]\n    actions: [pull]\n")
    cfg = auth_config(tmp_path, f"""auth:
  token:
    service: regserve-test
    issuer: regserve-test
  tokenserver:
    htpasswd: {users}
    signingkey: {tmp_path / 'token.key'}
  accesscontrol:
    policy: {policy}
""")
    srv = server_factory(config_file=cfg, workers=2)  # both workers verify the one generated key
    host = srv.url.removeprefix("http://")
    src = push_as_alice_pull_as_bob(tmp_path, host, "tok/app")
    with pytest.raises(AssertionError):  # bob may only pull
        skopeo("copy", "--preserve-digests", "--dest-tls-verify=false", "--dest-creds", "bob:builder",
               f"oci:{src}:v1", f"docker://{host}/tok/bob:v1")


def test_oras_with_basic_auth(server_factory, tmp_path, users):
    oras_client = pytest.importorskip("oras.client")
    cfg = auth_config(tmp_path, f"auth:\n  htpasswd:\n    realm: test\n    path: {users}\n")
    srv = server_factory(config_file=cfg)
    host = srv.url.removeprefix("http://")
    work = tmp_path / "art"
    work.mkdir()
    (work / "big.bin").write_bytes(os.urandom(40 << 20))  # three 16 MiB chunks
    (work / "notes.txt").write_text("hello")
    client = oras_client.OrasClient(hostname=host, insecure=True, auth_backend="basic")
    client.login(username="alice", password="s3cret", hostname=host)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        r = client.push(target=f"{host}/oras/art:v1", files=["big.bin", "notes.txt"], do_chunked=True)
        assert r.status_code in (200, 201)
        out = tmp_path / "out"
        client.pull(target=f"{host}/oras/art:v1", outdir=str(out))
    finally:
        os.chdir(cwd)
    assert (out / "big.bin").read_bytes() == (work / "big.bin").read_bytes()
    assert (out / "notes.txt").read_text() == "hello"


@pytest.fixture
def pki(tmp_path):
    ca_key, ca = make_cert("test-ca", ca=True)
    srv_key, srv_cert = make_cert("127.0.0.1", issuer_cert=ca, issuer_key=ca_key, ip="127.0.0.1")
    cli_key, cli_cert = make_cert("client", issuer_cert=ca, issuer_key=ca_key)
    return {"ca": write_pem(tmp_path / "ca.pem", ca), "cert": write_pem(tmp_path / "srv.pem", srv_cert),
            "key": write_pem(tmp_path / "srv.key", srv_key), "client_cert": write_pem(tmp_path / "cli.pem", cli_cert),
            "client_key": write_pem(tmp_path / "cli.key", cli_key)}


def https_get(url: str, ca: Path, cert: tuple[Path, Path] | None = None) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
        return r.status


def test_tls(server_factory, tmp_path, pki):
    cfg = auth_config(tmp_path, f"http:\n  tls:\n    certificate: {pki['cert']}\n    key: {pki['key']}\n")
    srv = server_factory(config_file=cfg, tls_ca=pki["ca"])
    url = srv.url.replace("http://", "https://")
    assert https_get(url + "/v2/", pki["ca"]) == 200
    with pytest.raises(OSError):
        urllib.request.urlopen(srv.url + "/v2/", timeout=5)  # plain HTTP on the TLS port
    if shutil.which("skopeo"):
        certs = tmp_path / "certs.d"
        certs.mkdir()
        shutil.copy(pki["ca"], certs / "ca.crt")
        src = tmp_path / "src"
        build_image(src, "v1", ROOT / "regserve", big_bytes=1 << 20)
        skopeo("copy", "--preserve-digests", f"--dest-cert-dir={certs}", f"oci:{src}:v1",
               f"docker://{url.removeprefix('https://')}/tls/app:v1")
        skopeo("copy", f"--src-cert-dir={certs}", f"docker://{url.removeprefix('https://')}/tls/app:v1",
               f"oci:{tmp_path / 'out'}:v1")


def test_mutual_tls(server_factory, tmp_path, pki):
    cfg = auth_config(tmp_path, f"http:\n  tls:\n    certificate: {pki['cert']}\n    key: {pki['key']}\n"
                                f"    clientcas: [{pki['ca']}]\n")
    srv = server_factory(config_file=cfg, tls_ca=pki["ca"], tls_client=(pki["client_cert"], pki["client_key"]))
    url = srv.url.replace("http://", "https://")
    assert https_get(url + "/v2/", pki["ca"], (pki["client_cert"], pki["client_key"])) == 200
    with pytest.raises((ssl.SSLError, OSError)):
        https_get(url + "/v2/", pki["ca"])  # no client certificate
