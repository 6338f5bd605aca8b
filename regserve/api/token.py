"""The built-in token server (Docker token spec): GET /token with Basic credentials, and the
OAuth2 POST /token with the password and refresh_token grants."""

from __future__ import annotations

from aiohttp import web

from ..auth.scopes import parse_scopes
from ..auth.tokens import TokenError
from ..errors import Unauthorized
from .auth import CONTROLLER_KEY, ISSUER_KEY
from .errors import error_response


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _unknown_service(service: str, known: str) -> web.Response | None:
    if service != known:
        return _oauth_error(400, "invalid_request", f"unknown service {service!r}")
    return None


def _token_body(token: str, expires_in: int, issued_at: str) -> dict:
    """Both spellings: `token` (Docker's token spec) and `access_token` (OAuth2)."""
    return {"token": token, "access_token": token, "expires_in": expires_in, "issued_at": issued_at}


async def get_token(request: web.Request) -> web.Response:
    controller, issuer = request.app[CONTROLLER_KEY], request.app[ISSUER_KEY]
    service = request.query.get("service", controller.service)
    if (refused := _unknown_service(service, controller.service)) is not None:
        return refused
    try:
        user = await controller.login(request.headers.get("Authorization"), request.remote or "")
    except Unauthorized as err:
        return error_response(err)
    access = controller.grantable(user, parse_scopes(request.query.getall("scope", [])))
    body = _token_body(*issuer.issue(user or "", service, access))
    if user and request.query.get("offline_token") == "true":
        body["refresh_token"] = _refresh_token(request, user, service)
    return web.json_response(body)


def _refresh_token(request: web.Request, user: str, service: str) -> str:
    htpasswd = request.app[CONTROLLER_KEY].htpasswd
    assert htpasswd is not None  # a user logged in against it
    return request.app[ISSUER_KEY].refresh_token(user, service, htpasswd.fingerprint(user) or "")


async def post_token(request: web.Request) -> web.Response:
    controller, issuer = request.app[CONTROLLER_KEY], request.app[ISSUER_KEY]
    form = await request.post()
    service = str(form.get("service", controller.service))
    if (refused := _unknown_service(service, controller.service)) is not None:
        return refused
    grant = form.get("grant_type")
    if grant == "password":
        user = str(form.get("username", ""))
        if not user or controller.htpasswd is None or not await controller.htpasswd.verify(
                user, str(form.get("password", "")), client=request.remote or ""):
            return _oauth_error(401, "invalid_grant", "invalid username or password")
    elif grant == "refresh_token":
        try:
            user, credential = issuer.check_refresh(str(form.get("refresh_token", "")), service)
        except TokenError as e:
            return _oauth_error(401, "invalid_grant", str(e))
        if controller.htpasswd is None or controller.htpasswd.fingerprint(user) != credential:
            return _oauth_error(401, "invalid_grant", "the password changed or the user was removed")
    else:
        return _oauth_error(400, "unsupported_grant_type", "use grant_type password or refresh_token")
    access = controller.grantable(user, parse_scopes([str(form.get("scope", ""))]))
    body = {**_token_body(*issuer.issue(user, service, access)),
            "scope": " ".join(a.scope() for a in access)}
    if form.get("access_type") == "offline":
        body["refresh_token"] = _refresh_token(request, user, service)
    elif grant == "refresh_token":
        body["refresh_token"] = str(form.get("refresh_token"))
    return web.json_response(body)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/token", get_token)
    app.router.add_post("/token", post_token)
