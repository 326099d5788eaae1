"""Serving helpers beside ``ngguard.guard.ProtectedLVLM``: per-row protection (``RowPatch``) and
the request batcher (``Batcher``), greedy decoding for serving (``GreedyDecoder``). Nothing in the editing pipeline imports this package."""
from __future__ import annotations

__all__ = ["Batcher", "BatcherClosed", "GreedyDecoder", "RowPatch", "image_key"]


def __getattr__(name: str):  # lazy: ``ngguard.serving.options`` (the CLI's) must not pull in torch
    if name in ("Batcher", "BatcherClosed"):
        from . import batcher
        return getattr(batcher, name)
    if name in ("GreedyDecoder", "image_key"):
        from . import greedy
        return getattr(greedy, name)
    if name == "RowPatch":
        from .rowpatch import RowPatch
        return RowPatch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
