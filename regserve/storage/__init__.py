"""Storage drivers."""

from __future__ import annotations

from typing import Any

from .base import FileInfo, FileWriter, PathNotFound, StorageDriver, WriterBusy

__all__ = ["FileInfo", "FileWriter", "PathNotFound", "StorageDriver", "WriterBusy", "create_driver"]


def create_driver(kind: str, params: dict[str, Any]) -> StorageDriver:
    if kind == "filesystem":
        from .filesystem import FilesystemDriver
        return FilesystemDriver(params.get("rootdirectory", "/var/lib/registry"),
                                int(params.get("maxthreads", 100)),
                                params.get("directio"))
    raise ValueError(f"storage driver {kind!r} is not available")
