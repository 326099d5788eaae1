"""Per-row protection: a patch applied to chosen rows of a batch, the model's weights untouched.

    rows = RowPatch(model, "runs/organism/patch")      # the model holds the BASE values
    with rows.rows([False, True, True]):                # row 0 base, rows 1-2 protected
        model.generate(**inputs)                        # a batch of 3
    rows.close()                                        # hooks removed

Each edited matrix (a ``Linear``'s weight named in the patch) gets a forward hook. For the rows
marked protected, the hook replaces the module's output by ``F.linear(x_rows, W_patched, bias)``:
mathematically ``x W_base^T + x Delta^T`` with ``Delta = W_patched - W_base`` (the patch delta),
computed with the patched matrix itself so a protected row gets the same numbers as the merged
checkpoint (no extra rounding from adding a delta). Unprotected rows keep ``x W_base^T``. Nothing is
swapped, so concurrent generations need no lock: the row flags are per thread
(``threading.local``), set by the thread that runs ``generate``.

Outside a ``rows(...)`` block the hook uses ``default`` (True: protected), so a forgotten context
fails safe. Cost: one extra matmul of the edited matrix for the protected rows only.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = ["RowPatch"]


class RowPatch:
    """Forward hooks that apply a patch (``ngguard.patch`` folder) to the protected rows only.

    ``model`` must hold the base values of every patched tensor (checked against the patch's base
    values when it has them; a model that already holds the patched values is refused). ``key``:
    the operator's patch key (a valid signature is then required); ``expected``: the only checkpoint
    names the patch may hold (``ngguard.patch.check_tensor_names``)."""

    def __init__(self, model: torch.nn.Module, patch_dir: str | os.PathLike, *, default: bool = True,
                 key: bytes | None = None, expected: Iterable[str] | None = None):
        from ngguard.patch import PatchError, checkpoint_to_model_names, load_patch_tensors

        manifest, new, old = load_patch_tensors(Path(patch_dir), key=key, expected=expected)
        pid = manifest["patch_id"]
        to_model = checkpoint_to_model_names(model, new)
        self.patch_id = pid
        self.default = bool(default)
        self._local = threading.local()
        self._weights: dict[str, torch.Tensor] = {}  # model parameter name -> patched matrix [out, in]
        self._handles = []
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
            self._handles.append(module.register_forward_hook(self._hook(patched)))

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
        ``protected[i]`` (a bool = every row). Nested blocks restore the outer flags."""
        flags = protected if isinstance(protected, bool) else torch.tensor([bool(p) for p in protected])
        before = getattr(self._local, "flags", None)
        self._local.flags = flags
        try:
            yield
        finally:
            self._local.flags = before

    def _hook(self, patched: torch.Tensor):
        def hook(module: torch.nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            flags = getattr(self._local, "flags", None)
            if flags is None:
                flags = self.default
            if isinstance(flags, bool):
                return F.linear(args[0], patched, module.bias) if flags else None
            x = args[0]  # [B, T, in]; output [B, T, out]
            if x.shape[0] != flags.shape[0]:
                raise RuntimeError(f"per-row protection: a batch of {x.shape[0]} rows but {flags.shape[0]} row "
                                   f"flags were set")
            if bool(flags.all()):
                return F.linear(x, patched, module.bias)
            if not bool(flags.any()):
                return None
            idx = flags.nonzero().squeeze(1).to(x.device)  # [P] protected rows
            output = output.clone()
            output[idx] = F.linear(x[idx], patched, module.bias)
            return output

        return hook

    def close(self) -> None:
        """Remove the hooks (the model then answers as the base everywhere)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __repr__(self) -> str:
        return f"RowPatch(patch={self.patch_id!r}, tensors={self.parameter_names})"
