"""The browser chat page: `GET /ui` and its assets, shipped inside the package (no CDN).

NOTE: the page and its assets are public (auth.PUBLIC_PREFIXES); every API route the page
calls stays behind the API keys, and the page sends the key the user typed.
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

UI_DIR = Path(__file__).resolve().parent / "ui"
# name -> media type: the only files served (no directory listing, no path from the URL).
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "store.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# NOTE: model output is rendered with DOM APIs only; the policy is a second line of defence:
# no inline script or handler runs, nothing loads from another origin.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'self'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@cache
def _read(name: str) -> bytes:
    return (UI_DIR / name).read_bytes()


def wants_html(accept: str | None) -> bool:
    """True when an Accept header prefers text/html to JSON (a browser, not an API client)."""
    quality: dict[str, float] = {}
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media.lower()] = max(q, quality.get(media.lower(), 0.0))
    html_q = quality.get("text/html", 0.0)
    return html_q > 0 and html_q >= quality.get("application/json", 0.0)


@router.get("/ui", name="ui_page")
@router.get("/ui/")
async def page(request: Request) -> Response:
    """The chat page; its <base> points at /ui/ under the app's root path."""
    root = str(request.scope.get("root_path", "")).rstrip("/")
    body = _read("index.html").replace(
        b"{{BASE}}", html.escape(f"{root}/ui/", quote=True).encode()
    )
    return Response(body, media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/ui/{name}")
async def asset(name: str) -> Response:
    """One of the page's scripts, styles or icons."""
    media = ASSETS.get(name)
    if media is None:
        raise HTTPException(404, f"no UI asset {name!r}")
    return Response(_read(name), media_type=media, headers=HEADERS)
