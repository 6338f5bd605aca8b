"""Spec error bodies and statuses, in one place."""

from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web

from ..errors import ManifestTooBig, ReadOnly, RegistryError, Unauthorized, UploadRangeInvalid

log = logging.getLogger("regserve.api")
CLIENT_CLOSED_REQUEST = 499  # nginx's and distribution's status for a request its client abandoned

STATUS = {
    "BLOB_UNKNOWN": 404, "BLOB_UPLOAD_INVALID": 400, "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400, "MANIFEST_BLOB_UNKNOWN": 400, "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404, "NAME_INVALID": 400, "NAME_UNKNOWN": 404, "SIZE_INVALID": 400,
    "TAG_INVALID": 400, "UNAUTHORIZED": 401, "DENIED": 403, "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429, "PAGINATION_NUMBER_INVALID": 400, "UNKNOWN": 500,
}


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": detail}]}).encode()


def error_response(err: RegistryError, headers: dict[str, str] | None = None) -> web.Response:
    status = STATUS.get(err.code, 500)
    hdrs = dict(headers or {})
    if isinstance(err, UploadRangeInvalid):
        status = 416
        hdrs["Range"] = f"0-{max(err.offset - 1, 0)}"
    elif isinstance(err, ManifestTooBig):
        status = 413
    elif isinstance(err, ReadOnly):
        status = 405
    if isinstance(err, Unauthorized) and err.challenge:
        hdrs["WWW-Authenticate"] = err.challenge
    return web.Response(status=status, body=error_body(err.code, err.message, err.detail),
                        content_type="application/json", headers=hdrs)


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
        return web.Response(status=404, body=error_body("NOT_FOUND", "no such route",
                                                        {"path": request.path}),
                            content_type="application/json")
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
        return web.Response(status=500, body=error_body("UNKNOWN", "storage error", str(err)),
                            content_type="application/json")
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return web.Response(status=500, body=error_body("UNKNOWN", "internal error"),
                            content_type="application/json")
