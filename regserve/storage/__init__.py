"""Storage drivers."""

from __future__ import annotations

from typing import Any

from .base import (
    AlreadyExists,
    Busy,
    CommitMismatch,
    FileInfo,
    FileWriter,
    PathNotFound,
    StorageDriver,
    check_path,
    delete_if_there,
)

__all__ = ["AlreadyExists", "Busy", "CommitMismatch", "FileInfo", "FileWriter", "PathNotFound",
           "StorageDriver", "check_path", "create_driver", "delete_if_there"]


def create_driver(kind: str, params: dict[str, Any]) -> StorageDriver:
    if kind == "filesystem":
        from .filesystem import FilesystemDriver
        return FilesystemDriver(params.get("rootdirectory", "/var/lib/registry"),
                                int(params.get("maxthreads", 100)),
                                params.get("directio"), params.get("prewarm"))
    if kind == "s3":
        from .s3 import S3Driver
        return S3Driver(params["bucket"], params.get("region") or "us-east-1", params.get("regionendpoint"),
                        params.get("accesskey"), params.get("secretkey"), params.get("rootdirectory", ""),
                        secure=params.get("secure", True) is not False,
                        skipverify=bool(params.get("skipverify", False)),
                        forcepathstyle=params.get("forcepathstyle", True) is not False,
                        chunksize=int(params.get("chunksize") or 0) or 8 << 20,
                        storageclass=params.get("storageclass"), encrypt=bool(params.get("encrypt", False)),
                        keyid=params.get("keyid"), sessiontoken=params.get("sessiontoken"),
                        multipartcopychunksize=params.get("multipartcopychunksize"),
                        multipartcopymaxconcurrency=params.get("multipartcopymaxconcurrency"),
                        multipartcopythresholdsize=params.get("multipartcopythresholdsize"))
    raise ValueError(f"storage driver {kind!r} is not available")
