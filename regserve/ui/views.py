"""The UI's pages. Each handler decides who is looking (the API's access controller: Basic
credentials from the htpasswd file, or anonymous), asks the inventory, renders a template.

A repository the viewer may not pull does not exist for them: it is left out of lists and its
pages answer 404, as for a name nobody pushed. A tag is deleted through a confirmation page
whose form posts back to the same origin; a post from anywhere else is refused (CSRF)."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

import jinja2
from aiohttp import web

from ..api import events
from ..api.auth import CONTROLLER_KEY, IDENTITY_KEY
from ..api.common import CONFIG_KEY, REGISTRY_KEY
from ..auth import AccessController, Identity
from ..config import Config
from ..errors import (
    Denied,
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    TooManyRequests,
    Unauthorized,
    Unsupported,
)
from ..reference import TAG_RE, Digest, check_name, parse_digest
from ..registry import Repository
from ..registry.inventory import IMAGE_CONFIGS, Inventory, RepositoryOverview, Summary, log_failure
from ..registry.manifests import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST

INVENTORY_KEY = web.AppKey("inventory", Inventory)
TEMPLATES_KEY = web.AppKey("ui_templates", jinja2.Environment)
REPOSITORIES_PER_PAGE = 50
TAGS_PER_PAGE = 100
PAGE_BUDGET = 0.15    # seconds a page waits for sizes not cached yet (see within_budget)
USAGE_MAX_AGE = 60.0  # seconds a count of storage used is shown before a new one starts
# Pages load nothing from anywhere else, run no inline script, and cannot be framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
KINDS = {OCI_MANIFEST: "OCI image", OCI_INDEX: "OCI index", DOCKER_MANIFEST: "Docker image",
         DOCKER_LIST: "Docker manifest list"}
# Artifact types people know by what they are for (referrers are grouped by these).
PURPOSES = (("signature", "Signatures"), (".sig.", "Signatures"), ("spdx", "SBOMs"), ("cyclonedx", "SBOMs"),
            ("sbom", "SBOMs"), ("in-toto", "Attestations"), ("attestation", "Attestations"),
            ("provenance", "Attestations"), ("vuln", "Vulnerability reports"))
STATIC = {"ui.css": "text/css", "ui.js": "text/javascript"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")
log = logging.getLogger("regserve.ui")


@dataclass
class Viewer:
    user: str | None
    controller: AccessController | None

    def may(self, name: str, action: str) -> bool:
        return self.controller is None or action in self.controller.allowed_actions(self.user, name)

    @property
    def can_sign_in(self) -> bool:
        return self.user is None and self.controller is not None and self.controller.htpasswd is not None


class NotFound(Exception):
    """A page that does not exist for this viewer."""


async def viewer_of(request: web.Request) -> Viewer:
    controller = request.app.get(CONTROLLER_KEY)
    if controller is None:
        return Viewer(None, None)
    user = await controller.login(request.headers.get("Authorization"), request.remote or "")
    return Viewer(user, controller)


def render(request: web.Request, template: str, status: int = 200,
           headers: dict[str, str] | None = None, **context: Any) -> web.Response:
    html = request.app[TEMPLATES_KEY].get_template(template).render(request=request, **context)
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8",
                        headers={**SECURITY_HEADERS, **(headers or {})})


def page(handler: Callable[[web.Request, Viewer], Awaitable[web.StreamResponse]]) -> Handler:
    """A page handler: who is looking, and errors as pages (never the API's JSON)."""
    @functools.wraps(handler)
    async def run(request: web.Request) -> web.StreamResponse:
        viewer = Viewer(None, None)
        try:
            viewer = await viewer_of(request)
            return await handler(request, viewer)
        except Unauthorized as err:
            return render(request, "error.html", 401, {"WWW-Authenticate": err.challenge or 'Basic realm="regserve"'},
                          viewer=viewer, title="Sign in", message=err.message)
        except (NotFound, NameInvalid, NameUnknown, ManifestUnknown, DigestInvalid):
            return render(request, "error.html", 404, viewer=viewer, title="Not found",
                          message="There is nothing here, or nothing you may see.")
        except (Denied, Unsupported) as err:  # ReadOnly is one
            return render(request, "error.html", 403, viewer=viewer, title="Not allowed", message=err.message)
        except TooManyRequests:
            return render(request, "error.html", 429, {"Retry-After": "1"}, viewer=viewer, title="Busy",
                          message="The repository is busy; try again in a moment.")
        except web.HTTPException:
            raise  # redirects
        except Exception:  # a storage error: what and where go to the log, never to the page
            log.exception("page %s failed", request.path)
            return render(request, "error.html", 500, viewer=viewer, title="Something went wrong",
                          message="The page could not be made; the registry's log says why.")
    return run


def visible_repository(request: web.Request, viewer: Viewer) -> str:
    try:
        name = check_name(request.match_info["name"])
    except NameInvalid:
        raise NotFound() from None
    if not viewer.may(name, "pull"):
        raise NotFound()
    return name


def paged(items: list[T], number: int, per_page: int) -> tuple[list[T], int]:
    """Page `number` (from 1) of `items`, and how many pages there are."""
    return items[(number - 1) * per_page:number * per_page], max(1, math.ceil(len(items) / per_page))


def page_number(request: web.Request) -> int:
    try:
        return max(1, int(request.query.get("page", "1")))
    except ValueError:
        return 1


def pull_host(request: web.Request) -> str:
    """The registry's address as clients name it in `docker pull`."""
    config = request.app[CONFIG_KEY]
    if config.host:
        return urlsplit(config.host).netloc or config.host
    return request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()


def label(summary: Summary) -> str:
    """What a manifest is: an artifact's type, else the kind of image or index."""
    if summary.damaged:
        return "unreadable manifest (see the registry's log)"
    if summary.artifact_type and summary.artifact_type not in IMAGE_CONFIGS:
        return summary.artifact_type
    return KINDS.get(summary.media_type, summary.media_type)


def created(summary: Summary, children: dict[Digest, Summary]) -> str | None:
    """When an image was built; for an index, its newest platform's build."""
    if not summary.is_index:
        return summary.created
    times = [children[c.digest].created for c in summary.children if c.digest in children]
    return max((t for t in times if t), default=None)


def purpose_of(artifact_type: str) -> str:
    lowered = artifact_type.lower()
    for word, purpose in PURPOSES:
        if word in lowered:
            return purpose
    return "Other artifacts"


# -- pages ---------------------------------------------------------------------------------------

@page
async def repositories(request: web.Request, viewer: Viewer) -> web.Response:
    inventory = request.app[INVENTORY_KEY]
    query = request.query.get("q", "").strip().lower()
    number = page_number(request)
    wanted = number * REPOSITORIES_PER_PAGE + 1
    listed, complete = [], True
    if not query:  # the first look after a start need not wait for a walk of thousands of names
        listed, complete = await inventory.first_names(wanted)
        complete = complete or len(listed) < wanted  # that was all of them
    names = [n for n in listed if viewer.may(n, "pull")]
    if query or (not complete and len(names) < wanted):  # a search, or a page the policy left short
        listed, complete = await inventory.names(), True
        names = [n for n in listed if viewer.may(n, "pull") and query in n]
    shown, pages = paged(names, number, REPOSITORIES_PER_PAGE)
    found = await within_budget({n: _overview_or_none(inventory, n) for n in shown})
    rows = [(n, found.get(n)) for n in shown if n not in found or found[n] is not None]  # not: deleted
    if not complete:  # how many there are is not known yet: a next page if the walk went past this one
        pages = number + 1 if len(listed) > number * REPOSITORIES_PER_PAGE else number
    return render(request, "repositories.html", viewer=viewer, title="Repositories", query=query,
                  rows=rows, pending=len(found) < len(shown) or not complete,
                  total=len(names) if complete else None, page=number, pages=pages)


async def _overview_or_none(inventory: Inventory, name: str) -> RepositoryOverview | None:
    try:
        return await inventory.overview(name)
    except NameUnknown:
        return None  # deleted since the names were walked


async def within_budget(work: dict[str, Awaitable[T]]) -> dict[str, T]:
    """What of `work` is done within PAGE_BUDGET. The rest goes on behind the page, filling the
    caches the next look finds it in: a page's first look after a restart, at repositories of
    thousands of manifests, is not held up by reading every one of them."""
    tasks = {key: asyncio.ensure_future(w) for key, w in work.items()}
    if tasks:
        await asyncio.wait(tasks.values(), timeout=PAGE_BUDGET)
    done = {}
    for key, task in tasks.items():
        if task.done():
            done[key] = task.result()
        else:
            task.add_done_callback(log_failure)
    return done


@page
async def repository(request: web.Request, viewer: Viewer) -> web.Response:
    name = visible_repository(request, viewer)
    inventory = request.app[INVENTORY_KEY]
    registry = request.app[REGISTRY_KEY]
    all_tags = await registry.repository(name).tags.all()
    overview = (await within_budget({name: inventory.overview(name, all_tags)})).get(name)
    query = request.query.get("q", "").strip()
    tags = [t for t in all_tags if query in t]
    number = page_number(request)
    shown, pages = paged(tags, number, TAGS_PER_PAGE)
    infos = await inventory.tags(name, shown)
    children = await inventory.summaries([c.digest for i in infos if i.summary for c in i.summary.children])
    usage = inventory.last_usage  # counted for the storage page: a count costs a walk of everything
    return render(request, "repository.html", viewer=viewer, title=name, name=name, overview=overview,
                  tag_count=len(all_tags), tags=infos, children=children, query=query, page=number,
                  total=len(tags), pages=pages, host=pull_host(request),
                  shared=usage.shared(name) if usage else None,
                  may_delete=viewer.may(name, "delete") and registry.delete_enabled and not registry.readonly
                  and not registry.proxied,
                  deleted=request.query.get("deleted"), image_size=functools.partial(_image_size, inventory))


def _image_size(inventory: Inventory, summary: Summary, children: dict[Digest, Summary]) -> int:
    return inventory.index_size(summary, children) if summary.is_index else summary.image_size


@page
async def manifest(request: web.Request, viewer: Viewer) -> web.Response:
    name = visible_repository(request, viewer)
    inventory = request.app[INVENTORY_KEY]
    d = parse_digest(request.match_info["digest"])
    repo = request.app[REGISTRY_KEY].repository(name)
    d, payload, _ = await repo.manifests.get(str(d))  # in this repository, or MANIFEST_UNKNOWN
    summary = await inventory.summary(d)
    children = await inventory.summaries([c.digest for c in summary.children])
    groups: dict[str, list[tuple[str, list[Summary]]]] = {}
    for artifact_type, found in (await inventory.referrers(name, d)).items():
        groups.setdefault(purpose_of(artifact_type), []).append((artifact_type, found))
    try:
        raw = json.dumps(json.loads(payload), indent=2)
    except ValueError:
        raw = payload.decode(errors="replace")
    tag = request.query.get("tag")  # the tag it was reached by, named only while it points here
    if tag is not None and not (TAG_RE.fullmatch(tag) and await _points_to(repo, tag, d)):
        tag = None
    return render(request, "manifest.html", viewer=viewer, title=f"{name}@{d}", name=name, summary=summary,
                  children=children, referrers=dict(sorted(groups.items())), raw=raw, host=pull_host(request),
                  size=_image_size(inventory, summary, children), tag=tag)


async def _points_to(repo: Repository, tag: str, d: Digest) -> bool:
    try:
        return await repo.tags.resolve(tag) == d
    except ManifestUnknown:
        return False


@page
async def delete_tag(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """GET: the confirmation; POST (from this origin): the deletion."""
    name = visible_repository(request, viewer)
    tag = request.match_info["tag"]
    if not TAG_RE.fullmatch(tag):
        raise NotFound()
    registry = request.app[REGISTRY_KEY]
    if not viewer.may(name, "delete"):
        raise Denied(None, "You may not delete tags in this repository.")
    registry.check_deletable()
    repo = registry.repository(name)
    d = await repo.tags.resolve(tag)
    if request.method == "POST":
        if not same_origin(request):
            raise Denied(None, "The request did not come from this registry's pages.")
        await repo.manifests.delete(tag)
        request[IDENTITY_KEY] = Identity(viewer.user)  # the event's actor, as for the API's DELETE
        events.emit(request, "delete", {"repository": name, "tag": tag})
        raise web.HTTPSeeOther(ui_url(request, f"/repo/{name}?deleted={tag}"))
    return render(request, "delete.html", viewer=viewer, title=f"Delete {name}:{tag}", name=name, tag=tag,
                  digest=d)


def same_origin(request: web.Request) -> bool:
    """A browser's post says where it comes from (Origin, Sec-Fetch-Site); one from another
    site is refused. A client that is not a browser sends neither and forges nothing."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
    return urlsplit(origin).netloc == host


@page
async def storage(request: web.Request, viewer: Viewer) -> web.Response:
    inventory = request.app[INVENTORY_KEY]
    usage = inventory.usage(USAGE_MAX_AGE)
    if usage is None:
        return render(request, "storage.html", viewer=viewer, title="Storage used", usage=None,
                      headers={"Refresh": "2"})
    names = sorted((n for n in usage.repositories if viewer.may(n, "pull")), key=lambda n: (-usage.sizes[n], n))
    number = page_number(request)
    shown, pages = paged(names, number, REPOSITORIES_PER_PAGE)
    return render(request, "storage.html", viewer=viewer, title="Storage used", usage=usage,
                  rows=[(n, usage.sizes[n], usage.shared(n)) for n in shown], total=usage.total(names),
                  age=inventory.clock() - usage.taken_at, count=len(names), page=number, pages=pages)


@page
async def sign_in(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """Ask the browser for credentials (Basic), then go back to the repositories."""
    if viewer.user is None and viewer.controller is not None and viewer.controller.htpasswd is not None:
        raise Unauthorized(None, "Sign in with your registry user name and password.",
                           challenge=f'Basic realm="{viewer.controller.realm or "regserve"}"')
    raise web.HTTPSeeOther(ui_url(request, "/"))


async def static(request: web.Request) -> web.Response:
    name = request.match_info["file"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    body = request.app[STATIC_KEY][name]
    return web.Response(body=body, content_type=STATIC[name],
                        headers={**SECURITY_HEADERS, "Cache-Control": "public, max-age=86400"})


# -- wiring --------------------------------------------------------------------------------------

STATIC_KEY = web.AppKey("ui_static", dict)


def ui_url(request: web.Request, path: str) -> str:
    config = request.app[CONFIG_KEY]
    return f"{config.prefix}{config.ui_path}{path}"


def _filters(env: jinja2.Environment) -> None:
    def size(n: int | None) -> str:
        if n is None:
            return "—"
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if n < 1024 or unit == "TiB":
                return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            n /= 1024  # type: ignore[assignment]
        return ""

    def when(t: float | str | None) -> str:
        if t is None:
            return "—"
        if isinstance(t, str):
            try:
                t = dt.datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
            except ValueError:
                return t
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def short(d: Digest | str) -> str:
        text = str(d)
        return text[:text.index(":") + 13] if ":" in text else text[:12]

    env.filters.update(size=size, when=when, short=short, kind=lambda mt: KINDS.get(mt, mt))


def setup(app: web.Application, config: Config) -> None:
    """Add the UI's routes below `config.ui_path` (left out when `ui.enabled` is false)."""
    if not config.ui_enabled:
        return
    env = jinja2.Environment(loader=jinja2.PackageLoader("regserve.ui", "templates"),
                             autoescape=jinja2.select_autoescape(default=True), trim_blocks=True,
                             lstrip_blocks=True)
    _filters(env)
    files = {name: resources.files("regserve.ui").joinpath("static", name).read_bytes() for name in STATIC}
    version = hashlib.sha256(b"".join(files.values())).hexdigest()[:12]  # new files, new URLs
    base = config.prefix + config.ui_path
    env.globals.update(ui=lambda path="/": base + path, static=lambda f: f"{base}/static/{f}?v={version}",
                       label=label, created=created)
    app[TEMPLATES_KEY] = env
    app[STATIC_KEY] = files
    app[INVENTORY_KEY] = Inventory(app[REGISTRY_KEY])
    root = config.ui_path
    app.router.add_get(root, repositories)
    app.router.add_get(root + "/", repositories)
    app.router.add_get(root + "/storage", storage)
    app.router.add_get(root + "/login", sign_in)
    app.router.add_get(root + "/static/{file}", static)
    app.router.add_get(root + "/repo/{name:.+}/-/manifest/{digest}", manifest)
    app.router.add_get(root + "/repo/{name:.+}/-/tag/{tag}/delete", delete_tag)
    app.router.add_post(root + "/repo/{name:.+}/-/tag/{tag}/delete", delete_tag)
    app.router.add_get(root + "/repo/{name:.+}", repository)
