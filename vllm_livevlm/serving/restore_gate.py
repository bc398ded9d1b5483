"""While a server restores its streams from its state dir, every request but the open probes is answered
503 with `Retry-After`: a stream that is not back yet must not look deleted (404) or be recreated."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from vllm_livevlm.serving.access import OPEN_PATHS
from vllm_livevlm.serving.errors import error_response

WS_TRY_AGAIN_LATER = 1013  # RFC 6455 close code


class RestoreGate:
    """ASGI middleware reading `app.state.livevlm.checkpointer.restoring` on each request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope.get("app")  # set by Starlette before its middleware runs
        service = getattr(app.state, "livevlm", None) if app is not None else None
        checkpointer = getattr(service, "checkpointer", None)
        path = scope.get("path", "").removeprefix(scope.get("root_path", "")).rstrip("/") or "/"
        if scope["type"] not in ("http", "websocket") or checkpointer is None or not checkpointer.restoring \
                or path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        retry = checkpointer.retry_after()
        message = f"the server is restoring its streams from its state dir; retry in {retry} s"
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": WS_TRY_AGAIN_LATER, "reason": message})
            return
        response = error_response(503, message)
        response.headers["Retry-After"] = str(retry)
        await response(scope, receive, send)
