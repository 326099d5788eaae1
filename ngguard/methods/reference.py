"""The plain reference of localization (Eq. 1-3), the oracle the tests hold the batched fast path to.

Nothing shared with ``fastpath`` or the batched loop: one sample at a time, its own optimiser, the
whole model at every step, its own hook, the loss written out. Its callers import it (the library never does).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..adapters.base import Adapter
from .core import Sample, row_nll
from .registry import DEFAULT_CONTEXTS
from .neural_gate import LayerLocalization


def localize_reference(adapter: Adapter, samples: Sequence[Sample], layer: int, *, refusal: str, alpha: float = 1.25,
                       contexts: Sequence[str] = DEFAULT_CONTEXTS, steps: int = 25, lr: float = 0.5, eps: float = 1e-3,
                       l1: float = 1e-3, init: float = 2.0, stop_loss: float = 0.05):
    """Same arguments and result (``LayerLocalization``) as ``neural_gate.localize_layer``."""
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    scales, losses, used = [], [], []
    for s in samples:
        sens = [(q, "") for q in s.sensitive] + [(q, c) for q in s.sensitive for c in contexts]
        texts = [q for q, _ in sens] + [q for q, _ in s.benign]
        batch = adapter.encode([s.image] * len(texts), texts, targets=[refusal] * len(sens) + [a for _, a in s.benign],
                               prefixes=[c for _, c in sens] + [""] * len(s.benign) if contexts else None,
                               subjects=[s.subject] * len(texts)).to(adapter.device)
        is_sens = torch.arange(len(texts), device=adapter.device) < len(sens)
        rows = torch.arange(len(texts), device=adapter.device)
        m = torch.full((adapter.hidden_size,), init, device=adapter.layer_device(layer), requires_grad=True)
        opt = torch.optim.Adam([m], lr=lr, eps=eps)

        def scale(_module, _inputs, out):  # Eq. 1 at every row's subject token
            h = out[0] if isinstance(out, tuple) else out
            at = (rows.to(h.device), batch.subject_index.to(h.device))
            h = h.index_put(at, h[at] * torch.tanh(m).to(h.device, h.dtype))
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = adapter.component(layer, "layer").register_forward_hook(scale)
        try:
            for step in range(steps):
                nll = row_nll(adapter.model(**batch.inputs, use_cache=False).logits, batch.labels)
                loss = nll[is_sens].mean() + l1 * (m - init).abs().mean().to(nll.device)    # Eq. 3
                if s.benign:
                    loss = loss + alpha * nll[~is_sens].mean()
                last, n = loss.item(), step + 1
                if last < stop_loss:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            handle.remove()
        scales.append(torch.tanh(m.detach()).cpu())
        losses.append(last)
        used.append(n)
    return LayerLocalization.of(layer, torch.stack(scales), [s.subject for s in samples], torch.tensor(losses),
                                torch.tensor(used))
