"""Per-row protection: a patch applied to chosen rows of a batch, the model's weights untouched.

    rows = RowPatch(model, "runs/organism/patch")      # the model holds the BASE values
    with rows.rows([False, True, True]):                # row 0 base, rows 1-2 protected
        model.generate(**inputs)                        # a batch of 3
    rows.close()                                        # hooks removed

Each edited matrix (a ``Linear``'s weight named in the patch) gets its ``forward`` replaced (an
instance attribute; ``close`` restores the original): a batch whose rows are all protected computes
``F.linear(x, W_patched, bias)``, one whose rows are all unprotected ``F.linear(x, W_base, bias)``
(exactly what the module computes itself), each once, so protection costs nothing in a batch of one
state. In a mixed batch the base output of every row is computed and the protected rows are then
recomputed with the patched matrix: mathematically ``x W_base^T + x Delta^T`` with
``Delta = W_patched - W_base`` (the patch delta), computed with the patched matrix itself so a
protected row gets the same numbers as the merged checkpoint (no extra rounding from adding a
delta). Nothing is swapped, so concurrent generations need no lock: the row flags are per thread
(``threading.local``), set by the thread that runs ``generate`` (and turned into row indices once
per block, not per call).

Outside a ``rows(...)`` block every row gets ``default`` (True: protected), so a forgotten context
fails safe.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ngguard.patch import PatchError, checkpoint_to_model_names, load_patch_tensors

__all__ = ["RowPatch"]

_NONE = object()  # "the module had no forward of its own" (the class method applies)


class RowPatch:
    """Forward hooks that apply a patch (``ngguard.patch`` folder) to the protected rows only.

    ``model`` must hold the base values of every patched tensor (checked against the patch's base
    values when it has them; a model that already holds the patched values is refused). ``key``:
    the operator's patch key (a valid signature is then required); ``expected``: the only checkpoint
    names the patch may hold (``ngguard.patch.check_tensor_names``)."""

    def __init__(self, model: torch.nn.Module, patch_dir: str | os.PathLike, *, default: bool = True,
                 key: bytes | None = None, expected: Iterable[str] | None = None):
        manifest, new, old = load_patch_tensors(Path(patch_dir), key=key, expected=expected)
        pid = manifest["patch_id"]
        to_model = checkpoint_to_model_names(model, new)
        self.patch_id = pid
        self.default = bool(default)
        self._local = threading.local()
        self._weights: dict[str, torch.Tensor] = {}  # model parameter name -> patched matrix [out, in]
        self._replaced: list[tuple[torch.nn.Module, object]] = []  # (module, its own forward attribute or _NONE)
        for name in sorted(new):
            key = to_model.get(name)
            if key is None:
                raise PatchError(f"patch {pid}: tensor {name} has no counterpart in this {type(model).__name__}")
            module_name, _, attr = key.rpartition(".")
            module = model.get_submodule(module_name)
            if attr != "weight" or not isinstance(module, torch.nn.Linear):
                raise PatchError(f"patch {pid}: {key} is not the weight of a Linear layer: per-row protection "
                                 f"supports edited Linear matrices only (serve the merged checkpoint instead)")
            w = module.weight
            if w.device.type == "meta":
                raise PatchError(f"patch {pid}: {key} is offloaded (accelerate device map): per-row protection needs "
                                 f"the real weights; place that layer on a device")
            patched = new[name].to(device=w.device, dtype=w.dtype)
            if tuple(patched.shape) != tuple(w.shape):
                raise PatchError(f"patch {pid}: {key} is {list(w.shape)} in the model, {list(patched.shape)} in the patch")
            if torch.equal(w.detach(), patched):
                raise PatchError(f"patch {pid}: the model already holds the patched values of {key}: per-row "
                                 f"protection needs the base model")
            if old is not None and not torch.equal(w.detach(), old[name].to(device=w.device, dtype=w.dtype)):
                raise PatchError(f"patch {pid}: the model's {key} holds neither the base nor the patched values "
                                 f"(a different base?)")
            self._weights[key] = patched
            self._replaced.append((module, module.__dict__.get("forward", _NONE)))
            module.forward = self._forward(module, patched)

    @property
    def parameter_names(self) -> list[str]:
        """The model parameters (edited matrices) the hooks patch."""
        return sorted(self._weights)

    def delta(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``W_patched - W_base`` per parameter name, in float32 (for inspection and tests)."""
        return {k: w.float() - model.get_parameter(k).detach().float() for k, w in self._weights.items()}

    @contextmanager
    def rows(self, protected: Sequence[bool] | bool) -> Iterator[None]:
        """In this thread, until the block ends: row ``i`` of every forward is protected iff
        ``protected[i]`` (a bool = every row, whatever the batch size). Nested blocks restore the
        outer flags."""
        if isinstance(protected, bool):
            state = (None, protected, None)
        else:
            flags = [bool(p) for p in protected]
            mixed = torch.tensor([i for i, f in enumerate(flags) if f]) if any(flags) and not all(flags) else None
            state = (len(flags), all(flags) if mixed is None else None, mixed)
        before = getattr(self._local, "state", None)
        self._local.state = state
        try:
            yield
        finally:
            self._local.state = before

    def _forward(self, module: torch.nn.Linear, patched: torch.Tensor):
        default = (None, self.default, None)
        local = self._local

        def forward(x: torch.Tensor) -> torch.Tensor:
            rows, every, idx = getattr(local, "state", None) or default
            if rows is not None and x.shape[0] != rows:  # x: [B, T, in]
                raise RuntimeError(f"per-row protection: a batch of {x.shape[0]} rows but {rows} row flags were set")
            if every is not None:  # one state for the whole batch: one matmul, as the module itself
                return F.linear(x, patched if every else module.weight, module.bias)
            out = F.linear(x, module.weight, module.bias)
            idx = idx.to(x.device)
            out[idx] = F.linear(x[idx], patched, module.bias)
            return out

        return forward

    def close(self) -> None:
        """Restore the modules' own ``forward`` (the model then answers as the base everywhere)."""
        for module, own in self._replaced:
            if own is _NONE:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
        self._replaced.clear()

    def __repr__(self) -> str:
        return f"RowPatch(patch={self.patch_id!r}, tensors={self.parameter_names})"
