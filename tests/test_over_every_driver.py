"""The API and conformance tests again, over the in-memory driver and over S3 on a real Ceph RGW:
the registry layer must work on any driver that passes the contract suite
(tests/test_storage_contract.py), not only on the filesystem it grew up with. Tests that look at the data directory itself stay filesystem-only."""

from __future__ import annotations

import inspect

import pytest

from . import (
    test_api_base,
    test_api_blobs,
    test_api_discovery,
    test_api_manifests,
    test_api_uploads,
    test_conformance_workflows,
)

# How a file is handed to the socket (sendfile, copy threads, descriptors): the filesystem's own.
FILESYSTEM_ONLY = {"test_download_paths_send_exact_bytes", "test_cancelled_download_keeps_its_descriptors",
                   "test_small_bodies_are_not_copied", "test_copying_downloads_are_limited"}


def _is_fixture(obj: object) -> bool:
    return hasattr(obj, "_pytestfixturefunction") or type(obj).__name__ == "FixtureFunctionDefinition"


for _module in (test_api_base, test_api_blobs, test_api_discovery, test_api_manifests, test_api_uploads,
                test_conformance_workflows):
    for _name, _obj in vars(_module).items():
        if _is_fixture(_obj) and _name != "storage_kind":
            globals()[_name] = _obj
        elif (_name.startswith("test_") and callable(_obj) and _name not in FILESYSTEM_ONLY
              and "data_dir" not in inspect.signature(_obj).parameters):
            globals()[_name] = _obj


@pytest.fixture(params=["inmemory", "s3"])
def storage_kind(request) -> str:
    return request.param
