"""Command line: `regserve serve|garbage-collect|healthcheck [CONFIG]`, `regserve htpasswd`."""

from __future__ import annotations

import argparse
import sys

from . import config as config_mod


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regserve", description="OCI / Docker V2 container registry")
    parser.add_argument("--version", "-v", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the registry")
    serve.add_argument("config", nargs="?", help="distribution-style config.yml (default: "
                       "$REGISTRY_CONFIGURATION_PATH, else 127.0.0.1:5000 over ./data)")
    serve.add_argument("--workers", type=int, default=None,
                       help="processes sharing the port (SO_REUSEPORT); default: the cores this process may "
                       "use (CPU affinity and cgroup quota)")
    gc = sub.add_parser("garbage-collect", help="delete blobs no manifest references, as distribution's "
                        "garbage-collect; safe while the registry serves")
    gc.add_argument("config", nargs="?", help="the registry's config.yml")
    gc.add_argument("-d", "--dry-run", action="store_true", help="only list what would be deleted")
    gc.add_argument("-m", "--delete-untagged", action="store_true",
                    help="also delete manifests no tag reaches (kept: children of kept indexes, referrers)")
    gc.add_argument("--grace", default=None, help="keep what was written or referenced this recently "
                    "(a duration such as 30m; default: storage.maintenance.gc.grace, else 1h)")
    users = sub.add_parser("htpasswd", help="manage users of a bcrypt htpasswd file")
    users.add_argument("action", choices=["add", "remove", "list"])
    users.add_argument("file")
    users.add_argument("user", nargs="?")
    users.add_argument("--stdin", action="store_true", help="read the password from standard input")
    users.add_argument("--cost", type=int, default=10, help="bcrypt cost (default 10)")
    health = sub.add_parser("healthcheck", help="exit 0 if the registry on this host is ready: /readyz at "
                            "http.debug.addr when set, else /v2/ at http.addr (200 or 401)")
    health.add_argument("config", nargs="?", help="the registry's config.yml")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    args = parser.parse_args(argv)
    if args.command == "htpasswd" and args.action != "list" and not args.user:
        parser.error("htpasswd add/remove need a USER")

    if args.command == "serve":
        try:
            config = config_mod.load(args.config)
        except config_mod.ConfigError as e:
            print(f"regserve: configuration error: {e}", file=sys.stderr)
            return 2
        if args.workers is not None and args.workers < 1:
            print("regserve: --workers must be at least 1", file=sys.stderr)
            return 2
        from .auth.htpasswd import HtpasswdError
        from .auth.policy import PolicyError
        from .auth.tokens import TokenError
        from .server import run
        try:
            run(config, args.workers)
        except (HtpasswdError, PolicyError, TokenError) as e:
            print(f"regserve: configuration error: {e}", file=sys.stderr)
            return 2
        except (OSError, ValueError) as e:
            print(f"regserve: {e}", file=sys.stderr)
            return 1
        return 0
    if args.command == "htpasswd":
        return htpasswd_command(args)
    if args.command == "garbage-collect":
        return garbage_collect_command(args)
    if args.command == "healthcheck":
        return healthcheck_command(args)
    return 2


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("regserve")
    except PackageNotFoundError:
        return "unknown"


def healthcheck_command(args: argparse.Namespace) -> int:
    """For container HEALTHCHECKs: ask the registry this config describes, on this host."""
    import ssl
    import urllib.error
    import urllib.request

    from .server import parse_addr
    try:
        config = config_mod.load(args.config)
        if config.debug_addr:
            host, port = parse_addr(config.debug_addr)
            scheme, path, fine = "http", "/readyz", {200}
        else:
            host, port = parse_addr(config.addr)
            scheme, path, fine = "https" if config.tls_certificate else "http", config.prefix + "/v2/", {200, 401}
    except (config_mod.ConfigError, ValueError) as e:
        print(f"regserve: configuration error: {e}", file=sys.stderr)
        return 2
    if host in ("", "0.0.0.0", "::", "localhost"):
        host = "127.0.0.1"
    url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}{path}"
    context = ssl._create_unverified_context() if scheme == "https" else None  # our own certificate, here
    try:
        with urllib.request.urlopen(url, timeout=args.timeout, context=context) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError as e:
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1
    if status not in fine:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


def garbage_collect_command(args: argparse.Namespace) -> int:
    import asyncio

    from .api.app import make_registry
    from .registry.gc import GarbageCollectionAborted, collect
    from .registry.registry import RegistryBusy
    from .storage import PathNotFound
    try:
        config = config_mod.load(args.config)
        grace = config.gc_grace if args.grace is None else config_mod.parse_duration(args.grace, "--grace")
    except config_mod.ConfigError as e:
        print(f"regserve: configuration error: {e}", file=sys.stderr)
        return 2
    registry = make_registry(config)
    show = _Progress(sys.stderr)

    async def run() -> None:
        try:
            await collect(registry, dry_run=args.dry_run, delete_untagged=args.delete_untagged, grace=grace,
                          log=show.line, progress=show.update)
        finally:
            await registry.driver.close()

    try:
        asyncio.run(run())
    except (GarbageCollectionAborted, RegistryBusy) as e:
        show.line(f"regserve garbage-collect: {e}", sys.stderr)
        return 1
    except (OSError, PathNotFound) as e:  # a delete failed: stop there, loudly
        show.line(f"regserve garbage-collect: stopped by a storage error while deleting: {e}", sys.stderr)
        return 1
    return 0


class _Progress:
    """On a terminal, one line that shows the phase and how far it is; elsewhere nothing extra."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.shown = False

    def update(self, phase: str, done: int, total: int) -> None:
        if self.live:
            self.stream.write(f"\r\033[K{phase}: {done}/{total}")
            self.stream.flush()
            self.shown = True

    def line(self, text: str, stream=None) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.shown = False
        print(text, file=stream or sys.stdout, flush=True)


def _read_password(args: argparse.Namespace) -> str:
    import getpass
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("New password: ")
        if getpass.getpass("Re-type new password: ") != password:
            raise SystemExit("regserve: passwords do not match")
    if not password:
        raise SystemExit("regserve: empty password")
    return password


def htpasswd_command(args: argparse.Namespace) -> int:
    """Edit an htpasswd file that Apache's htpasswd reads and writes too."""
    from .auth import htpasswd
    try:
        if args.action == "add":
            htpasswd.set_user(args.file, args.user, _read_password(args), args.cost)
            print(f"user {args.user} set in {args.file}", file=sys.stderr)
        elif args.action == "remove":
            if not htpasswd.remove_user(args.file, args.user):
                print(f"regserve: no user {args.user} in {args.file}", file=sys.stderr)
                return 1
        else:
            for line in htpasswd.read_lines(args.file):
                if line.strip() and not line.startswith("#"):
                    print(line.partition(":")[0])
    except (htpasswd.HtpasswdError, OSError) as e:
        print(f"regserve: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
