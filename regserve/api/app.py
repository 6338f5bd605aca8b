"""The aiohttp application: routes, spec headers, error bodies."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from .. import notifications, ui
from ..config import Config
from ..logs import request_id_header, request_id_middleware
from ..proxy.cache import PullThrough
from ..proxy.upstream import Upstream
from ..registry import Registry
from ..storage import StorageDriver, create_driver
from ..storage.checked import CheckedDriver
from . import auth, base, blobs, catalog, manifests, referrers, tags, token, uploads
from .common import API_VERSION, CONFIG_KEY, PROXY_KEY, REGISTRY_KEY
from .errors import error_middleware
from .events import NOTIFIER_KEY

# How connections are served: handlers finish even if the client leaves (an upload keeps what
# arrived), large reads, and bodies kept as sent: a blob is opaque, so a Content-Encoding header
# must not make aiohttp decompress it (its digest is of the bytes sent).
RUNNER_OPTIONS = {"handler_cancellation": False, "read_bufsize": 1 << 20, "auto_decompress": False}
# aiohttp holds up to twice read_bufsize of each body before it stops reading: outside any
# budget, for every push waiting for room. The filesystem's pushes (1 GB/s) want large reads;
# S3's (~200 MB/s) do not: 32 concurrent pushes on one worker peaked at 590 MB with 1 MiB,
# 438 MB with 256 KiB (8 pushes: 437 and 372), at the same rate; smaller was no better.
READ_BUFSIZE = {"s3": 256 << 10}


def runner_options(config: Config) -> dict[str, Any]:
    """RUNNER_OPTIONS, with the read size suited to the storage driver."""
    return {**RUNNER_OPTIONS, "read_bufsize": READ_BUFSIZE.get(config.storage_driver, RUNNER_OPTIONS["read_bufsize"])}


def make_registry(config: Config, driver: StorageDriver | None = None) -> Registry:
    driver = CheckedDriver(driver or create_driver(config.storage_driver, config.storage_params))
    return Registry(driver, delete_enabled=config.delete_enabled, readonly=config.readonly,
                    proxied=config.proxy_url is not None)


def make_app(config: Config, registry: Registry | None = None,
             clock: Callable[[], float] = time.time) -> web.Application:
    app = web.Application(middlewares=[request_id_middleware, error_middleware, auth.auth_middleware],
                          client_max_size=4 << 20)
    controller, issuer = auth.build(config, clock)
    if controller is not None:
        app[auth.CONTROLLER_KEY] = controller
    if issuer is not None:
        app[auth.ISSUER_KEY] = issuer
        token.setup_routes(app)
    app[CONFIG_KEY] = config
    app[REGISTRY_KEY] = registry or make_registry(config)
    if config.proxy_url:
        pull_through = app[PROXY_KEY] = PullThrough(
            app[REGISTRY_KEY], Upstream(config.proxy_url, config.proxy_username, config.proxy_password))

        async def close_proxy(app: web.Application) -> None:
            await pull_through.close()
        app.on_cleanup.append(close_proxy)
    if config.notifications:
        notifier = app[NOTIFIER_KEY] = notifications.Notifier(config.notifications, config.notify_references,
                                                              config.addr)

        async def notify(app: web.Application) -> AsyncIterator[None]:
            await notifier.start()
            yield
            await notifier.stop()
        app.cleanup_ctx.append(notify)
    extra = [(k, v) for k, values in config.headers.items() for v in values]

    async def spec_headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[API_VERSION[0]] = API_VERSION[1]
        request_id_header(request, response)
        for k, v in extra:
            response.headers.add(k, v)

    async def close_driver(app: web.Application) -> None:
        await app[REGISTRY_KEY].driver.close()

    app.on_response_prepare.append(spec_headers)
    app.on_cleanup.append(close_driver)
    # Order matters where patterns overlap: the most specific resources first.
    for module in (base, catalog, uploads, blobs, manifests, tags, referrers):
        module.setup_routes(app)
    ui.setup(app, config)
    if config.prefix:  # http.prefix: the API lives below it, as in distribution
        root = web.Application()
        root.add_subapp(config.prefix, app)
        return root
    return app
