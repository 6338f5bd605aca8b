"""The API, conformance and web UI tests again, over the in-memory driver and over S3 on a real Ceph RGW:
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
    test_ui,
)

# How a file is handed to the socket (sendfile, copy threads, descriptors): the filesystem's own.
FILESYSTEM_ONLY = {"test_download_paths_send_exact_bytes", "test_cancelled_download_keeps_its_descriptors",
                   "test_small_bodies_are_not_copied", "test_copying_downloads_are_limited",
                   # the UI's own logic (pages, search, headers, settings) over what the driver gave:
                   # the same on every driver, and minutes of pushes on S3
                   "test_search_and_pages", "test_tag_search_and_pages", "test_pull_lines_name_the_configured_host",
                   "test_unknown_and_malformed_addresses_are_not_found_pages",
                   "test_pages_send_a_strict_policy_and_load_nothing_from_elsewhere",
                   "test_the_storage_page_says_it_is_counting_until_it_has_counted",
                   "test_the_ui_can_be_moved_or_turned_off", "test_no_delete_where_the_registry_allows_none"}


def _is_fixture(obj: object) -> bool:
    return hasattr(obj, "_pytestfixturefunction") or type(obj).__name__ == "FixtureFunctionDefinition"


for _module in (test_api_base, test_api_blobs, test_api_discovery, test_api_manifests, test_api_uploads,
                test_conformance_workflows, test_ui):
    for _name, _obj in vars(_module).items():
        if _is_fixture(_obj) and _name != "storage_kind":
            globals()[_name] = _obj
        elif (_name.startswith("test_") and callable(_obj) and _name not in FILESYSTEM_ONLY
              and "data_dir" not in inspect.signature(_obj).parameters):
            globals()[_name] = _obj


@pytest.fixture(params=["inmemory", "s3"])
def storage_kind(request) -> str:
    return request.param
