"""Storage drivers."""

from __future__ import annotations

from typing import Any

from .base import AlreadyExists, Busy, CommitMismatch, FileInfo, FileWriter, PathNotFound, StorageDriver, check_path

__all__ = ["AlreadyExists", "Busy", "CommitMismatch", "FileInfo", "FileWriter", "PathNotFound",
           "StorageDriver", "check_path", "create_driver"]


def create_driver(kind: str, params: dict[str, Any]) -> StorageDriver:
    if kind == "filesystem":
        from .filesystem import FilesystemDriver
        return FilesystemDriver(params.get("rootdirectory", "/var/lib/registry"),
                                int(params.get("maxthreads", 100)),
                                params.get("directio"), params.get("prewarm"))
    raise ValueError(f"storage driver {kind!r} is not available")
