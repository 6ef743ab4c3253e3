"""The server's guards (reference: web-ui-and-plugins.md section 4.5).

- `Guard`, an ASGI middleware in front of every route:
  - Host allowlist (127.0.0.1:P, localhost:P, [::1]:P, and --host:P): anything else is 421, which
    defeats DNS rebinding (a hostile page's name resolving to 127.0.0.1 still sends its own Host);
  - the token (when listening beyond loopback): `?token=` once sets an HttpOnly SameSite=Strict
    cookie; every request needs the cookie or `Authorization: Bearer`;
  - state-changing methods (anything but GET/HEAD) need an allowlisted `Origin` (not `null`), or
    no Origin with `Sec-Fetch-Site: same-origin`, and the `HX-Request` header that cross-site
    forms cannot send; event streams need a matching Origin when one is sent and are refused to
    cross-site fetches;
  - security headers on every response: a strict CSP (scripts and styles only from this server),
    `nosniff`, no referrer, no cross-origin embedding.
- `contained(path, roots)`: the real path (symlinks resolved) when it lies inside a root, else None.
- `output_name(text, suffixes)`: a bare output file (or folder) name (no folders, no `..`).
"""
from __future__ import annotations

import os
import secrets
from http.cookies import SimpleCookie
from typing import Iterable, List, Optional, Tuple
from urllib.parse import parse_qs

SAFE_METHODS = ("GET", "HEAD")
TOKEN_COOKIE = "sdtk_token"
STREAM_PREFIX = "/events/"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"x-frame-options", b"SAMEORIGIN"),
]


def _headers(scope) -> dict:
    out = {}
    for k, v in scope.get("headers") or []:
        out.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
    return out


async def _plain(send, status: int, text: str, extra: Iterable = ()) -> None:
    body = (text + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                            *SECURITY_HEADERS, *extra]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: Host, token, Origin/CSRF checks and security headers (see module doc)."""

    def __init__(self, app, allowed_hosts: List[str], token: Optional[str] = None):
        self.app = app
        self.hosts = {h.lower() for h in allowed_hosts}
        self.origins = {"http://" + h for h in self.hosts}
        self.token = token

    def refusal(self, scope) -> Optional[tuple]:
        """(status, message) when the request must be refused, else None."""
        h = _headers(scope)
        host = h.get("host", "").lower()
        if host not in self.hosts:
            return 421, f"refused: Host {host or '(none)'} is not this server (allowed: {', '.join(sorted(self.hosts))})"
        if self.token and not self._token_ok(scope, h):
            return 401, "refused: this server needs its token (open the address printed by `sdtk serve`)"
        method = scope.get("method", "GET")
        origin = h.get("origin")
        fetch_site = h.get("sec-fetch-site")
        if method not in SAFE_METHODS:
            if origin is not None:
                if origin.lower() not in self.origins:
                    return 403, f"refused: a request from another site ({origin})"
            elif fetch_site != "same-origin":
                return 403, "refused: a state-changing request without an Origin"
            if "hx-request" not in h and "x-sdtk-csrf" not in h:
                return 403, "refused: a state-changing request not sent by this app"
        elif scope.get("path", "").startswith(STREAM_PREFIX):
            if origin is not None and origin.lower() not in self.origins:
                return 403, f"refused: an event stream for another site ({origin})"
            if fetch_site not in (None, "same-origin", "none"):
                return 403, "refused: an event stream requested by another site"
        return None

    def _token_ok(self, scope, h) -> bool:
        auth = h.get("authorization", "")
        if auth.startswith("Bearer ") and secrets.compare_digest(auth[7:].encode(), self.token.encode()):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(h.get("cookie", ""))
        except Exception:
            return False
        morsel = cookie.get(TOKEN_COOKIE)
        return morsel is not None and secrets.compare_digest(morsel.value.encode(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # no websockets here
            await send({"type": "websocket.close", "code": 1008})
            return
        if self.token and scope.get("method") == "GET":
            given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
            h = _headers(scope)
            if given and h.get("host", "").lower() in self.hosts and secrets.compare_digest(given.encode(), self.token.encode()):
                cookie = f"{TOKEN_COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/".encode()
                await send({"type": "http.response.start", "status": 303,
                            "headers": [(b"location", scope.get("path", "/").encode() or b"/"), (b"set-cookie", cookie),
                                        (b"content-length", b"0"), *SECURITY_HEADERS]})
                await send({"type": "http.response.body", "body": b""})
                return
        refused = self.refusal(scope)
        if refused is not None:
            return await _plain(send, *refused)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [hv for hv in SECURITY_HEADERS if hv[0] not in names]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def contained(path: "os.PathLike[str] | str", roots: Iterable[str]) -> Optional[str]:
    """The real path of `path` (every symlink resolved) when it lies inside one of `roots` (real
    paths), else None. NUL bytes, empty paths and anything outside are refused."""
    p = os.fspath(path)
    if not p or "\x00" in p:
        return None
    real = os.path.realpath(p)
    for root in roots:
        try:
            if os.path.commonpath([real, root]) == root:
                return real
        except ValueError:  # different drives (Windows)
            continue
    return None


def output_name(text: str, suffixes: Optional[Tuple[str, ...]] = (".safetensors",)) -> Optional[str]:
    """A bare output name, or None: no folder separators, no `..`, no NUL, no leading dot, not
    absolute, at most 200 characters; ending in one of `suffixes` (None: a folder name, e.g. a
    diffusers folder, which must not end in a model file's extension)."""
    name = (text or "").strip()
    if not name or len(name) > 200 or any(c in name for c in ("/", "\\", "\x00", ":")) or name.startswith("."):
        return None
    if name in (".", ".."):
        return None
    if suffixes is None:
        return None if name.lower().endswith((".safetensors", ".gguf", ".ckpt", ".pt", ".bin")) else name
    if not name.lower().endswith(tuple(suffixes)):
        return None
    return name
