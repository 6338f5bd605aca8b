"""Configuration: distribution's keys, REGISTRY_* overrides, clear errors."""

import subprocess
import sys

import pytest

from regserve import config
from regserve.config import ConfigError, load, parse_duration
from regserve.storage import create_driver
from regserve.storage.directio import direct_io_suits

SEED_CONFIG = """\
version: 0.1
log:
  fields:
    service: registry
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: /var/lib/registry
http:
  addr: :5000
  headers:
    X-Content-Type-Options: [nosniff]
auth:
  htpasswd:
    realm: basic-realm
    path: /auth/htpasswd
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
"""


def write(tmp_path, text):
    p = tmp_path / "config.yml"
    p.write_text(text)
    return str(p)


def test_embedded_default():
    c = load(None, {})
    assert c.addr == "127.0.0.1:5000"
    assert c.storage_driver == "filesystem" and c.rootdirectory == "./data"
    assert not c.delete_enabled and not c.readonly


def test_registry_3_image_config_loads(tmp_path):
    c = load(write(tmp_path, SEED_CONFIG), {})
    assert c.addr == ":5000"
    assert c.rootdirectory == "/var/lib/registry"
    assert c.headers == {"X-Content-Type-Options": ["nosniff"]}


def test_env_overrides(tmp_path):
    c = load(write(tmp_path, SEED_CONFIG), {
        "REGISTRY_HTTP_ADDR": "127.0.0.1:6000",
        "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": "/srv/data",
        "REGISTRY_STORAGE_DELETE_ENABLED": "true",
        "REGISTRY_STORAGE_MAINTENANCE_READONLY_ENABLED": "true",
        "REGISTRY_LOG_LEVEL": "debug",
        "REGISTRY_HTTP_SECRET": "s3cret",
        "REGISTRY_HTTP_HOST": "https://registry.example.com",
        "REGISTRY_PORT": "tcp://10.0.0.1:5000",  # Kubernetes service links: ignored with a warning
    })
    assert c.addr == "127.0.0.1:6000"
    assert c.rootdirectory == "/srv/data"
    assert c.delete_enabled and c.readonly
    assert c.log_level == "debug" and c.secret == "s3cret"
    assert c.host == "https://registry.example.com"


def test_configuration_path_env(tmp_path):
    path = write(tmp_path, "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: /x\n")
    assert load(None, {"REGISTRY_CONFIGURATION_PATH": path}).rootdirectory == "/x"


def test_storage_driver_selected_by_env(tmp_path):
    c = load(write(tmp_path, "version: 0.1\nstorage:\n  inmemory: {}\n"),
             {"REGISTRY_STORAGE": "filesystem", "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": "/y"})
    assert c.storage_driver == "filesystem" and c.rootdirectory == "/y"


def test_reads_are_smaller_for_s3_where_waiting_pushes_would_hold_them(tmp_path):
    """aiohttp buffers up to twice read_bufsize of every body outside the S3 budget; pushes to
    S3 run at a fifth of the filesystem's speed and get smaller reads (README, S3)."""
    from regserve.api.app import runner_options
    fs = load(None, {})
    s3 = load(write(tmp_path, "version: 0.1\nstorage:\n  s3: {bucket: b, region: r}\n"), {})
    assert runner_options(fs)["read_bufsize"] == 1 << 20
    assert runner_options(s3)["read_bufsize"] == 256 << 10
    assert runner_options(s3)["handler_cancellation"] is False


def test_auth_method_named_by_env_as_the_seed_compose_does(tmp_path):
    path = write(tmp_path, "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: /x\n")
    seed = {"REGISTRY_AUTH": "htpasswd", "REGISTRY_AUTH_HTPASSWD_PATH": "/auth/htpasswd",
            "REGISTRY_AUTH_HTPASSWD_REALM": "Registry Realm", "REGISTRY_STORAGE_DELETE_ENABLED": "true"}
    c = load(path, seed)
    assert (c.auth_mode, c.auth_realm, c.htpasswd_path) == ("htpasswd", "Registry Realm", "/auth/htpasswd")
    with pytest.raises(ConfigError, match="auth.htpasswd.path: required"):
        load(path, {"REGISTRY_AUTH": "htpasswd"})


@pytest.mark.parametrize("text,key", [
    ("version: 0.1\nhttp:\n  adr: :5000\n", "http.adr"),
    ("version: 0.1\nstorage:\n  filesystem:\n    rootdir: /x\n", "storage.filesystem.rootdir"),
    ("version: 0.1\nbogus: 1\n", "bogus"),
    ("version: 0.1\nstorage:\n  delete:\n    enabled: maybe\n", "storage.delete.enabled"),
    ("version: 0.1\nhttp:\n  draintimeout: soon\n", "http.draintimeout"),
    ("version: 0.1\nstorage:\n  filesystem:\n    maxthreads: many\n", "storage.filesystem.maxthreads"),
    ("version: 0.1\nhttp: [1, 2]\n", "http"),
])
def test_bad_keys_are_named(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text), {})
    assert key in str(e.value)


def test_ill_typed_env_override_is_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(None, {"REGISTRY_STORAGE_DELETE_ENABLED": "sometimes"})
    assert "storage.delete.enabled" in str(e.value)


def test_version_required(tmp_path):
    with pytest.raises(ConfigError, match="version"):
        load(write(tmp_path, "http:\n  addr: :5000\n"), {})


def test_two_drivers_refused(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        load(write(tmp_path, "version: 0.1\nstorage:\n  filesystem: {}\n  inmemory: {}\n"), {})


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.yml"), {})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(write(tmp_path, "version: [\n"), {})


def test_ignored_keys_are_reported(tmp_path):
    c = load(write(tmp_path, SEED_CONFIG + "redis:\n  addr: localhost:6379\n"), {})
    assert "storage.filesystem.rootdirectory" not in c.ignored and "auth.htpasswd.path" not in c.ignored
    assert "redis" in c.ignored and "health" not in c.ignored


@pytest.mark.parametrize("text,seconds", [("10s", 10), ("168h", 168 * 3600), ("1h30m", 5400),
                                          ("500ms", 0.5), ("0", 0)])
def test_durations(text, seconds):
    assert parse_duration(text, "k") == pytest.approx(seconds)


def test_cli_reports_bad_key_and_exits(tmp_path):
    path = write(tmp_path, "version: 0.1\nhttp:\n  adr: :5000\n")
    r = subprocess.run([sys.executable, "-m", "regserve", "serve", path], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2
    assert "http.adr" in r.stderr


def test_schema_knows_the_documented_top_level_sections():
    for section in ("version", "log", "storage", "auth", "middleware", "http", "notifications",
                    "redis", "health", "proxy", "validation"):
        assert section in config.SCHEMA


@pytest.mark.parametrize("text,message", [
    ("auth:\n  htpasswd: {realm: r, path: /p}\n  token: {realm: r, service: s, issuer: i, rootcertbundle: /b}\n",
     "one method"),
    ("auth:\n  silly: {realm: r, service: s}\n", "silly"),
    ("auth:\n  htpasswd: {realm: r}\n", "auth.htpasswd.path"),
    ("auth:\n  token: {realm: r, issuer: i, rootcertbundle: /b}\n", "auth.token.service"),
    ("auth:\n  token: {service: s, issuer: i, rootcertbundle: /b}\n", "auth.token.realm"),
    ("auth:\n  token: {realm: r, service: s, issuer: i}\n", "rootcertbundle"),
    ("auth:\n  token: {service: s, issuer: i}\n  tokenserver: {htpasswd: /h}\n", "signingkey"),
    ("http:\n  tls: {certificate: /c}\n", "http.tls.key"),
    ("http:\n  tls: {certificate: /c, key: /k, clientauth: maybe}\n", "clientauth"),
    ("auth:\n  accesscontrol: {polcy: /p}\n", "auth.accesscontrol.polcy"),
])
def test_auth_and_tls_errors_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, "version: 0.1\nstorage:\n  filesystem: {rootdirectory: /d}\n" + text), {})


def test_auth_modes(tmp_path):
    fs = "storage:\n  filesystem: {rootdirectory: /d}\n"
    c = load(write(tmp_path, "version: 0.1\n" + fs + "auth:\n  htpasswd: {realm: r, path: /auth/htpasswd}\n"), {})
    assert (c.auth_mode, c.auth_realm, c.htpasswd_path) == ("htpasswd", "r", "/auth/htpasswd")
    c = load(None, {"REGISTRY_AUTH_TOKEN_SERVICE": "s", "REGISTRY_AUTH_TOKEN_ISSUER": "i",
                    "REGISTRY_AUTH_TOKENSERVER_HTPASSWD": "/h", "REGISTRY_AUTH_TOKENSERVER_SIGNINGKEY": "/k.pem",
                    "REGISTRY_AUTH_TOKENSERVER_EXPIRATION": "10m"})
    assert c.auth_mode == "token" and c.tokenserver and c.tokenserver_cert == "/k.pem.crt"
    assert c.tokenserver_expiration == 600
    c = load(write(tmp_path, "version: 0.1\n" + fs + "http:\n  tls: {certificate: /c, key: /k, clientcas: [/ca]}\n"), {})
    assert c.tls_clientcas == ["/ca"] and c.tls_clientauth == "require-and-verify-client-cert"


@pytest.mark.parametrize("value,direct", [(None, direct_io_suits), ("false", False), ("true", True)])
def test_filesystem_direct_io_switch(tmp_path, value, direct):
    """Unset, the filesystem's type decides (direct_io_suits); set, the setting does."""
    env = {"REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(tmp_path)}
    if value is not None:
        env["REGISTRY_STORAGE_FILESYSTEM_DIRECTIO"] = value
    expected = direct(str(tmp_path)) if callable(direct) else direct
    c = load(None, env)
    assert create_driver(c.storage_driver, c.storage_params).direct_io is expected


@pytest.mark.parametrize("value,expected", [(None, None), ("true", True), ("false", False)])
def test_http_sendfile_switch(value, expected):
    """Unset, the download path is chosen by the peer (api/sendfile.py); set, it is forced."""
    env = {} if value is None else {"REGISTRY_HTTP_SENDFILE": value}
    assert load(None, env).sendfile is expected
    assert "http.sendfile" not in load(None, env).ignored


def test_http_sendfile_in_file_must_be_boolean(tmp_path):
    head = f"version: 0.1\nstorage:\n  filesystem: {{rootdirectory: {tmp_path}}}\nhttp:\n"
    assert load(write(tmp_path, head + "  sendfile: false\n"), {}).sendfile is False
    with pytest.raises(ConfigError, match="http.sendfile"):
        load(write(tmp_path, head + "  sendfile: sometimes\n"), {})


def test_empty_environment_values_leave_typed_keys_unset():
    """distribution 2.8.2 starts with REGISTRY_STORAGE_DELETE_ENABLED= (empty) and takes it as
    unset; so does regserve, for every key that is not a string."""
    c = load(None, {"REGISTRY_STORAGE_DELETE_ENABLED": "", "REGISTRY_HTTP_SENDFILE": "",
                    "REGISTRY_CATALOG_MAXENTRIES": "", "REGISTRY_HTTP_DRAINTIMEOUT": "",
                    "REGISTRY_HTTP_PREFIX": ""})
    assert c.delete_enabled is False and c.sendfile is None
    assert c.catalog_max_entries == 1000 and c.drain_timeout == 0.0 and c.prefix == ""


def test_connection_limits_and_timeouts(tmp_path):
    c = load(None, {"REGISTRY_HTTP_TIMEOUTS_READHEADER": "5s", "REGISTRY_HTTP_TIMEOUTS_BODYIDLE": "2m",
                    "REGISTRY_HTTP_MAXCONNECTIONS": "500"})
    assert (c.read_header_timeout, c.body_idle_timeout, c.idle_timeout, c.write_timeout) == (5, 120, 120, 60)
    assert c.max_connections == 500
    with pytest.raises(ConfigError, match="http.timeouts.idle"):
        load(None, {"REGISTRY_HTTP_TIMEOUTS_IDLE": "0s"})
    with pytest.raises(ConfigError, match="http.maxconnections"):
        load(None, {"REGISTRY_HTTP_MAXCONNECTIONS": "0"})


@pytest.mark.parametrize("value,size", [("512MiB", 512 << 20), ("4G", 4 << 30), ("1.5GB", 3 << 29), ("0", 0),
                                        ("1048576", 1 << 20)])
def test_prewarm_budget_sizes(value, size):
    assert load(None, {"REGISTRY_STORAGE_FILESYSTEM_PREWARM": value}).storage_params["prewarm"] == size


def test_prewarm_budget_must_be_a_size():
    with pytest.raises(ConfigError, match="storage.filesystem.prewarm"):
        load(None, {"REGISTRY_STORAGE_FILESYSTEM_PREWARM": "lots"})


def test_log_formatter_and_debug_address(tmp_path):
    c = load(None, {"REGISTRY_LOG_FORMATTER": "json", "REGISTRY_HTTP_DEBUG_ADDR": "localhost:5001",
                    "REGISTRY_HTTP_DEBUG_PROMETHEUS_ENABLED": "true"})
    assert (c.log_formatter, c.debug_addr, c.prometheus, c.prometheus_path) == ("json", "localhost:5001", True,
                                                                                "/metrics")
    with pytest.raises(ConfigError, match="log.formatter"):
        load(None, {"REGISTRY_LOG_FORMATTER": "xml"})
    with pytest.raises(ConfigError, match="needs http.debug.addr"):
        load(None, {"REGISTRY_HTTP_DEBUG_PROMETHEUS_ENABLED": "true"})


def test_proxy_section(tmp_path):
    base = "version: 0.1\nstorage:\n  filesystem: {rootdirectory: /d}\n"
    c = load(write(tmp_path, base + "proxy: {remoteurl: 'https://registry-1.docker.io/', username: u, "
                   "password: p, ttl: 24h}\n"), {})
    assert (c.proxy_url, c.proxy_username, c.proxy_password, c.proxy_ttl) == \
        ("https://registry-1.docker.io", "u", "p", 86400)
    assert not [k for k in c.ignored if k.startswith("proxy")]
    secret = tmp_path / "secret"
    secret.write_text("from-a-file\n")
    c = load(None, {"REGISTRY_PROXY_REMOTEURL": "http://127.0.0.1:5001", "REGISTRY_PROXY_USERNAME": "u",
                    "REGISTRY_PROXY_PASSWORDFILE": str(secret)})
    assert (c.proxy_url, c.proxy_password, c.proxy_ttl) == ("http://127.0.0.1:5001", "from-a-file", 7 * 86400)
    assert load(write(tmp_path, base), {}).proxy_url is None
    assert "proxy.exec" in load(write(tmp_path, base + "proxy: {remoteurl: 'http://u', exec: {command: h}}\n"),
                                {}).ignored


@pytest.mark.parametrize("text,message", [
    ("proxy: {remoteurl: 'ftp://x'}\n", "proxy.remoteurl"),
    ("proxy: {remoteurl: 'http://x', ttl: -1h}\n", "proxy.ttl"),
    ("proxy: {remoteurl: 'http://x', password: p, passwordfile: /f}\n", "not both"),
    ("proxy: {remoteurl: 'http://x', passwordfile: /no/such/file}\n", "proxy.passwordfile"),
])
def test_proxy_errors_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, "version: 0.1\nstorage:\n  filesystem: {rootdirectory: /d}\n" + text), {})
