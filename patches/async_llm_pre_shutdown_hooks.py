"""`AsyncLLM.shutdown` first runs the hooks registered for that engine client, once.

Why a patch: on SIGTERM vLLM's API server stops the engine client before it stops serving HTTP
(`entrypoints/launchers/launcher.py`, `serve_http.handle_shutdown`), and no public hook runs before that.
Without this, questions being decoded for stream clients are aborted and streams are never closed; with it,
the stream service refuses new work, lets in-flight questions finish and frees every stream first.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable

from patches import PatchNotApplicable

_hooks: "weakref.WeakKeyDictionary[object, list[Callable[[], None]]]" = weakref.WeakKeyDictionary()


def add_pre_shutdown_hook(engine_client: object, hook: Callable[[], None]) -> None:
    """Run `hook()` (once) when `engine_client.shutdown()` is first called, before the engine stops."""
    _hooks.setdefault(engine_client, []).append(hook)


def apply() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    original = AsyncLLM.shutdown
    if getattr(original, "__livevlm_patched__", False):
        return
    if list(inspect.signature(original).parameters) != ["self", "timeout"]:
        raise PatchNotApplicable(
            "AsyncLLM.shutdown(self, timeout) changed in this vLLM; patches/async_llm_pre_shutdown_hooks.py was "
            "written for vLLM 0.32 (shutdown(self, timeout=None))")

    def shutdown(self, timeout: float | None = None) -> None:
        for hook in _hooks.pop(self, []):
            hook()
        original(self, timeout)

    shutdown.__livevlm_patched__ = True  # type: ignore[attr-defined]
    shutdown.__doc__ = original.__doc__
    AsyncLLM.shutdown = shutdown
