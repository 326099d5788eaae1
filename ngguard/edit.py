"""Deprecated import path, kept for one release (importing it warns; no project code uses it): each method is now
an entry of ``ngguard.methods.REGISTRY`` (the gated edit: ``ngguard.methods.neural_gate.gated_edit``,
Eq. 6-7; ``no_gate``, ``dinm``: ``ngguard/methods/``)."""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import torch

from .adapters.base import Adapter
from .methods.core import EditResult, Sample
from .methods import REGISTRY
from .methods.dinm import dinm_layer
from .methods.gate_share import subject_gradient_share
from .recipe import EditSpec

__all__ = ["EditResult", "METHODS", "apply_edit", "dinm_layer", "subject_gradient_share"]

warnings.warn("ngguard.edit is deprecated and goes in a later release: use ngguard.methods.REGISTRY[method].apply "
              "with an EditSpec (dinm_layer: ngguard.methods.dinm, subject_gradient_share: ngguard.methods.gate_share)",
              DeprecationWarning, stacklevel=2)

METHODS = tuple(m for m, entry in REGISTRY.items() if entry.hparams is EditSpec)  # the methods apply_edit takes


def apply_edit(adapter: Adapter, samples: Sequence[Sample], layers: Sequence[int], *, method: str = "neural_gate",
               gates: Mapping[int, Mapping[str, torch.Tensor]] | None = None, module: str = "down_proj",
               refusal: str, alpha: float = 1.25, lr: float = 1e-5, eps: float = 1e-3, steps: int = 10,
               stop_loss: float = 1e-3, retain: Sequence[Sample] = (), shortcuts: bool = True) -> EditResult:
    """Deprecated: ``REGISTRY[method]`` with an ``EditSpec`` (the recipe's ``edit`` section)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    hp = EditSpec(lr=lr, eps=eps, steps=steps, stop_loss=stop_loss, alpha=alpha, refusal=refusal)
    return REGISTRY[method].apply(adapter, samples, layers, module=module, refusal=refusal, hparams=hp, gates=gates,
                                  retain=retain, shortcuts=shortcuts)
