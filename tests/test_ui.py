"""The browser page's routes, in-process (fake engine): assets, redirects, keys, packaging.

The page itself runs in a real Chromium in tests/test_ui_browser.py.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib

import httpx
import pytest

from llmserve.http.ui_routes import ASSETS, CSP, UI_DIR, wants_html
from tests.conftest import ROOT, FakeFactory

pytestmark = pytest.mark.anyio

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


async def test_page_is_served_with_a_strict_policy(fake_client: FakeFactory) -> None:
    async with fake_client() as client:
        for path in ("/ui", "/ui/"):
            r = await client.get(path)
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/html")
            assert r.headers["content-security-policy"] == CSP
            assert r.headers["x-content-type-options"] == "nosniff"
            assert '<base href="/ui/">' in r.text
            assert '<script type="module" src="app.js">' in r.text


async def test_page_base_follows_the_root_path(fake_client: FakeFactory) -> None:
    """Behind a proxy prefix the page's assets and API calls resolve under it."""
    async with fake_client() as client:
        transport = httpx.ASGITransport(app=client.app, root_path="/llm")  # type: ignore[attr-defined]
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as prefixed:
            r = await prefixed.get("/llm/ui")
            assert '<base href="/llm/ui/">' in r.text
            r = await prefixed.get("/llm/", headers={"Accept": BROWSER_ACCEPT})
            assert r.headers["location"] == "/llm/ui"


async def test_assets_are_served_and_nothing_else(fake_client: FakeFactory) -> None:
    async with fake_client() as client:
        for name, media in ASSETS.items():
            r = await client.get(f"/ui/{name}")
            assert r.status_code == 200, name
            assert r.headers["content-type"] == media
            assert r.content == (UI_DIR / name).read_bytes()
        for bad in ("/ui/index.html.bak", "/ui/..%2Fui_routes.py", "/ui/%2e%2e/app.py",
                    "/ui/nope.js"):
            r = await client.get(bad)
            assert r.status_code == 404, bad
            assert r.json()["error"]["type"] == "not_found_error"


async def test_root_sends_browsers_to_the_page(fake_client: FakeFactory) -> None:
    async with fake_client() as client:
        r = await client.get("/", headers={"Accept": BROWSER_ACCEPT})
        assert r.status_code == 303
        assert r.headers["location"] == "/ui"
        for accept in ("*/*", "application/json", "application/json, text/html;q=0.5", ""):
            r = await client.get("/", headers={"Accept": accept})
            assert r.status_code == 200, accept
            assert r.json()["name"] == "llmserve"


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (BROWSER_ACCEPT, True),
        ("text/html", True),
        ("TEXT/HTML; q=0.9, application/json; q=0.9", True),
        ("application/json, text/html;q=0.5", False),
        ("text/html;q=0", False),
        ("text/html;q=oops", False),
        ("*/*", False),
        (None, False),
        ("", False),
    ],
)
def test_wants_html(accept: str | None, html: bool) -> None:
    assert wants_html(accept) is html


async def test_page_is_public_and_the_api_is_not(fake_client: FakeFactory) -> None:
    async with fake_client(settings_kw={"api_key": ["sk-ui"]}) as client:
        assert (await client.get("/ui")).status_code == 200
        assert (await client.get("/ui/")).status_code == 200
        for name in ASSETS:
            assert (await client.get(f"/ui/{name}")).status_code == 200, name
        assert (await client.get("/", headers={"Accept": BROWSER_ACCEPT})).status_code == 303
        for path in ("/v1/models", "/models", "/cache"):
            assert (await client.get(path)).status_code == 401, path
        r = await client.get("/v1/models", headers={"Authorization": "Bearer sk-ui"})
        assert r.status_code == 200
        # only the page's own prefix is public, not lookalikes
        assert (await client.get("/uix")).status_code == 401


def test_assets_ship_in_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["llmserve.http"]
    shipped = sorted(p.name for p in UI_DIR.iterdir() if p.is_file())
    assert sorted([*ASSETS, "index.html"]) == shipped
    for name in shipped:
        assert any(fnmatch.fnmatch(f"ui/{name}", pat) for pat in patterns), name


def test_page_works_offline_and_never_parses_html() -> None:
    """No CDN or other origin; model text never goes through an HTML parser."""
    for path in UI_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), path.name
        assert not re.search(r"""(import\s.*from\s*|import\()\s*["'](https?:)?//""", text)
        assert not re.search(r"url\(\s*[\"']?(https?:)?//", text), path.name
        if path.suffix == ".js":
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                         "eval(", "new Function", "DOMParser", "createContextualFragment"):
                assert sink not in text, f"{path.name} uses {sink}"
