"""Command line: `regserve serve [CONFIG] [--workers N]`."""

from __future__ import annotations

import argparse
import sys

from . import config as config_mod


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regserve", description="OCI / Docker V2 container registry")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the registry")
    serve.add_argument("config", nargs="?", help="distribution-style config.yml (default: "
                       "$REGISTRY_CONFIGURATION_PATH, else 127.0.0.1:5000 over ./data)")
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    args = parser.parse_args(argv)

    if args.command == "serve":
        try:
            config = config_mod.load(args.config)
        except config_mod.ConfigError as e:
            print(f"regserve: configuration error: {e}", file=sys.stderr)
            return 2
        if args.workers < 1:
            print("regserve: --workers must be at least 1", file=sys.stderr)
            return 2
        from .server import run
        try:
            run(config, args.workers)
        except (OSError, ValueError) as e:
            print(f"regserve: {e}", file=sys.stderr)
            return 1
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
