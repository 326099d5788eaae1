"""Serving helpers beside ``ngguard.guard.ProtectedLVLM``: per-row protection (``RowPatch``) and
the request batcher (``Batcher``). Nothing in the editing pipeline imports this package."""
from .batcher import Batcher, BatcherClosed
from .rowpatch import RowPatch

__all__ = ["Batcher", "BatcherClosed", "RowPatch"]
