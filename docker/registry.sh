#!/bin/sh
# `registry ...` runs regserve as the unprivileged user, even from `docker exec` (root by default),
# so that nothing it writes (locks, temporaries) is left owned by root. Before the commands that
# write (serve, garbage-collect), what registry:3 (which runs as root) wrote in the data directory
# is handed to that user: only files the user does not own yet, so later starts only walk the tree.
set -e
if [ "$(id -u)" != 0 ]; then
    exec /opt/regserve/bin/regserve "$@"
fi
uid=$(id -u regserve) gid=$(id -g regserve)
case "$1" in
    serve|garbage-collect)
        for dir in /var/lib/registry "${REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY:-}"; do
            if [ -n "$dir" ] && [ -d "$dir" ]; then
                find "$dir" -xdev \! -user "$uid" -exec chown -h "$uid:$gid" {} +
            fi
        done
        ;;
esac
exec setpriv --reuid="$uid" --regid="$gid" --init-groups /opt/regserve/bin/regserve "$@"
