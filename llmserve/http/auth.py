"""API keys: a pure ASGI middleware that answers 401 before any protected route runs.

NOTE: a pure ASGI middleware (not BaseHTTPMiddleware) so streaming responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Sequence

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from llmserve.anthropic.events import error_body as anthropic_error_body
from llmserve.errors import AuthenticationError
from llmserve.tenancy import current_key

# NOTE: where a request's key id goes (Starlette's request.state reads scope["state"]).
KEY_ID_STATE = "api_key_id"
PUBLIC_PATHS = frozenset({"/", "/health", "/ui"})
# NOTE: the browser page's assets (http/ui_routes.py); what the page calls stays protected.
PUBLIC_PREFIXES = ("/ui/",)


def is_public(path: str) -> bool:
    """Paths served without a key: status, health, and the browser page with its assets."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def presented_keys(headers: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """Keys a request carries: `Authorization: Bearer <key>` and `X-API-Key: <key>`."""
    found: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                found.append(token.strip())
        elif lname == b"x-api-key" and value.strip():
            found.append(value.strip())
    return found


def key_matches(presented: bytes, keys: Sequence[bytes]) -> bool:
    """Constant-time check against every key (no early exit on the first match)."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented, key)
    return ok


def key_id(key: bytes) -> str:
    """A stable id for a key, safe to store: `key_` + sha256 of it (never the key itself)."""
    return "key_" + hashlib.sha256(key).hexdigest()


def is_loopback_host(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class APIKeyMiddleware:
    """Rejects HTTP requests without a valid key, except on public paths (is_public).

    An accepted request carries its key's id (key_id) in scope["state"][KEY_ID_STATE]: what
    owns the data it makes (stored Responses), and in tenancy.current_key (the prompt cache's
partition)."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]):
        self.app = app
        self._keys = [k.encode("utf-8") for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or is_public(_route_path(scope)):
            await self.app(scope, receive, send)
            return
        presented = presented_keys(scope.get("headers", []))
        for candidate in presented:
            if key_matches(candidate, self._keys):
                kid = key_id(candidate)
                scope.setdefault("state", {})[KEY_ID_STATE] = kid
                token = current_key.set(kid)  # NOTE: the prompt cache's partition (tenancy.py)
                try:
                    await self.app(scope, receive, send)
                finally:
                    current_key.reset(token)
                return
        if presented:
            error = AuthenticationError("invalid API key")
        else:
            error = AuthenticationError(
                "missing API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
            )
        # NOTE: the Anthropic routes answer in Anthropic's error shape, 401s included.
        anthropic = _route_path(scope).startswith("/v1/messages")
        body = anthropic_error_body(error.status, error.message) if anthropic else error.body()
        response = JSONResponse(
            body, status_code=error.status,
            headers={"WWW-Authenticate": 'Bearer realm="llmserve"'},
        )
        await response(scope, receive, send)


def _route_path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"
