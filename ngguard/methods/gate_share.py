"""A diagnostic of the gate (Eq. 6): how much of the edit's gradient passes through the subject token."""
from __future__ import annotations

from typing import Sequence

import torch

from ..adapters.base import Adapter
from .core import Sample, encode_sample, row_nll
from .hooks import HookState, edit_subject_state
from .neural_gate import objective


def subject_gradient_share(adapter: Adapter, samples: Sequence[Sample], layer: int, *, module: str = "down_proj",
                           refusal: str, alpha: float = 1.25, max_samples: int = 8) -> float:
    """Mean over samples of ||g - g_without_subject|| / ||g||, g = the gradient of the edit's loss
    (Eq. 2) on ``module`` of ``layer``. The gate can only change this part, so a small share means
    gate and no gate edit (almost) the same way."""
    model = adapter.model
    weight = adapter.component(layer, module).weight
    for p in model.parameters():
        p.requires_grad_(False)
    weight.requires_grad_(True)
    shares = []
    state = HookState()
    try:
        for s in list(samples)[:max_samples]:
            batch, sens = encode_sample(adapter, s, refusal)
            grads = []
            for cut in (False, True):
                state.subject_index = batch.subject_index if cut else None
                with edit_subject_state(adapter, layer, lambda v, rows: v.detach(), lambda: state.subject_index):
                    nll = row_nll(model(**batch.inputs).logits, batch.labels)
                    (g,) = torch.autograd.grad(objective(nll, nll, sens, alpha), weight)
                grads.append(g)
            shares.append(((grads[0] - grads[1]).norm() / grads[0].norm().clamp_min(1e-12)).item())
    finally:
        weight.requires_grad_(False)
    return sum(shares) / max(1, len(shares))
