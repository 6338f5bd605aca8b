"""GET /v2/, spec headers and error bodies for routes that do not exist."""


async def test_version_check(client):
    r = await client.get("/v2/")
    assert r.status == 200
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert await r.json() == {}


async def test_version_check_without_slash(client):
    r = await client.get("/v2")
    assert r.status == 200


async def test_unknown_route_gets_json_error(client):
    r = await client.get("/v1/_ping")
    assert r.status == 404
    body = await r.json()
    assert body["errors"][0]["code"]
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_wrong_method_is_unsupported(client):
    r = await client.post("/v2/foo/tags/list")
    assert r.status == 405
    assert (await r.json())["errors"][0]["code"] == "UNSUPPORTED"


async def test_configured_headers_are_sent(aiohttp_client, tmp_path, data_dir):
    from regserve import config
    from regserve.api import make_app
    cfg = tmp_path / "config.yml"
    cfg.write_text(f"""version: 0.1
http:
  addr: 127.0.0.1:0
  headers:
    X-Content-Type-Options: [nosniff]
storage:
  filesystem:
    rootdirectory: {data_dir}
""")
    c = await aiohttp_client(make_app(config.load(str(cfg), {})))
    r = await c.get("/v2/")
    assert r.headers["X-Content-Type-Options"] == "nosniff"


async def test_http_prefix_mounts_the_api(aiohttp_client, app_factory):
    c = await aiohttp_client(app_factory(REGISTRY_HTTP_PREFIX="/registry/"))
    assert (await c.get("/registry/v2/")).status == 200
    assert (await c.get("/v2/")).status == 404
    r = await c.post("/registry/v2/foo/blobs/uploads/")
    assert r.status == 202 and r.headers["Location"].startswith("/registry/v2/foo/blobs/uploads/")
    r = await c.patch(r.headers["Location"], data=b"abc")
    assert r.status == 202
