"""The built-in chat page (``GET /``): plain HTML, CSS and JS shipped with the package, no build step, no CDN.

The page holds no secret, so it and its assets are served without the API key (the :class:`~.guard.Guard`
lets ``/`` and ``/web/*`` through, Host checks included); every API call the page makes sends the key the
user typed. It talks to the server's own endpoints only (same origin), which a strict Content-Security-Policy
enforces in the browser as well.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

WEB_DIR = Path(__file__).with_name("web")
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
HEADERS = {
    # Same-origin only: no inline script, no third-party fetch, no framing (clickjacking).
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so an upgraded server never pairs a new page with an old script
}


def add_web_routes(app: FastAPI) -> None:
    """Serve the chat page at ``GET /`` and its assets at ``GET /web/app.js`` and ``GET /web/style.css``.

    Args:
        app: The server's application (its error handlers answer anything else under ``/web/`` with a 404).
    """
    files = {name: (WEB_DIR / name).read_bytes() for name in ("index.html", *ASSETS)}  # read once, at start

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        return Response(files["index.html"], media_type="text/html; charset=utf-8", headers=HEADERS)

    for name, kind in ASSETS.items():
        app.add_api_route(f"/web/{name}", _asset(files[name], kind), methods=["GET"], include_in_schema=False)


def _asset(content: bytes, kind: str):
    def asset() -> Response:
        return Response(content, media_type=kind, headers=HEADERS)

    return asset
