"""Who may drive the app: every HTTP and WebSocket request passes three checks before any route sees it.

- ``Host`` names this server (127.0.0.1, localhost or [::1] at its port, or the --host given): a page elsewhere whose
  name was rebound to 127.0.0.1 (DNS rebinding) sends its own name and is refused.
- ``Origin``, when a browser sends one, is this server's own address: a cross-site request or WebSocket is refused.
- the token: ``GET /?token=T`` (the printed address) answers the page and sets it as a cookie (HttpOnly,
  SameSite=Strict); every other request carries the cookie or an ``X-Token`` header. Without it: 403.
"""
from __future__ import annotations

import hmac
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")
TOKEN_HEADER = "x-token"


def cookie_name(port: int) -> str:
    """Cookies are shared by every port of a host: one name per port keeps two servers' tokens apart."""
    return f"fc7app-token-{port}"


def allowed_hosts(host: str, port: int) -> set[str] | None:
    """The Host header values this server answers to; None: any (it listens on every interface)."""
    if host in WILDCARD_HOSTS:
        return None
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    names = {*LOOPBACK_NAMES, shown}
    return {f"{name}:{port}" for name in names} | ({*names} if port == 80 else set())


class Guard:
    """ASGI middleware: Host, Origin and token checks on every request; the token cookie on the page's answer."""

    def __init__(self, app, *, token: str, host: str, port: int):
        self.app, self.token, self.port = app, token, port
        self.hosts = allowed_hosts(host, port)
        self.cookie = cookie_name(port)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        problem = self.problem(scope, headers)
        if problem:
            return await self.deny(scope, receive, send, problem)
        if scope["type"] == "http" and scope["path"] == "/" and self.token_in_query(scope):
            return await self.app(scope, receive, self.with_cookie(send))
        return await self.app(scope, receive, send)

    def problem(self, scope, headers: dict[str, str]) -> str | None:
        """Why the request is refused, or None."""
        host = headers.get("host", "")
        if self.hosts is not None and host.lower() not in self.hosts:
            return f"this server answers to 127.0.0.1:{self.port}, not to the Host {host[:80]!r}"
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in (f"http://{host}".lower(), f"https://{host}".lower()):
            return f"requests from the page {origin[:80]!r} are refused (only this server's own page may drive it)"
        if self.token_in_query(scope) and scope["path"] == "/":
            return None
        given = headers.get(TOKEN_HEADER) or self.token_in_cookie(headers.get("cookie", ""))
        if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
            return "no valid token: open the address run_webcam.py --serve printed (http://...?token=...)"
        return None

    def token_in_query(self, scope) -> bool:
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
        return bool(values) and hmac.compare_digest(values[0].encode(), self.token.encode())

    def token_in_cookie(self, header: str) -> str | None:
        cookies = SimpleCookie()
        try:
            cookies.load(header)
        except Exception:  # a malformed Cookie header is no token
            return None
        return cookies[self.cookie].value if self.cookie in cookies else None

    def with_cookie(self, send):
        value = f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode()

        async def sending(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", value)]}
            await send(message)
        return sending

    async def deny(self, scope, receive, send, problem: str):
        if scope["type"] == "websocket":  # closing before accepting answers the handshake with 403
            await send({"type": "websocket.close", "code": 1008, "reason": problem[:120]})
            return
        body = f"403 forbidden: {problem}\n".encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
