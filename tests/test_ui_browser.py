"""The web UI in a real browser: Debian's chromium, headless, driven by selenium, against a
regserve process holding images skopeo pushed (one platform, two platforms, a signature
referring to an image). What the pages show is checked against the pushed layouts' own bytes;
the policy, a tag deletion, dark mode and a phone-sized screen are checked as a person meets
them. Every page's screenshot is saved (REGSERVE_SCREENSHOTS, else tests/screenshots/)."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from .authutil import basic, htpasswd_file
from .conftest import ROOT, http, require_tool
from .oci_layout import CREATED, build_image, build_index, build_referrer
from .test_e2e_skopeo import skopeo
from .test_ui import POLICY, SIGNATURE

SCREENSHOTS = Path(os.environ.get("REGSERVE_SCREENSHOTS", ROOT / "tests" / "screenshots"))


def layout_sizes(layout: Path, digest: str, seen: dict[str, int] | None = None) -> dict[str, int]:
    """Every blob a manifest in an OCI layout keeps (itself, config, layers; an index's
    children too), each with its size on disk."""
    seen = {} if seen is None else seen
    path = layout / "blobs" / "sha256" / digest.split(":")[1]
    seen[digest] = path.stat().st_size
    doc = json.loads(path.read_bytes())
    for desc in [doc.get("config"), *doc.get("layers", [])]:
        if desc:
            seen[desc["digest"]] = (layout / "blobs" / "sha256" / desc["digest"].split(":")[1]).stat().st_size
    for child in doc.get("manifests", []):
        layout_sizes(layout, child["digest"], seen)
    return seen


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[dict[str, Any]]:
    require_tool("skopeo", "real client for end-to-end tests")
    require_tool("chromium", "the UI tests' browser (Debian's chromium)")
    require_tool("chromedriver", "the UI tests' browser driver (Debian's chromium-driver)")
    from .conftest import ServerProcess
    tmp = tmp_path_factory.mktemp("ui-browser")
    users = htpasswd_file(tmp / "htpasswd", {"alice": "alice-pw", "bob": "bob-pw"})
    (tmp / "policy.yml").write_text(POLICY)
    (tmp / "data").mkdir()
    server = ServerProcess(tmp / "data", env={"REGISTRY_AUTH_HTPASSWD_REALM": "regserve",
                                              "REGISTRY_AUTH_HTPASSWD_PATH": str(users),
                                              "REGISTRY_AUTH_ACCESSCONTROL_POLICY": str(tmp / "policy.yml")})
    try:
        host = server.url.removeprefix("http://")
        creds = "--dest-creds=alice:alice-pw"
        pushed: dict[str, Any] = {"host": host, "url": server.url}
        for name, build, ref in (("team-a/app", build_image, "v1"), ("team-a/multi", build_index, "latest"),
                                 ("team-b/vault", build_image, "v1")):
            layout = tmp / name.replace("/", "-")
            kwargs = {"big_bytes": 3 << 20} if build is build_image else {}
            digest = build(layout, ref, ROOT / "regserve" / "registry", **kwargs)
            skopeo("copy", "--all", "--preserve-digests", "--dest-tls-verify=false", creds,
                   f"oci:{layout}:{ref}", f"docker://{host}/{name}:{ref}")
            pushed[name] = {"digest": digest, "layout": layout, "blobs": layout_sizes(layout, digest)}
        app = pushed["team-a/app"]
        manifest = app["layout"] / "blobs" / "sha256" / app["digest"].split(":")[1]
        subject = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": app["digest"],
                   "size": manifest.stat().st_size}
        sig_layout = tmp / "signature"
        sig = build_referrer(sig_layout, "sig", subject, SIGNATURE, b"a signature, as cosign stores one")
        skopeo("copy", "--preserve-digests", "--dest-tls-verify=false", creds, f"oci:{sig_layout}:sig",
               f"docker://{host}/team-a/app@{sig}")
        pushed["signature"] = {"digest": sig, "blobs": layout_sizes(sig_layout, sig)}
        yield pushed
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    # Its profile in the test's own directory: left to itself, chromium leaves one in /tmp a run.
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--no-first-run", "--disable-sync", "--disable-component-update",
                "--disable-background-networking", "--disable-default-apps", "--disable-domain-reliability",
                # no outside traffic: every name but loopback fails to resolve
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.binary_location = require_tool("chromium", "the UI tests' browser")
    driver = webdriver.Chrome(options=options, service=Service(require_tool("chromedriver", "its driver")))
    driver.execute_cdp_cmd("Network.enable", {})
    try:
        yield driver
    finally:
        driver.quit()


class Visitor:
    """The browser as one user: their credentials on every request (what the browser sends
    after the sign-in prompt), screenshots of what they see."""

    def __init__(self, driver: Any, base: str, user: str | None, password: str | None = None) -> None:
        self.driver, self.base, self.user = driver, base, user
        headers = basic(user, password) if user else {}
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": headers})
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [
            {"name": "prefers-color-scheme", "value": "light"}]})
        driver.set_window_size(1280, 1000)

    def open(self, path: str, shot: str | None = None) -> Any:
        self.driver.get(self.base + path)
        for _ in range(50):  # sizes still being counted (a busy machine): reload, as a person would
            if not self.driver.find_elements("css selector", "#pending"):
                break
            time.sleep(0.1)
            self.driver.refresh()
        if shot:
            self.screenshot(shot)
        return self.driver

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        # The whole page, not just the window: as tall as its content.
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        width = self.driver.execute_script("return window.innerWidth")
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
        path.write_bytes(base64.b64decode(shot["data"]))
        assert path.stat().st_size > 1000
        return path

    def rows(self, table: str, attribute: str) -> dict[str, Any]:
        return {e.get_attribute(attribute): e for e in
                self.driver.find_elements("css selector", f"#{table} tbody tr[{attribute}]")}

    def wait_for(self, css: str) -> Any:
        """After a click that loads another page: its element, once there."""
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait
        return WebDriverWait(self.driver, 20).until(
            expected_conditions.presence_of_element_located(("css selector", css)))

    def text(self, css: str) -> str:
        return self.driver.find_element("css selector", css).text


def bytes_in(element: Any, css: str = "[data-bytes]") -> int:
    return int(element.find_element("css selector", css).get_attribute("data-bytes"))


def test_pages_show_what_skopeo_pushed(registry, browser):
    alice = Visitor(browser, registry["url"], "alice", "alice-pw")
    alice.open("/ui/", "repositories")
    listed = alice.rows("repositories", "data-repository")
    assert list(listed) == ["team-a/app", "team-a/multi", "team-b/vault"]
    assert alice.text("#user") == "alice"
    app, multi, sig = registry["team-a/app"], registry["team-a/multi"], registry["signature"]
    assert bytes_in(listed["team-a/app"]) == sum({**app["blobs"], **sig["blobs"]}.values())
    assert bytes_in(listed["team-a/multi"]) == sum(multi["blobs"].values())
    assert listed["team-a/multi"].find_element("css selector", ".tags").text == "1"

    alice.open("/ui/repo/team-a/multi", "tags")
    latest = alice.rows("tags", "data-tag")["latest"]
    assert latest.find_element("css selector", "a.digest").get_attribute("title") == multi["digest"]
    platforms = [li.get_attribute("data-platform") for li in latest.find_elements("css selector", "li")]
    assert platforms == ["linux/amd64", "linux/arm64"]
    assert bytes_in(latest, ".size") == sum(multi["blobs"].values())
    assert latest.find_element("css selector", ".created").text == "2026-11-30 10:00 UTC" == _utc(CREATED)
    pulls = [b.get_attribute("data-copy") for b in latest.find_elements("css selector", "button.copy")]
    assert pulls == [f"docker pull {registry['host']}/team-a/multi:latest",
                     f"podman pull {registry['host']}/team-a/multi:latest"]

    latest.find_element("css selector", "a.digest").click()
    alice.wait_for("#platforms")
    alice.screenshot("index")
    assert alice.text("#digest") == multi["digest"]
    assert list(alice.rows("platforms", "data-platform")) == ["linux/amd64", "linux/arm64"]

    alice.open(f"/ui/repo/team-a/app/-/manifest/{app['digest']}?tag=v1", "manifest")
    assert alice.text("#platform") == "linux/amd64"
    layers = browser.find_elements("css selector", "#layers tr.layer")
    doc = json.loads((app["layout"] / "blobs/sha256" / app["digest"].split(":")[1]).read_bytes())
    assert [bytes_in(t) for t in layers] == [layer["size"] for layer in doc["layers"]]
    assert '"/bin/sh"' in alice.text("#config")
    signatures = browser.find_element("css selector", 'section[data-purpose="Signatures"]')
    assert [li.get_attribute("data-referrer") for li in signatures.find_elements("css selector", "li")] == [sig["digest"]]
    raw = browser.find_element("css selector", "#raw")
    assert not raw.find_element("css selector", "pre").is_displayed()
    raw.find_element("css selector", "summary").click()
    assert json.loads(raw.find_element("css selector", "pre").text) == doc
    alice.screenshot("manifest-raw")

    alice.open("/ui/storage")
    browser.implicitly_wait(0)
    for _ in range(50):  # the first look starts the count; the page refreshes itself
        if browser.find_elements("css selector", "#usage"):
            break
        browser.execute_script("return new Promise(r => setTimeout(r, 200))")
    alice.screenshot("storage")
    usage = alice.rows("usage", "data-repository")
    shared = {name: bytes_in(row, ".shared") for name, row in usage.items()}
    # team-b/vault and team-a/app were built from the same sources: their first layer is shared.
    common = set(app["blobs"]) & set(registry["team-b/vault"]["blobs"])
    assert common and shared["team-a/app"] == shared["team-b/vault"] == sum(app["blobs"][d] for d in common)


def _utc(stamp: str) -> str:
    return stamp.replace("T", " ")[:16] + " UTC"


def test_copy_buttons_copy_the_pull_line(registry, browser):
    alice = Visitor(browser, registry["url"], "alice", "alice-pw")
    browser.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": registry["url"], "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    alice.open("/ui/repo/team-a/app")
    button = browser.find_element("css selector", 'tr[data-tag="v1"] button.copy')
    button.click()
    copied = browser.execute_async_script("navigator.clipboard.readText().then(arguments[0])")
    assert copied == f"docker pull {registry['host']}/team-a/app:v1"
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, 10).until(expected_conditions.text_to_be_present_in_element(
        ("css selector", "#status"), f"Copied: {copied}"))  # told to screen readers too (aria-live)


def test_the_policy_hides_what_a_reader_may_not_pull(registry, browser):
    bob = Visitor(browser, registry["url"], "bob", "bob-pw")
    bob.open("/ui/", "repositories-reader")
    assert list(bob.rows("repositories", "data-repository")) == ["team-a/app", "team-a/multi"]
    bob.open("/ui/repo/team-b/vault")
    assert browser.find_element("css selector", "h1").text == "Not found"
    assert "vault" not in browser.find_element("css selector", "main").text
    bob.open("/ui/repo/team-a/app")
    assert not browser.find_elements("css selector", "a.danger")
    bob.open("/ui/repo/team-a/app/-/tag/v1/delete")
    assert browser.find_element("css selector", "h1").text == "Not allowed"
    anonymous = Visitor(browser, registry["url"], None)
    anonymous.open("/ui/", "repositories-anonymous")
    assert not browser.find_elements("css selector", "#repositories")  # nothing anonymous may pull
    assert "No repository you may see" in browser.find_element("css selector", "main").text
    assert browser.find_elements("link text", "Sign in")


def test_a_tag_deleted_through_the_page(registry, browser):
    host, url = registry["host"], registry["url"]
    layout = registry["team-a/app"]["layout"]
    skopeo("copy", "--preserve-digests", "--dest-tls-verify=false", "--dest-creds=alice:alice-pw",
           f"oci:{layout}:v1", f"docker://{host}/team-a/app:to-delete")
    alice = Visitor(browser, url, "alice", "alice-pw")
    alice.open("/ui/repo/team-a/app")
    browser.find_element("css selector", 'tr[data-tag="to-delete"] a.danger').click()
    alice.wait_for("#confirm-delete")
    alice.screenshot("delete-confirm")
    assert "Delete tag team-a/app:to-delete?" in browser.find_element("css selector", "h1").text
    browser.find_element("css selector", "#confirm-delete").click()
    alice.wait_for(".notice")
    assert "was deleted" in alice.text(".notice")
    assert "to-delete" not in alice.rows("tags", "data-tag")
    status, _, _ = http("GET", f"{url}/v2/team-a/app/manifests/to-delete", headers=basic("alice", "alice-pw"))
    assert status == 404
    status, _, _ = http("GET", f"{url}/v2/team-a/app/manifests/v1", headers=basic("alice", "alice-pw"))
    assert status == 200  # the same manifest, by its other tag


def test_dark_mode_and_a_phone_sized_screen(registry, browser):
    alice = Visitor(browser, registry["url"], "alice", "alice-pw")
    alice.open("/ui/repo/team-a/multi")
    light = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [
        {"name": "prefers-color-scheme", "value": "dark"}]})
    dark = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    alice.screenshot("tags-dark")
    assert light == "rgb(255, 255, 255)" and dark == "rgb(15, 20, 25)"
    browser.set_window_size(390, 844)
    for path, name in (("/ui/", "phone-repositories"), ("/ui/repo/team-a/multi", "phone-tags"),
                       (f"/ui/repo/team-a/app/-/manifest/{registry['team-a/app']['digest']}", "phone-manifest")):
        alice.open(path, name)
        # Nothing wider than the screen but the tables, which scroll inside their own box.
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        wide = browser.execute_script("""return [...document.querySelectorAll('body *')].filter(
            e => !e.closest('.scroll') && e.getBoundingClientRect().right > window.innerWidth + 1)
            .map(e => e.tagName + '.' + e.className)""")
        assert overflow <= 0, (path, overflow, wide)


def test_every_page_has_a_language_one_heading_and_labelled_controls(registry, browser):
    alice = Visitor(browser, registry["url"], "alice", "alice-pw")
    for path in ("/ui/", "/ui/repo/team-a/app", f"/ui/repo/team-a/app/-/manifest/{registry['team-a/app']['digest']}",
                 "/ui/storage", "/ui/repo/team-a/app/-/tag/v1/delete", "/ui/repo/nothing"):
        alice.open(path)
        assert browser.find_element("css selector", "html").get_attribute("lang") == "en"
        assert len(browser.find_elements("css selector", "h1")) == 1, path
        for control in browser.find_elements("css selector", "input"):
            assert browser.find_elements("css selector", f'label[for="{control.get_attribute("id")}"]'), path
        for button in browser.find_elements("css selector", "button"):
            assert button.text or button.get_attribute("aria-label"), path
        # The policy held: nothing the page asked for was refused (it would be in the console).
        refused = [e for e in browser.get_log("browser") if "Content Security Policy" in e.get("message", "")]
        assert not refused, refused
