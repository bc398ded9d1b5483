"""Changes to vLLM internals that no public extension point allows (see README.md here).

Each patch is a module exposing `apply()`; `apply_all()` runs them at plugin load, after the plugin's
version guard. A patch checks the exact vLLM code it changes and raises `PatchNotApplicable` if that code
is not what it was written against, so an unsupported vLLM fails loudly instead of misbehaving.
"""

from __future__ import annotations

import importlib

PATCHES: tuple[str, ...] = ("async_llm_pre_shutdown_hooks", "compilation_livevlm_splitting_ops",
                             "mrope_livevlm_context_extent")
_applied: set[str] = set()


class PatchNotApplicable(RuntimeError):
    """The vLLM code a patch targets is not the code it was written for."""


def apply_all() -> None:
    for name in PATCHES:
        if name not in _applied:
            importlib.import_module(f"patches.{name}").apply()
            _applied.add(name)
