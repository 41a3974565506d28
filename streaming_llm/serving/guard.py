"""Checks before any handler: the Host header (DNS rebinding), the browser Origin, the API key."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from .schemas import error_response


def is_open(path: str) -> bool:
    """Paths served without the API key: the health probe and the chat page with its assets (no secret in them)."""
    return path in ("/health", "/") or path.startswith("/web/")


class Guard:
    """Pure-ASGI checks before any handler: Host (DNS rebinding), Origin (browsers), API key."""

    def __init__(self, app, api_key: str | None, origins: tuple[str, ...], hosts: tuple[str, ...]):
        self.app, self.api_key, self.origins, self.hosts = app, api_key, origins, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self.check(scope, headers)
        if problem is not None:
            return await problem(scope, receive, send)
        origin = headers.get("origin")
        if origin and scope["method"] == "OPTIONS":  # CORS preflight from an allowed origin
            response = JSONResponse({}, headers=self._cors(origin))
            return await response(scope, receive, send)
        if origin:

            async def send_with_cors(message):
                if message["type"] == "http.response.start":
                    message.setdefault("headers", [])
                    message["headers"] += [(k.encode(), v.encode()) for k, v in self._cors(origin).items()]
                await send(message)

            return await self.app(scope, receive, send_with_cors)
        return await self.app(scope, receive, send)

    def _cors(self, origin: str) -> dict[str, str]:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Allow-Headers": "authorization, content-type, x-session-id",
                "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
                "Access-Control-Expose-Headers": "x-session-id"}  # fmt: skip

    def check(self, scope, headers: dict[str, str]) -> JSONResponse | None:
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        if "*" not in self.hosts and name not in {h.strip("[]").lower() for h in self.hosts}:
            return error_response(421 if host else 400, f"Host {host!r} is not served here (DNS-rebinding protection); "
                                  "start the server with --allowed-hosts to accept it.", "invalid_request_error",
                                  code="host_not_allowed")  # fmt: skip
        origin = headers.get("origin")
        if origin and origin.lower() in (f"http://{host}".lower(), f"https://{host}".lower()):
            origin = None  # the server's own page (same origin; the Host is already known to be ours)
        if origin and "*" not in self.origins and origin not in self.origins:
            return error_response(403, f"Requests from the browser origin {origin!r} are refused; start the server "
                                  "with --allowed-origins to allow it.", "permission_error",
                                  code="origin_not_allowed")  # fmt: skip
        if self.api_key and not is_open(scope["path"]) and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return error_response(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                                      "authentication_error", code="invalid_api_key")  # fmt: skip
        return None
