"""Serving helpers beside ``ngguard.guard.ProtectedLVLM``: per-row protection (``RowPatch``) and
the request batcher (``Batcher``). Nothing in the editing pipeline imports this package."""
from __future__ import annotations

__all__ = ["Batcher", "BatcherClosed", "RowPatch"]


def __getattr__(name: str):  # lazy: ``ngguard.serving.options`` (the CLI's) must not pull in torch
    if name in ("Batcher", "BatcherClosed"):
        from . import batcher
        return getattr(batcher, name)
    if name == "RowPatch":
        from .rowpatch import RowPatch
        return RowPatch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
