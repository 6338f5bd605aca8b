"""Helpers for auth tests: htpasswd files, certificates, tokens, a clock that tests move."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import subprocess
import sys
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from regserve.auth.htpasswd import set_user


class Clock:
    """Starts at the real time (certificates are checked against it too); tests move it."""

    def __init__(self, now: float | None = None) -> None:
        import time
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def htpasswd_file(path: Path, users: dict[str, str], cost: int = 4) -> Path:
    for user, password in users.items():
        set_user(str(path), user, password, cost)
    return path


def add_user_cli(path: Path, user: str, password: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "regserve", "htpasswd", "add", str(path), user, "--stdin",
                           "--cost", "4"], input=password + "\n", capture_output=True, text=True, timeout=60)


def make_cert(common_name: str, key=None, issuer_cert=None, issuer_key=None, ca: bool = False,
              ip: str | None = None, days: int = 30):
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                        critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def write_pem(path: Path, *objs) -> Path:
    data = b""
    for obj in objs:
        if isinstance(obj, x509.Certificate):
            data += obj.public_bytes(serialization.Encoding.PEM)
        else:
            data += obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    path.write_bytes(data)
    return path


class TokenMaker:
    """An external token server of the test's own: an RSA key and its self-signed certificate."""

    def __init__(self, issuer: str = "test-issuer", service: str = "test-registry") -> None:
        self.issuer, self.service = issuer, service
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _, self.cert = make_cert(issuer, key=self.key)

    def token(self, access: list[dict], now: float, ttl: float = 300, sub: str = "alice",
              aud: str | None = None, iss: str | None = None, key=None, header: str = "x5c",
              alg: str = "RS256") -> str:
        claims = {"iss": iss or self.issuer, "sub": sub, "aud": aud or self.service, "iat": int(now),
                  "nbf": int(now) - 1, "exp": int(now + ttl), "access": access}
        headers = {}
        if header == "x5c":
            headers["x5c"] = [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]
        elif header == "kid":
            from regserve.auth.tokens import libtrust_kid
            headers["kid"] = libtrust_kid(self.key.public_key())
        return jwt.encode(claims, key or self.key, algorithm=alg, headers=headers)


def pull(name: str) -> list[dict]:
    return [{"type": "repository", "name": name, "actions": ["pull"]}]


def push(name: str) -> list[dict]:
    return [{"type": "repository", "name": name, "actions": ["pull", "push"]}]
