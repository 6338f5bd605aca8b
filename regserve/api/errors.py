"""Spec error bodies and statuses, in one place.

Every answer that is not a success carries the spec's body, `{"errors": [{code, message, detail}]}`,
with one of the spec's fourteen codes: registry errors, routes that do not exist, requests the
HTTP parser rejects (see connections.py). A 500 says only that something failed inside: the
details (file paths, errno texts) go to the log, never to the client.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Awaitable, Callable

from aiohttp import web

from ..errors import (
    DamagedContent,
    MalformedRequest,
    ManifestTooBig,
    NameInvalid,
    NoSuchEndpoint,
    PaginationInvalid,
    RangeNotSatisfiable,
    ReadOnly,
    RegistryError,
    Unauthorized,
    UploadRangeInvalid,
    UpstreamFailed,
)
from ..reference import check_name
from ..storage import CommitMismatch

log = logging.getLogger("regserve.api")
CLIENT_CLOSED_REQUEST = 499  # nginx's and distribution's status for a request its client abandoned
DETAIL_TEXT = 256  # longest string echoed back in a detail: what a client sent, not a mirror of it

STATUS = {
    "BLOB_UNKNOWN": 404, "BLOB_UPLOAD_INVALID": 400, "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400, "MANIFEST_BLOB_UNKNOWN": 400, "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404, "NAME_INVALID": 400, "NAME_UNKNOWN": 404, "SIZE_INVALID": 400,
    "UNAUTHORIZED": 401, "DENIED": 403, "UNSUPPORTED": 405, "TOOMANYREQUESTS": 429, "UNKNOWN": 500,
}
# Registry errors whose status is not their code's usual one.
SPECIAL_STATUS: dict[type, int] = {UploadRangeInvalid: 416, RangeNotSatisfiable: 416, ManifestTooBig: 413,
                                   ReadOnly: 405, PaginationInvalid: 400, MalformedRequest: 400,
                                   NoSuchEndpoint: 404, UpstreamFailed: 502}
# A path of the API's shape, `/v2/<name>/<resource>/...`, whose name the router could not take.
_API_PATH = re.compile(r"/v2/(?P<name>.+)/(?:blobs|manifests|tags|referrers)(?:/.*)?", re.DOTALL)


def _clip(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= DETAIL_TEXT else value[:DETAIL_TEXT] + "..."
    if isinstance(value, dict):
        return {k: _clip(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clip(v) for v in value[:64]]
    return value


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": _clip(detail)}]}).encode()


def status_of(err: RegistryError) -> int:
    for kind, status in SPECIAL_STATUS.items():
        if isinstance(err, kind):
            return status
    return STATUS.get(err.code, 500)


def error_response(err: RegistryError, headers: dict[str, str] | None = None) -> web.Response:
    hdrs = {**err.headers, **(headers or {})}
    if isinstance(err, UploadRangeInvalid):
        hdrs["Range"] = f"0-{max(err.offset - 1, 0)}"
    if isinstance(err, Unauthorized) and err.challenge:
        hdrs["WWW-Authenticate"] = err.challenge
    return web.Response(status=status_of(err), body=error_body(err.code, err.message, err.detail),
                        content_type="application/json", headers=hdrs)


def internal_error() -> web.Response:
    return web.Response(status=500, body=error_body("UNKNOWN", "internal error"),
                        content_type="application/json")


def unmatched(request: web.Request) -> RegistryError:
    """What a path the router matches no route for is, in the spec's terms: a name that breaks
    the grammar where the API expects one (NAME_INVALID), else an endpoint that does not exist."""
    api = _API_PATH.fullmatch(request.path)
    if api is not None:
        try:
            check_name(api.group("name"))
        except NameInvalid as err:
            return err
    return NoSuchEndpoint({"path": request.path})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RegistryError as err:
        return error_response(err)
    except web.HTTPMethodNotAllowed as err:
        return web.Response(status=405, body=error_body("UNSUPPORTED", "the operation is unsupported",
                                                        {"method": request.method}),
                            content_type="application/json",
                            headers={"Allow": err.headers.get("Allow", "")})
    except web.HTTPNotFound:
        return error_response(unmatched(request))
    except web.HTTPException:
        raise
    except (ConnectionError, OSError) as err:
        if request.transport is None or request.transport.is_closing():
            # The client went away (a cut-off PATCH keeps what arrived: it can resume). No one
            # reads the answer; 499, as distribution records it, goes to the access log.
            log.info("client disconnected during %s %s: %s", request.method, request.path,
                     str(err) or type(err).__name__)
            return web.Response(status=CLIENT_CLOSED_REQUEST)
        log.exception("storage error on %s %s", request.method, request.path)
        return internal_error()
    except (DamagedContent, CommitMismatch) as err:
        log.error("%s %s: %s", request.method, request.path, err)
        return internal_error()
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return internal_error()
