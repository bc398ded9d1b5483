"""The live console at `/livevlm/`: the static page shipped in `vllm_livevlm/console/`, served by the server
itself (no CDN, works offline).

Only the page's own files are served, from a fixed list (no directory is exposed), and they load without the
API key: they hold no data. The page then asks for the key (`index.html` says whether the server has one)
and sends it with every API call and websocket it makes; owner tokens travel in headers and websocket
subprotocols, never in URLs.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, FastAPI
from fastapi.responses import RedirectResponse, Response

from vllm_livevlm.log import get_logger
from vllm_livevlm.serving.errors import error_response

logger = get_logger(__name__)
PREFIX = "/livevlm"
FILES = {"index.html": "text/html; charset=utf-8", "console.js": "text/javascript; charset=utf-8",
         "console.css": "text/css; charset=utf-8"}
# The paths that load without the API key, as sent and with the trailing slash stripped (`serving.access`).
PAGE_PATHS = frozenset({PREFIX, PREFIX + "/", *(f"{PREFIX}/{name}" for name in FILES)})
# The page talks to this server only; frames are drawn from local media streams and blobs.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: "
                                       "mediastream:; connect-src 'self' ws: wss:; frame-ancestors 'none'"}


def console_url(host: str | None, port: int) -> str:
    """The URL a user on this machine opens (a wildcard bind is reachable as localhost)."""
    host = "localhost" if host in (None, "", "0.0.0.0", "::") else host
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}{PREFIX}/"


def page_file(name: str, key_required: bool) -> bytes:
    """One of the page's files; `index.html` tells the page whether to ask for the API key before its first
    call (a call without it would only fail with 401)."""
    data = resources.files("vllm_livevlm.console").joinpath(name).read_bytes()
    if name == "index.html" and key_required:
        data = data.replace(b'data-key-required="no"', b'data-key-required="yes"', 1)
    return data


def attach(app: FastAPI, key_required: bool, host: str | None, port: int) -> None:
    """Mount the console's routes and print its URL."""
    router = APIRouter(include_in_schema=False)
    cache = {name: page_file(name, key_required) for name in FILES}

    @router.get(PREFIX)
    async def console_root() -> Response:
        return RedirectResponse(PREFIX + "/")

    @router.get(PREFIX + "/")
    async def console_index() -> Response:
        return Response(cache["index.html"], media_type=FILES["index.html"], headers=_HEADERS)

    @router.get(PREFIX + "/{name}")
    async def console_file(name: str) -> Response:
        if name not in FILES:
            return error_response(404, "Not Found")
        return Response(cache[name], media_type=FILES[name], headers=_HEADERS)

    app.include_router(router)
    logger.info("LiveVLM console: %s", console_url(host, port))
