#!/bin/sh
# registry:3's entry point, with regserve: a config file argument means `serve` it; `sh` a shell;
# anything else is a registry command (`garbage-collect CONFIG`, `--version`, ...).
set -e
if [ -f "$1" ]; then
    set -- serve "$@"
fi
if [ "$1" = "sh" ]; then
    exec "$@"
fi
exec /usr/bin/registry "$@"
