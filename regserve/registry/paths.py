"""Distribution's storage layout (registry/storage/paths.go), so data directories are interchangeable.

    /docker/registry/v2/blobs/<alg>/<hex[:2]>/<hex>/data
    /docker/registry/v2/repositories/<name>/_layers/<alg>/<hex>/link
    /docker/registry/v2/repositories/<name>/_manifests/revisions/<alg>/<hex>/link
    /docker/registry/v2/repositories/<name>/_manifests/tags/<tag>/current/link
    /docker/registry/v2/repositories/<name>/_manifests/tags/<tag>/index/<alg>/<hex>/link
    /docker/registry/v2/repositories/<name>/_uploads/<id>/{data,startedat,hashstates/<alg>/<offset>}

Referrers are indexed by regserve alone (distribution has no referrers API) under
    /docker/registry/v2/repositories/<name>/_refs/subjects/<alg>/<hex>/<alg>/<hex>/link
which distribution ignores, as it ignores
    /docker/registry/v2/repositories/<name>/_manifests/lock
which whoever changes the repository's manifests or tags holds (`driver.lock`), and
    /regserve/gc, /regserve/collecting
which writes that reference content hold shared while garbage collection deletes holding it
exclusively, and which one garbage collection at a time holds (registry.Registry).
"""

from __future__ import annotations

from ..reference import Digest

ROOT = "/docker/registry/v2"
GC_LOCK = "/regserve/gc"                # shared by writes that reference content, exclusive to sweeps
GC_RUNNING = "/regserve/collecting"     # one garbage collection at a time
BLOBS = f"{ROOT}/blobs"
REPOSITORIES = f"{ROOT}/repositories"


def blob_dir(d: Digest) -> str:
    return f"{BLOBS}/{d.algorithm}/{d.hex[:2]}/{d.hex}"


def blob_data(d: Digest) -> str:
    return f"{blob_dir(d)}/data"


def repo(name: str) -> str:
    return f"{REPOSITORIES}/{name}"


def layer_link(name: str, d: Digest) -> str:
    return f"{repo(name)}/_layers/{d.algorithm}/{d.hex}/link"


def layers(name: str) -> str:
    return f"{repo(name)}/_layers"


def manifests(name: str) -> str:
    return f"{repo(name)}/_manifests"


def manifests_lock(name: str) -> str:
    """regserve's own: owned by whoever changes the repository's manifests or tags."""
    return f"{repo(name)}/_manifests/lock"


def revision_link(name: str, d: Digest) -> str:
    return f"{repo(name)}/_manifests/revisions/{d.algorithm}/{d.hex}/link"


def revisions(name: str) -> str:
    return f"{repo(name)}/_manifests/revisions"


def tags(name: str) -> str:
    return f"{repo(name)}/_manifests/tags"


def tag_dir(name: str, tag: str) -> str:
    return f"{tags(name)}/{tag}"


def tag_current(name: str, tag: str) -> str:
    return f"{tag_dir(name, tag)}/current/link"


def tag_index_link(name: str, tag: str, d: Digest) -> str:
    return f"{tag_dir(name, tag)}/index/{d.algorithm}/{d.hex}/link"


def uploads(name: str) -> str:
    return f"{repo(name)}/_uploads"


def upload_dir(name: str, upload_id: str) -> str:
    return f"{uploads(name)}/{upload_id}"


def upload_data(name: str, upload_id: str) -> str:
    return f"{upload_dir(name, upload_id)}/data"


def upload_startedat(name: str, upload_id: str) -> str:
    return f"{upload_dir(name, upload_id)}/startedat"


def upload_hashstates(name: str, upload_id: str, algorithm: str) -> str:
    return f"{upload_dir(name, upload_id)}/hashstates/{algorithm}"


def referrers(name: str, subject: Digest) -> str:
    return f"{repo(name)}/_refs/subjects/{subject.algorithm}/{subject.hex}"


def referrer_link(name: str, subject: Digest, d: Digest) -> str:
    return f"{referrers(name, subject)}/{d.algorithm}/{d.hex}/link"
