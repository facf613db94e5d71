"""What keeps the web app local and its files confined: the Host check, the token, the path jail.

* **Host check** (bound to localhost): a page on another site can make the browser send requests
  to ``127.0.0.1`` through a DNS name it controls (DNS rebinding); such requests carry that name in
  ``Host`` and get 403.
* **Token** (``--token`` / ``SDTUNE_UI_TOKEN``, required to bind another host): every request,
  pages, API and files alike, carries it as the ``X-Sdtune-Token`` header, a ``?token=`` query, or
  the ``sdtune_token`` cookie the server sets when a page is loaded with the right ``?token=``.
* **Cross-site writes** (CSRF): a page on another site can make the browser POST a "simple" form or
  ``text/plain`` body to this server without reading the answer. Every write (POST, PUT, DELETE,
  PATCH) must be ``Content-Type: application/json`` (which no cross-site form can send without a
  CORS preflight, which this server never grants), and a request whose ``Origin`` is not this
  server's own or whose ``Sec-Fetch-Site`` is ``cross-site`` is refused (403) for writes and for
  the API.
* **Path jail** (:func:`confined`): a file is served only when its real path (symbolic links and
  ``..`` resolved) lies inside the folder it is served from.

The middleware is plain ASGI, so it guards every route, static files included.
"""

from __future__ import annotations

import hmac
import json
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
TOKEN_HEADER = "x-sdtune-token"
TOKEN_COOKIE = "sdtune_token"
WRITES = frozenset({"POST", "PUT", "DELETE", "PATCH"})


class Forbidden(Exception):
    """A path outside the folders the app may serve; the message says which and why (403)."""


def is_local_host(host: str) -> bool:
    return host.strip("[]").lower() in LOCAL_HOSTS


def host_name(header: str) -> str:
    """The host part of a ``Host`` header (``127.0.0.1:7860`` -> ``127.0.0.1``, ``[::1]:80`` -> ``::1``)."""
    header = header.strip()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _origin(url: str, scheme: str) -> str:
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    url = url.strip().lower().rstrip("/")
    return url.removesuffix(default) if default else url


def cross_site(method: str, path: str, headers: dict[str, str], scheme: str) -> tuple[int, str] | None:
    """Why a request is refused as cross-site (403) or not JSON (415); None when it may go on. Writes
    and API requests must come from this server's own pages (``Origin`` absent or this server's,
    never ``Sec-Fetch-Site: cross-site``), and writes must be JSON."""
    write = method.upper() in WRITES
    if not write and not path.startswith("/api/"):
        return None  # pages and files may be linked to from anywhere (a navigation reads nothing back)
    origin, site = headers.get("origin"), headers.get("sec-fetch-site", "").lower()
    own = _origin(f"{scheme}://{headers.get('host', '')}", scheme)
    if origin is not None and _origin(origin, scheme) != own:
        return 403, (f"sdtune ui: refused a {method} from Origin {origin!r}: only this server's own pages ({own}) "
                     "may call its API (a guard against cross-site requests). Fix: use the pages this server serves.")
    if site == "cross-site":
        return 403, (f"sdtune ui: refused a cross-site {method} (Sec-Fetch-Site: cross-site): only this server's "
                     "own pages may call its API. Fix: use the pages this server serves.")
    kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if write and kind != "application/json":
        return 415, (f"sdtune ui: refused a {method} with Content-Type {kind or 'none'!r}: writes take a JSON body "
                     "(Content-Type: application/json), a guard against cross-site forms. Fix: send the body as "
                     "JSON with that header.")
    return None


def confined(base: Path, rel: str, what: str) -> Path:
    """``base/rel`` with symbolic links and ``..`` resolved, refused (:class:`Forbidden`) unless it
    stays inside ``base`` (itself resolved). ``what`` names the folder in the message."""
    root = Path(base).resolve()
    if "\x00" in rel:
        raise Forbidden(f"refused {rel!r}: a path with a NUL byte.")
    target = (root / rel.lstrip("/")).resolve() if not Path(rel).is_absolute() else Path(rel).resolve()
    if not target.is_relative_to(root):
        raise Forbidden(f"refused {rel!r}: it leads to {target}, outside {what} ({root}). Only files inside "
                        f"{what} are served (symbolic links and .. are resolved first).")
    return target


class Guard:
    """ASGI middleware: the Host check (when ``local_only``) and the token (when set) on every request."""

    def __init__(self, app, *, token: str | None, local_only: bool):
        self.app, self.token, self.local_only = app, token or None, local_only

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if self.local_only and not is_local_host(host_name(headers.get("host", ""))):
            return await _refuse(send, path, 403, f"sdtune ui: requests for the host {headers.get('host', '')!r} are "
                                 "refused: the server is bound to localhost and answers only Host: localhost, "
                                 "127.0.0.1 or [::1] (a guard against DNS rebinding). Fix: open "
                                 "http://127.0.0.1:<port>/ , or start it with --host and --token to serve other hosts.")
        if scope["type"] == "http":
            why = cross_site(scope.get("method", "GET"), path, headers, scope.get("scheme", "http"))
            if why:
                return await _refuse(send, path, *why)
        if self.token is None:
            return await self.app(scope, receive, send)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed Cookie header is no token
            cookie = SimpleCookie()
        given = [headers.get(TOKEN_HEADER, ""), query, cookie[TOKEN_COOKIE].value if TOKEN_COOKIE in cookie else ""]
        if not any(g and hmac.compare_digest(g.encode(), self.token.encode()) for g in given):
            return await _refuse(send, path, 401, "sdtune ui: this server needs its token. Fix: open the URL it printed "
                                 "(…/?token=…), or send the X-Sdtune-Token header.")
        if query and hmac.compare_digest(query.encode(), self.token.encode()) and not path.startswith("/api/"):
            send = _with_cookie(send, self.token)  # the page's own image and script requests carry the cookie
        return await self.app(scope, receive, send)


def _with_cookie(send, token: str):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            headers.append((b"set-cookie", f"{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict".encode()))
            message = {**message, "headers": headers}
        await send(message)
    return wrapped


async def _refuse(send, path: str, status: int, message: str) -> None:
    """A 401/403/415 answer before any route runs: JSON under /api, plain text elsewhere."""
    if path.startswith("/api/"):
        body, kind = json.dumps({"error": message}).encode(), b"application/json"
    else:
        body, kind = message.encode(), b"text/plain; charset=utf-8"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
