"""distribution-compatible configuration: the same YAML keys and REGISTRY_* environment overrides.

Every key distribution documents is accepted (so an existing config.yml loads); keys regserve does
not act on are reported once at start. Unknown or ill-typed keys stop the start with the key's name.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

log = logging.getLogger("regserve.config")


class ConfigError(Exception):
    pass


# Leaf types: "str", "int", "bool", "duration", "list", "map" (free-form). Nested dicts are sections.
_S, _I, _B, _D, _L, _M, _Z = "str", "int", "bool", "duration", "list", "map", "size"
_DRIVERS = {
    # directio, prewarm: regserve's own
    "filesystem": {"rootdirectory": _S, "maxthreads": _I, "directio": _B, "prewarm": _Z},
    "s3": {"bucket": _S, "region": _S, "regionendpoint": _S, "accesskey": _S, "secretkey": _S,
           "rootdirectory": _S, "chunksize": _Z, "secure": _B, "skipverify": _B, "forcepathstyle": _B,
           "storageclass": _S, "encrypt": _B, "keyid": _S, "v4auth": _B, "multipartcopychunksize": _Z,
           "multipartcopymaxconcurrency": _I, "multipartcopythresholdsize": _Z, "loglevel": _S,
           "objectacl": _S, "usedualstack": _B, "accelerate": _B, "sessiontoken": _S},
    "inmemory": _M, "azure": _M, "gcs": _M, "swift": _M, "oss": _M,
}
SCHEMA: dict[str, Any] = {
    "version": _S,
    "loglevel": _S,
    "log": {"level": _S, "formatter": _S, "fields": _M, "hooks": _L, "reportcaller": _B,
            "accesslog": {"disabled": _B}},
    "storage": {**_DRIVERS,
                "delete": {"enabled": _B},
                "cache": {"blobdescriptor": _S, "blobdescriptorsize": _I},
                "redirect": {"disable": _B},
                "tag": {"concurrencylimit": _I},
                "maintenance": {"uploadpurging": {"enabled": _B, "age": _D, "interval": _D,
                                                  "dryrun": _B},
                                "readonly": {"enabled": _B},
                                # regserve's own: garbage collection inside the server
                                "gc": {"enabled": _B, "interval": _D, "grace": _D, "untagged": _B,
                                       "dryrun": _B}}},
    "auth": {"htpasswd": {"realm": _S, "path": _S},
             "token": {"realm": _S, "service": _S, "issuer": _S, "rootcertbundle": _S,
                       "jwks": _S, "autoredirect": _B, "autoredirectpath": _S,
                       "signingalgorithms": _L},
             "silly": {"realm": _S, "service": _S},
             # regserve extensions: the built-in token issuer, and the access policy file
             "tokenserver": {"enabled": _B, "htpasswd": _S, "signingkey": _S, "certificate": _S,
                             "expiration": _D, "refreshexpiration": _D},
             "accesscontrol": {"policy": _S}},
    "middleware": _M,
    "http": {"addr": _S, "net": _S, "host": _S, "prefix": _S, "secret": _S, "relativeurls": _B,
             "draintimeout": _D, "headers": _M,
             # regserve's own: how blobs are sent; connection timeouts and limits
             "sendfile": _B, "maxconnections": _I,
             "timeouts": {"readheader": _D, "idle": _D, "bodyidle": _D, "write": _D},
             "tls": {"certificate": _S, "key": _S, "clientcas": _L, "clientauth": _S,
                     "minimumtls": _S, "ciphersuites": _L, "letsencrypt": _M},
             "debug": {"addr": _S, "prometheus": {"enabled": _B, "path": _S}, "pprof": _M},
             "http2": {"disabled": _B}, "h2c": {"enabled": _B}},
    "health": {"storagedriver": {"enabled": _B, "interval": _D, "threshold": _I},
               "file": _L, "http": _L, "tcp": _L},
    "notifications": {"events": {"includereferences": _B}, "endpoints": _L},
    "redis": _M, "validation": _M,
    # passwordfile: regserve's own (the password out of the config file)
    "proxy": {"remoteurl": _S, "username": _S, "password": _S, "passwordfile": _S, "ttl": _D, "exec": _M},
    "compatibility": _M, "catalog": {"maxentries": _I},
    # regserve's own: the web UI
    "ui": {"enabled": _B, "path": _S},
}
# Keys regserve acts on; anything else that is set is reported as ignored.
IMPLEMENTED = {
    "version", "loglevel", "log.level", "log.formatter", "log.fields", "log.accesslog.disabled",
    "storage.filesystem.rootdirectory", "storage.filesystem.maxthreads", "storage.s3.bucket",
    "storage.s3.region", "storage.s3.regionendpoint", "storage.s3.accesskey", "storage.s3.secretkey",
    "storage.s3.rootdirectory", "storage.s3.chunksize", "storage.s3.secure", "storage.s3.skipverify",
    "storage.s3.forcepathstyle", "storage.s3.storageclass", "storage.s3.encrypt", "storage.s3.keyid",
    "storage.s3.v4auth", "storage.s3.sessiontoken",
    "storage.filesystem.directio", "storage.filesystem.prewarm", "storage.delete.enabled",
    "storage.maintenance.uploadpurging.enabled", "storage.maintenance.uploadpurging.age",
    "storage.maintenance.uploadpurging.interval", "storage.maintenance.uploadpurging.dryrun",
    "storage.maintenance.readonly.enabled", "storage.maintenance.gc", "storage.cache.blobdescriptor",
    "storage.cache.blobdescriptorsize", "storage.redirect.disable", "http.addr", "http.net",
    "http.host", "http.prefix", "http.secret", "http.relativeurls", "http.draintimeout", "ui",
    "http.headers", "http.sendfile", "http.maxconnections", "http.timeouts", "catalog.maxentries",
    "http.debug.addr", "http.debug.prometheus", "health", "notifications", "auth.htpasswd", "auth.token.realm",
    "auth.token.service", "auth.token.issuer", "auth.token.rootcertbundle", "auth.token.jwks",
    "auth.token.signingalgorithms", "auth.tokenserver", "auth.accesscontrol", "http.tls.certificate",
    "http.tls.key", "http.tls.clientcas", "http.tls.clientauth", "http.tls.minimumtls",
    "proxy.remoteurl", "proxy.username", "proxy.password", "proxy.passwordfile", "proxy.ttl",
}

# http.tls values (distribution's names) and what Python's ssl makes of them.
TLS_VERSIONS = {"tls1.0": ssl.TLSVersion.TLSv1, "tls1.1": ssl.TLSVersion.TLSv1_1,
                "tls1.2": ssl.TLSVersion.TLSv1_2, "tls1.3": ssl.TLSVersion.TLSv1_3}
TLS_CLIENT_AUTH = {"request-client-cert": ssl.CERT_OPTIONAL, "require-any-client-cert": ssl.CERT_REQUIRED,
                   "verify-client-cert-if-given": ssl.CERT_OPTIONAL,
                   "require-and-verify-client-cert": ssl.CERT_REQUIRED}

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, key: str) -> float:
    """Go duration syntax ("10s", "168h", "1h30m"); bare numbers are nanoseconds, as in Go."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value) * 1e-9
    if isinstance(value, str):
        text = value.strip()
        if text == "0":
            return 0.0
        parts = _DURATION_RE.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(float(n) * _UNITS[u] for n, u in parts)
    raise ConfigError(f"{key}: expected a duration such as 10s or 24h, got {value!r}")


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE)


def parse_size(value: Any, key: str) -> int:
    """Bytes, as a number or with a unit: 512MiB, 4G, 1.5GB (binary units either way)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE_RE.fullmatch(str(value).strip()) if isinstance(value, str) else None
    if not m:
        raise ConfigError(f"{key}: expected a size such as 512MiB or 4GiB, got {value!r}")
    unit = m.group(2).lower()
    return int(float(m.group(1)) * (1024 ** ("kmgt".index(unit) + 1) if unit else 1))


def _check(value: Any, kind: Any, key: str, seen: set[str]) -> Any:
    if isinstance(kind, dict):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        out = {}
        for k, v in value.items():
            sub = f"{key}.{k}" if key else str(k)
            if not isinstance(k, str) or k.lower() not in kind:
                raise ConfigError(f"unknown configuration key {sub!r}")
            out[k.lower()] = _check(v, kind[k.lower()], sub, seen)
        return out
    seen.add(key)
    if value is None:
        return None
    if kind == _S:
        if isinstance(value, (dict, list, bool)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if kind == _I:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if kind == _B:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind == _D:
        parse_duration(value, key)
        return value
    if kind == _L:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if kind == _Z:
        return parse_size(value, key)
    if kind == _M:
        return value
    raise AssertionError(kind)


def _apply_env(doc: dict[str, Any], env: Mapping[str, str]) -> None:
    """REGISTRY_SECTION_SUBSECTION_KEY=value, values parsed as YAML like distribution does."""
    for name in sorted(env):
        if not name.startswith("REGISTRY_") or name == "REGISTRY_CONFIGURATION_PATH":
            continue
        parts = name[len("REGISTRY_"):].lower().split("_")
        value = yaml.safe_load(env[name]) if env[name] != "" else ""
        if parts == ["storage"]:  # REGISTRY_STORAGE=<driver> selects the driver
            storage = doc.setdefault("storage", {}) or {}
            doc["storage"] = storage
            for drv in _DRIVERS:
                if drv != value:
                    storage.pop(drv, None)
            storage.setdefault(str(value), {})
            continue
        schema: Any = SCHEMA
        node = doc
        path: list[str] = []
        ok = True
        for i, part in enumerate(parts):
            if schema == _M:  # free-form map: the rest of the name is the key
                node[("_".join(parts[i:]))] = value
                break
            if not isinstance(schema, dict) or part not in schema:
                ok = False
                break
            path.append(part)
            if i == len(parts) - 1:
                # Empty means unset for anything but a string, as distribution takes it (an
                # empty YAML document leaves the field at its zero value).
                node[part] = None if value == "" and schema[part] != _S else value
            else:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
                schema = schema[part]
        if not ok:
            log.warning("ignoring unrecognized environment variable %s", name)


@dataclass
class Config:
    raw: dict[str, Any] = field(default_factory=dict)
    log_level: str = "info"
    log_formatter: str = "text"             # text, json (logstash: json)
    access_log: bool = True
    addr: str = "127.0.0.1:5000"
    host: str | None = None
    prefix: str = ""
    secret: str | None = None
    relative_urls: bool = False
    sendfile: bool | None = None            # None: sendfile to remote peers, copy to local ones
    drain_timeout: float = 0.0
    headers: dict[str, list[str]] = field(default_factory=dict)
    # Connection timeouts (seconds), in the spirit of Go's http.Server: the request's headers
    # must arrive within `readheader`; a keep-alive connection idle for `idle` is closed; a
    # request body that sends nothing for `bodyidle`, and a download the client takes nothing
    # of for `write`, are cut off. At most `max_connections` per worker process.
    read_header_timeout: float = 30.0
    idle_timeout: float = 120.0
    body_idle_timeout: float = 60.0
    write_timeout: float = 60.0
    max_connections: int = 10000
    debug_addr: str | None = None           # http.debug.addr: health and metrics
    prometheus: bool = False
    prometheus_path: str = "/metrics"
    storage_driver: str = "filesystem"
    storage_params: dict[str, Any] = field(default_factory=lambda: {"rootdirectory": "./data"})
    delete_enabled: bool = False
    readonly: bool = False
    upload_purging: bool = True
    upload_purge_age: float = 7 * 24 * 3600.0
    upload_purge_interval: float = 24 * 3600.0
    upload_purge_dryrun: bool = False
    redirect: bool = True                   # storage.redirect.disable: off; blob GETs to presigned URLs
    gc_enabled: bool = False                # storage.maintenance.gc: collect inside the server
    gc_interval: float = 24 * 3600.0
    gc_grace: float = 3600.0
    gc_untagged: bool = False
    gc_dryrun: bool = False
    catalog_max_entries: int = 1000
    ui_enabled: bool = True                 # ui.enabled: the web UI
    ui_path: str = "/ui"                    # ui.path: where it is served (below http.prefix)
    proxy_url: str | None = None            # proxy.remoteurl: a pull-through cache of this registry
    proxy_username: str | None = None
    proxy_password: str | None = None
    proxy_ttl: float = 7 * 24 * 3600.0      # proxy.ttl: cached content expires this long after its fetch (0: never)
    notifications: list[Any] = field(default_factory=list)   # notifications.Endpoint
    notify_references: bool = False
    auth_mode: str = "none"                 # none, htpasswd, token
    auth_realm: str | None = None
    htpasswd_path: str | None = None
    token_service: str = ""
    token_issuer: str = ""
    token_rootcertbundle: str | None = None
    token_jwks: str | None = None
    token_algorithms: list[str] = field(default_factory=list)
    tokenserver: bool = False
    tokenserver_key: str | None = None
    tokenserver_cert: str | None = None
    tokenserver_expiration: float = 300.0
    tokenserver_refresh_expiration: float = 7 * 86400.0
    policy_path: str | None = None
    tls_certificate: str | None = None
    tls_key: str | None = None
    tls_clientcas: list[str] = field(default_factory=list)
    tls_clientauth: str = "require-and-verify-client-cert"
    tls_minimum: str = "tls1.2"
    ignored: list[str] = field(default_factory=list)

    @property
    def rootdirectory(self) -> str | None:
        return self.storage_params.get("rootdirectory") if self.storage_driver == "filesystem" else None


def read_yaml(path: str, what: str) -> Any:
    """A YAML file's document; ConfigError naming `what` and the path when it cannot be had."""
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None


def _get(doc: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return default
        node = node[part]
    return node


def load(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """The configuration from `path` (or $REGISTRY_CONFIGURATION_PATH) and REGISTRY_* overrides.
    Without a file: the embedded default, 127.0.0.1:5000 over ./data."""
    env = os.environ if env is None else env
    path = path or env.get("REGISTRY_CONFIGURATION_PATH") or None
    if path is None:
        doc: dict[str, Any] = {"version": "0.1", "http": {"addr": "127.0.0.1:5000"},
                               "storage": {"filesystem": {"rootdirectory": "./data"}}}
    else:
        doc = read_yaml(path, "configuration")
        if not isinstance(doc, dict):
            raise ConfigError(f"configuration {path} must be a mapping")
    _apply_env(doc, env)
    if isinstance(doc.get("auth"), str):  # `auth: htpasswd` (REGISTRY_AUTH=htpasswd) names the method
        doc["auth"] = {doc["auth"]: {}}
    seen: set[str] = set()
    doc = _check(doc, SCHEMA, "", seen)
    if not doc.get("version"):
        raise ConfigError("version: required (use version: 0.1)")
    storage = doc.get("storage") or {}
    drivers = [k for k in storage if k in _DRIVERS]
    if len(drivers) != 1:
        raise ConfigError("storage: exactly one storage driver must be configured "
                          f"(found {', '.join(drivers) or 'none'})")
    driver = drivers[0]
    if driver not in ("filesystem", "s3"):
        raise ConfigError(f"storage.{driver}: this storage driver is not supported yet")
    if driver == "s3":
        if not _get(doc, "storage.s3.bucket"):
            raise ConfigError("storage.s3.bucket: required")
        if not _get(doc, "storage.s3.region") and not _get(doc, "storage.s3.regionendpoint"):
            raise ConfigError("storage.s3.region: required (or regionendpoint, for S3-compatible engines)")

    c = Config(raw=doc)
    c.log_level = str(_get(doc, "log.level") or _get(doc, "loglevel") or "info").lower()
    if c.log_level not in ("error", "warn", "info", "debug"):
        raise ConfigError(f"log.level: expected error, warn, info or debug, got {c.log_level!r}")
    c.access_log = not _get(doc, "log.accesslog.disabled", False)
    c.log_formatter = str(_get(doc, "log.formatter") or "text").lower()
    if c.log_formatter not in ("text", "json", "logstash"):
        raise ConfigError(f"log.formatter: expected text, json or logstash, got {c.log_formatter!r}")
    c.addr = _get(doc, "http.addr", ":5000")
    if _get(doc, "http.net", "tcp") != "tcp":
        raise ConfigError("http.net: only tcp is supported")
    c.host = _get(doc, "http.host")
    c.prefix = (_get(doc, "http.prefix", "") or "").rstrip("/")
    c.secret = _get(doc, "http.secret")
    c.relative_urls = bool(_get(doc, "http.relativeurls", False))
    c.sendfile = _get(doc, "http.sendfile")
    c.drain_timeout = parse_duration(_get(doc, "http.draintimeout", 0), "http.draintimeout")
    headers = _get(doc, "http.headers", {}) or {}
    if not isinstance(headers, dict):
        raise ConfigError("http.headers: expected a mapping of header to list of values")
    c.headers = {str(k): [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in headers.items()}
    for key, attr in (("readheader", "read_header_timeout"), ("idle", "idle_timeout"),
                      ("bodyidle", "body_idle_timeout"), ("write", "write_timeout")):
        value = _get(doc, f"http.timeouts.{key}")
        if value is not None:
            seconds = parse_duration(value, f"http.timeouts.{key}")
            if seconds <= 0:
                raise ConfigError(f"http.timeouts.{key}: must be more than zero")
            setattr(c, attr, seconds)
    c.max_connections = int(_get(doc, "http.maxconnections", c.max_connections))
    c.debug_addr = _get(doc, "http.debug.addr") or None
    c.prometheus = bool(_get(doc, "http.debug.prometheus.enabled", False))
    c.prometheus_path = _get(doc, "http.debug.prometheus.path") or "/metrics"
    if c.prometheus and not c.debug_addr:
        raise ConfigError("http.debug.prometheus.enabled: needs http.debug.addr (where /metrics is served)")
    if c.max_connections < 1:
        raise ConfigError("http.maxconnections: must be at least 1")
    c.storage_driver = driver
    c.storage_params = dict(storage.get(driver) or {})
    if driver == "filesystem":
        c.storage_params.setdefault("rootdirectory", "/var/lib/registry")
    c.delete_enabled = bool(_get(doc, "storage.delete.enabled", False))
    c.readonly = bool(_get(doc, "storage.maintenance.readonly.enabled", False))
    c.redirect = not _get(doc, "storage.redirect.disable", False)
    purge = "storage.maintenance.uploadpurging."
    c.upload_purging = bool(_get(doc, purge + "enabled", True))
    c.upload_purge_age = parse_duration(_get(doc, purge + "age", "168h"), purge + "age")
    c.upload_purge_interval = parse_duration(_get(doc, purge + "interval", "24h"), purge + "interval")
    c.upload_purge_dryrun = bool(_get(doc, purge + "dryrun", False))
    gc = "storage.maintenance.gc."
    c.gc_enabled = bool(_get(doc, gc + "enabled", False))
    c.gc_interval = parse_duration(_get(doc, gc + "interval", "24h"), gc + "interval")
    c.gc_grace = parse_duration(_get(doc, gc + "grace", "1h"), gc + "grace")
    c.gc_untagged = bool(_get(doc, gc + "untagged", False))
    c.gc_dryrun = bool(_get(doc, gc + "dryrun", False))
    if c.gc_enabled and c.gc_interval < 60:
        raise ConfigError(f"{gc}interval: at least 1m")
    c.catalog_max_entries = int(_get(doc, "catalog.maxentries", 1000))
    c.ui_enabled = bool(_get(doc, "ui.enabled", True))
    c.ui_path = "/" + (_get(doc, "ui.path", "/ui") or "").strip("/")
    if c.ui_path == "/" or c.ui_path == "/v2" or c.ui_path.startswith("/v2/"):
        raise ConfigError("ui.path: a path of its own, such as /ui (not / nor below /v2)")
    _load_proxy(c, doc)
    from .notifications import endpoints  # it reads durations with ours
    c.notifications, c.notify_references = endpoints(doc.get("notifications"))
    _load_auth(c, doc)
    _load_tls(c, doc)
    c.ignored = sorted(k for k in seen if k and not any(
        k == i or k.startswith(i + ".") for i in IMPLEMENTED) and _get(doc, k) is not None)
    return c


def _load_proxy(c: Config, doc: dict[str, Any]) -> None:
    url = _get(doc, "proxy.remoteurl")
    if not url:
        return
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
        raise ConfigError("proxy.remoteurl: an http:// or https:// URL")
    c.proxy_url = url.rstrip("/")
    c.proxy_username = _get(doc, "proxy.username") or None
    c.proxy_ttl = parse_duration(_get(doc, "proxy.ttl", "168h"), "proxy.ttl")
    if c.proxy_ttl < 0:
        raise ConfigError("proxy.ttl: not negative (0 keeps cached content for ever)")
    c.proxy_password = _get(doc, "proxy.password")
    password_file = _get(doc, "proxy.passwordfile")
    if password_file:
        if c.proxy_password:
            raise ConfigError("proxy: password or passwordfile, not both")
        try:
            with open(password_file) as f:
                c.proxy_password = f.read().rstrip("\r\n")
        except OSError as e:
            raise ConfigError(f"proxy.passwordfile: cannot read it ({e.strerror})") from None


def _load_auth(c: Config, doc: dict[str, Any]) -> None:
    auth = doc.get("auth") or {}
    methods = [m for m in ("htpasswd", "token", "silly") if auth.get(m) is not None]
    server = auth.get("tokenserver")
    tokenserver = server is not None and server.get("enabled", True) is not False
    if tokenserver and "token" not in methods:
        methods.append("token")
    if len(methods) > 1:
        raise ConfigError(f"auth: configure one method, not {' and '.join(methods)}")
    if methods == ["silly"]:
        raise ConfigError("auth.silly: distribution's test-only method is not supported; use htpasswd or token")
    c.policy_path = _get(doc, "auth.accesscontrol.policy")
    if methods == ["htpasswd"]:
        c.auth_mode = "htpasswd"
        c.auth_realm = _get(doc, "auth.htpasswd.realm") or "basic-realm"
        c.htpasswd_path = _get(doc, "auth.htpasswd.path")
        if not c.htpasswd_path:
            raise ConfigError("auth.htpasswd.path: required")
    elif methods == ["token"]:
        c.auth_mode = "token"
        c.auth_realm = _get(doc, "auth.token.realm")
        c.token_service = _get(doc, "auth.token.service") or ""
        c.token_issuer = _get(doc, "auth.token.issuer") or ""
        c.token_rootcertbundle = _get(doc, "auth.token.rootcertbundle")
        c.token_jwks = _get(doc, "auth.token.jwks")
        c.token_algorithms = list(_get(doc, "auth.token.signingalgorithms", []) or [])
        c.tokenserver = tokenserver
        if not c.token_service or not c.token_issuer:
            raise ConfigError("auth.token.service and auth.token.issuer: required")
        if c.tokenserver:
            ts = "auth.tokenserver."
            c.htpasswd_path = _get(doc, ts + "htpasswd") or _get(doc, "auth.htpasswd.path")
            c.tokenserver_key = _get(doc, ts + "signingkey")
            if not c.htpasswd_path or not c.tokenserver_key:
                raise ConfigError("auth.tokenserver.htpasswd and auth.tokenserver.signingkey: required")
            c.tokenserver_cert = _get(doc, ts + "certificate") or c.tokenserver_key + ".crt"
            c.tokenserver_expiration = parse_duration(_get(doc, ts + "expiration", "5m"), ts + "expiration")
            c.tokenserver_refresh_expiration = parse_duration(_get(doc, ts + "refreshexpiration", "168h"),
                                                              ts + "refreshexpiration")
        else:
            if not c.auth_realm:
                raise ConfigError("auth.token.realm: required (or enable auth.tokenserver)")
            if not c.token_rootcertbundle and not c.token_jwks:
                raise ConfigError("auth.token.rootcertbundle or auth.token.jwks: required")


def _load_tls(c: Config, doc: dict[str, Any]) -> None:
    c.tls_certificate = _get(doc, "http.tls.certificate")
    c.tls_key = _get(doc, "http.tls.key")
    if bool(c.tls_certificate) != bool(c.tls_key):
        raise ConfigError("http.tls.certificate and http.tls.key: set both or neither")
    c.tls_clientcas = [str(x) for x in (_get(doc, "http.tls.clientcas", []) or [])]
    c.tls_clientauth = _get(doc, "http.tls.clientauth", "require-and-verify-client-cert")
    if c.tls_clientauth not in TLS_CLIENT_AUTH:
        raise ConfigError(f"http.tls.clientauth: unknown value {c.tls_clientauth!r}")
    c.tls_minimum = _get(doc, "http.tls.minimumtls", "tls1.2")
    if c.tls_minimum not in TLS_VERSIONS:
        raise ConfigError(f"http.tls.minimumtls: unknown value {c.tls_minimum!r}")
