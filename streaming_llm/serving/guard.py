"""Checks before any handler: the Host header (DNS rebinding), the browser Origin, the API key."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from .schemas import error_response


def is_open(path: str) -> bool:
    """Paths served without the API key: the health probe and the chat page with its assets (no secret in them)."""
    return path in ("/health", "/") or path.startswith("/web/")


# Between a tenant's name and a session id inside the server (session ids are printable ASCII: never this).
TENANT_SEP = "\x1f"


def namespace(tenant: str) -> str:
    """The prefix of the internal ids of ``tenant``'s sessions ("" for the tenant of ``--api-key`` or no key)."""
    return f"{tenant}{TENANT_SEP}" if tenant else ""


def owns(tenant: str, internal_id: str) -> bool:
    """Whether the session with this internal id belongs to ``tenant``."""
    return internal_id.startswith(namespace(tenant)) if tenant else TENANT_SEP not in internal_id


class Guard:
    """Pure-ASGI checks before any handler: Host (DNS rebinding), Origin (browsers), API key.

    ``tenants`` maps further API keys to tenant names (``--api-keys-file``); the tenant of the request's key
    ("" for ``api_key``, or without keys) is put in ``scope["state"]["tenant"]`` (``request.state.tenant``)."""

    def __init__(self, app, api_key: str | None, origins: tuple[str, ...], hosts: tuple[str, ...],
                 tenants: dict[str, str] | None = None):  # fmt: skip
        self.app, self.api_key, self.origins, self.hosts = app, api_key, origins, hosts
        self.keys = {**(tenants or {}), **({api_key: ""} if api_key else {})}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self.check(scope, headers)
        if problem is not None:
            return await problem(scope, receive, send)
        scope.setdefault("state", {})["tenant"] = self.tenant(headers.get("authorization", ""))
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

    def tenant(self, authorization: str) -> str | None:
        """The tenant of the key in an ``Authorization`` header ("" without keys), or None for a wrong key. Every
        key is compared (in constant time each), so the time does not tell which one nearly matched."""
        if not self.keys:
            return ""
        found = None
        for key, tenant in self.keys.items():
            if hmac.compare_digest(authorization.encode("utf-8", "replace"), f"Bearer {key}".encode()):
                found = tenant
        return found

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
        needs_key = self.keys and not is_open(scope["path"]) and scope["method"] != "OPTIONS"
        if needs_key and self.tenant(headers.get("authorization", "")) is None:
            return error_response(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                                  "authentication_error", code="invalid_api_key")  # fmt: skip
        return None
