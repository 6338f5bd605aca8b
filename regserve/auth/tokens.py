"""Docker registry tokens (JWT): verification for `auth.token`, and the built-in issuer.

Keys are trusted the ways Docker token servers present them: an `x5c` chain that ends at a
certificate of `rootcertbundle`, a `kid` that names a trusted key (libtrust fingerprint, RFC 7638
thumbprint, or a JWKS entry), or a lone trusted key. Times are checked against an injectable
clock with a small leeway, so tests never sleep.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Callable

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from .scopes import Access

LEEWAY_SECONDS = 60
ASYMMETRIC = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"]


class TokenError(Exception):
    pass


def _der_public(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def libtrust_kid(public_key) -> str:
    """distribution's key ID: SHA-256 of the DER public key, 240 bits, base32 in 12 groups."""
    s = base64.b32encode(hashlib.sha256(_der_public(public_key)).digest()[:30]).decode().rstrip("=")
    return ":".join(s[i:i + 4] for i in range(0, len(s), 4))


def jwk_thumbprint(public_key) -> str:
    jwk = json.loads(jwt.algorithms.get_default_algorithms()[
        "ES256" if isinstance(public_key, ec.EllipticCurvePublicKey) else "RS256"].to_jwk(public_key))
    members = {k: jwk[k] for k in (("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n"))}
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass
class Claims:
    subject: str
    access: list[Access]
    expires: float


class TokenVerifier:
    def __init__(self, issuer: str, service: str, roots: list[x509.Certificate] | None = None,
                 keys: dict[str, object] | None = None, algorithms: list[str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.issuer, self.service, self.clock = issuer, service, clock
        self.roots = roots or []
        self.algorithms = [a for a in (algorithms or ASYMMETRIC) if a in ASYMMETRIC]
        self.keys: dict[str, object] = dict(keys or {})
        for cert in self.roots:
            pub = cert.public_key()
            self.keys[libtrust_kid(pub)] = pub
            self.keys[jwk_thumbprint(pub)] = pub

    @staticmethod
    def load_bundle(path: str) -> list[x509.Certificate]:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificates(f.read())

    @staticmethod
    def load_jwks(path: str) -> dict[str, object]:
        with open(path) as f:
            doc = json.load(f)
        return {k["kid"]: jwt.PyJWK(k).key for k in doc.get("keys", []) if "kid" in k}

    def _chain_key(self, x5c: list[str]):
        certs = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in x5c]
        now = dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc)
        for cert in certs:
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise TokenError("token certificate is not valid now")
        for child, parent in zip(certs, certs[1:]):
            child.verify_directly_issued_by(parent)
        last = certs[-1]
        for root in self.roots:
            if last == root:
                return certs[0].public_key()
            try:
                last.verify_directly_issued_by(root)
                return certs[0].public_key()
            except (ValueError, TypeError, Exception):
                continue
        raise TokenError("token certificate chain does not lead to a trusted root")

    def _key_for(self, header: dict):
        if header.get("x5c"):
            return self._chain_key(header["x5c"])
        kid = header.get("kid")
        if kid:
            if kid in self.keys:
                return self.keys[kid]
            raise TokenError(f"unknown signing key {kid!r}")
        if len(self.keys) == 1 or len({_der_public(k) for k in self.keys.values()}) == 1:
            return next(iter(self.keys.values()))
        raise TokenError("token names no signing key")

    def verify(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") not in self.algorithms:
                raise TokenError(f"signing algorithm {header.get('alg')!r} is not accepted")
            claims = jwt.decode(token, self._key_for(header), algorithms=[header["alg"]],
                                audience=self.service, issuer=self.issuer,
                                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                                         "require": ["iss", "aud", "exp"]})
        except TokenError:
            raise
        except Exception as e:  # jwt, cryptography and decoding errors alike
            raise TokenError(f"invalid token: {e}") from None
        now = self.clock()
        if float(claims["exp"]) + LEEWAY_SECONDS < now:
            raise TokenError("token has expired")
        if "nbf" in claims and float(claims["nbf"]) - LEEWAY_SECONDS > now:
            raise TokenError("token is not valid yet")
        access = []
        for item in claims.get("access") or []:
            if isinstance(item, dict) and isinstance(item.get("actions"), list):
                access.append(Access(str(item.get("type", "")), str(item.get("name", "")),
                                     tuple(map(str, item["actions"]))))
        return Claims(str(claims.get("sub", "")), access, float(claims["exp"]))


def load_or_create_signing_key(key_path: str, cert_path: str, issuer: str):
    """The issuer's EC P-256 key and a self-signed certificate for it (give that certificate to
    other registries as their `rootcertbundle`). Created on first start; a concurrent creator
    (another worker or replica) wins the race and everyone uses its key."""
    if not os.path.exists(key_path):
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        os.makedirs(os.path.dirname(os.path.abspath(key_path)), exist_ok=True)
        try:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
        except FileExistsError:
            pass
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise TokenError(f"{key_path}: the token signing key must be EC or RSA")
    if os.path.exists(cert_path):
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        if _der_public(cert.public_key()) == _der_public(key.public_key()):
            return key, cert
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer or "regserve")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    tmp = f"{cert_path}.tmp-{secrets.token_hex(4)}"
    with open(tmp, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, cert_path)
    return key, cert


class TokenIssuer:
    """Signs access tokens (and refresh tokens for OAuth2 `access_type=offline`)."""

    def __init__(self, key, cert: x509.Certificate, issuer: str, expiration: float = 300.0,
                 refresh_expiration: float = 7 * 86400.0, clock: Callable[[], float] = time.time) -> None:
        self.key, self.cert, self.issuer = key, cert, issuer
        self.expiration, self.refresh_expiration, self.clock = expiration, refresh_expiration, clock
        self.alg = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
        self.kid = libtrust_kid(key.public_key())

    @property
    def public_key(self):
        return self.key.public_key()

    def _sign(self, claims: dict) -> str:
        x5c = [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]
        return jwt.encode(claims, self.key, algorithm=self.alg, headers={"kid": self.kid, "x5c": x5c})

    def issue(self, subject: str, audience: str, access: list[Access]) -> tuple[str, int, str]:
        now = int(self.clock())
        claims = {"iss": self.issuer, "sub": subject, "aud": audience, "iat": now, "nbf": now - 1,
                  "exp": now + int(self.expiration), "jti": secrets.token_urlsafe(16),
                  "access": [a.claim() for a in access]}
        issued = dt.datetime.fromtimestamp(now, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return self._sign(claims), int(self.expiration), issued

    def refresh_token(self, subject: str, audience: str, credential: str) -> str:
        """A refresh token bound to `credential` (Htpasswd.fingerprint of the subject's present
        password): it is worth nothing once that password changes or the user is removed."""
        now = int(self.clock())
        return self._sign({"iss": self.issuer, "sub": subject, "aud": f"{audience}#refresh",
                           "iat": now, "exp": now + int(self.refresh_expiration),
                           "jti": secrets.token_urlsafe(16), "cred": credential})

    def check_refresh(self, token: str, audience: str) -> tuple[str, str]:
        """The subject of a valid refresh token this issuer signed, and the credential it is
        bound to."""
        try:
            claims = jwt.decode(token, self.public_key, algorithms=[self.alg], audience=f"{audience}#refresh",
                                issuer=self.issuer,
                                options={"verify_exp": False, "require": ["exp", "sub", "cred"]})
        except Exception as e:
            raise TokenError(f"invalid refresh token: {e}") from None
        if float(claims["exp"]) < self.clock():
            raise TokenError("refresh token has expired")
        return str(claims["sub"]), str(claims["cred"])
