"""Registry errors, named by the spec's error codes. The HTTP layer maps them to statuses.

Every code is one of the fourteen the OCI Distribution Spec allows ("The code field MUST be one
of the following"); conditions the spec has no code for borrow the closest one, and say what
happened in their message."""

from __future__ import annotations

from typing import Any


class RegistryError(Exception):
    code = "UNKNOWN"
    message = "unknown error"

    def __init__(self, detail: Any = None, message: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message or self.message)
        self.detail = detail
        self.headers = headers or {}  # for the HTTP answer (Content-Range of a 416, say)
        if message:
            self.message = message


class DamagedContent(Exception):
    """Stored data that cannot be what was written (a link that names no digest, a stored
    manifest that does not parse). Never taken for "not found": deletes and garbage collection
    would act on that. The API answers 500 and logs it."""


class BlobUnknown(RegistryError):
    code, message = "BLOB_UNKNOWN", "blob unknown to registry"


class BlobUploadInvalid(RegistryError):
    code, message = "BLOB_UPLOAD_INVALID", "blob upload invalid"


class UploadRangeInvalid(BlobUploadInvalid):
    """A chunk that does not start at the session's current offset (HTTP 416)."""

    message = "chunk out of order: the upload continues at the reported range"

    def __init__(self, offset: int, detail: Any = None) -> None:
        super().__init__(detail)
        self.offset = offset


class BlobUploadUnknown(RegistryError):
    code, message = "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry"


class DigestInvalid(RegistryError):
    code, message = "DIGEST_INVALID", "provided digest did not match uploaded content"


class ManifestBlobUnknown(RegistryError):
    code, message = "MANIFEST_BLOB_UNKNOWN", "manifest references a manifest or blob unknown to registry"


class ManifestInvalid(RegistryError):
    code, message = "MANIFEST_INVALID", "manifest invalid"


class ManifestTooBig(ManifestInvalid):
    message = "manifest exceeds the size limit"


class ManifestUnknown(RegistryError):
    code, message = "MANIFEST_UNKNOWN", "manifest unknown to registry"


class NameInvalid(RegistryError):
    code, message = "NAME_INVALID", "invalid repository name"


class NameUnknown(RegistryError):
    code, message = "NAME_UNKNOWN", "repository name not known to registry"


class SizeInvalid(RegistryError):
    code, message = "SIZE_INVALID", "provided length did not match content length"


class TagInvalid(RegistryError):
    code, message = "MANIFEST_INVALID", "invalid tag"  # distribution's TAG_INVALID is not the spec's


class Unsupported(RegistryError):
    code, message = "UNSUPPORTED", "the operation is unsupported"


class ReadOnly(Unsupported):
    message = "the registry is in read-only mode"


class PaginationInvalid(RegistryError):
    code, message = "UNSUPPORTED", "invalid number of results requested"  # 400, not 405


class RangeNotSatisfiable(RegistryError):
    code, message = "UNSUPPORTED", "requested range not satisfiable"  # 416 on a blob GET


class NoSuchEndpoint(RegistryError):
    code, message = "UNSUPPORTED", "no such endpoint"  # 404


class MalformedRequest(RegistryError):
    """What the HTTP parser or the router could make nothing of."""
    code, message = "UNSUPPORTED", "malformed request"


class Unauthorized(RegistryError):
    code, message = "UNAUTHORIZED", "authentication required"

    def __init__(self, detail: Any = None, message: str | None = None, challenge: str | None = None) -> None:
        super().__init__(detail, message)
        self.challenge = challenge  # the WWW-Authenticate value to answer with


class Denied(RegistryError):
    code, message = "DENIED", "requested access to the resource is denied"


class UpstreamFailed(RegistryError):
    """A pull-through cache's upstream could not be reached, or failed, and nothing cached can
    answer instead (502)."""
    code, message = "UNKNOWN", "the upstream registry could not be reached"


class TooManyRequests(RegistryError):
    code, message = "TOOMANYREQUESTS", "too many requests"
