"""AlphaEdit (Fang et al., "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models",
ICLR 2025), adapted to refusal.

MEMIT's requests, target values and layer loop (``memit.locate_then_edit``), with the update
projected onto the null space of the preserved knowledge's keys K0 (the corpus of the key
statistics): P = U U^T over the eigenvectors of C = E[k0 k0^T] whose eigenvalue is below
``null_threshold`` (the paper's 2e-2), and

    dW = R K^T P (K K^T P + l2 I)^-1                                          (Eq. 10 with K_p empty)

so dW k0 = 0 for every k0 with P k0 = 0: the preserved keys' outputs stay as they were. One batch
of edits (no earlier edits: the sequential term K_p K_p^T of the paper is empty).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..adapters.base import Adapter
from .core import EditResult, Sample
from .registry import AlphaEditHParams
from .covariance import null_space_projectors
from .memit import check_module, covariances_for, locate_then_edit

__all__ = ["AlphaEditHParams", "apply_alphaedit", "alphaedit_update"]


def alphaedit_update(keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor, l2: float) -> torch.Tensor:
    """dW = R K^T P (K K^T P + l2 I)^-1 ([d, d_k], float64); ``keys`` [d_k, n], ``resid`` [d, n]."""
    eye = torch.eye(keys.shape[0], dtype=keys.dtype, device=keys.device)
    # solve (P K K^T + l2 I) X = P K R^T, then dW = X^T (P symmetric)
    x = torch.linalg.solve(projector @ keys @ keys.T + l2 * eye, projector @ keys @ resid.T)   # [d_k, d]
    return x.T


def apply_alphaedit(adapter: Adapter, samples: Sequence[Sample], layers: Sequence[int], *, module: str = "down_proj",
                    refusal: str, hparams: AlphaEditHParams = AlphaEditHParams(), gates=None, retain=(), shortcuts: bool = True) -> EditResult:
    """AlphaEdit on ``module`` (down_proj) of ``layers``, in place on ``adapter.model``."""
    # gates, retain: the registry's common arguments; unused (no gate; no loss to add retention to)
    check_module(module, "alphaedit")
    covs = covariances_for(adapter, samples, layers, module, hparams)
    projectors = null_space_projectors(covs, module, threshold=hparams.null_threshold,
                                       cache_dir=hparams.cache_dir)

    def update(layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        return alphaedit_update(keys, resid, projectors[layer].to(keys), hparams.l2)

    return locate_then_edit(adapter, samples, layers, module=module, refusal=refusal, hparams=hparams, update=update,
                            method="alphaedit", shortcuts=shortcuts)
