"""DINM (Wang et al., "Detoxifying Large Language Models via Knowledge Editing", ACL 2024; EasyEdit's
detoxifying editor), adapted to refusal: pick the layer whose hidden states differ most between the
safe (refusal) and the unsafe (leaking) answer (``dinm_layer``), then tune that layer's down-projection
with NLL(refusal | sensitive) + alpha * KL(original || edited) on the benign answers: the Eq. 7 loop of
``neural_gate.gated_edit`` without a gate and with the KL keep term.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..adapters.base import Adapter
from .core import EditResult, Sample
from .registry import EditSpec
from .neural_gate import gated_edit


def apply_dinm(adapter: Adapter, samples: Sequence[Sample], layers: Sequence[int], *, module: str, refusal: str,
               hparams: EditSpec, gates=None, retain: Sequence[Sample] = (), shortcuts: bool = True) -> EditResult:
    """``gates`` is ignored (DINM has none)."""
    return gated_edit(adapter, samples, layers, gates=None, keep="kl", module=module, refusal=refusal, hparams=hparams,
                      retain=retain, shortcuts=shortcuts, name="dinm")


def dinm_layers(adapter: Adapter, samples: Sequence[Sample], unsafe: Mapping[str, str], refusal: str,
                scan: Sequence[int]) -> tuple[list[int], dict]:
    """DINM's own choice under a layer search (``Method.choose_layers``): ``dinm_layer`` over ``scan``."""
    best, dist = dinm_layer(adapter, samples, refusal, unsafe, scan)
    return [best], {"dinm_distance": dist}


@torch.no_grad()
def dinm_layer(adapter: Adapter, samples: Sequence[Sample], refusal: str, unsafe: Mapping[str, str],
               layers: Sequence[int] | None = None) -> tuple[int, list[float]]:
    """DINM's toxic-layer choice: the layer whose last-token hidden state differs most between the
    safe (refusal) and the unsafe (the original model's leaking answer) response to the same question.
    ``unsafe[prompt]``: the original answer to each sensitive prompt."""
    layers = list(range(adapter.num_layers)) if layers is None else list(layers)
    dist = torch.zeros(adapter.num_layers)
    count = 0
    for s in samples:
        qs = [q for q in s.sensitive if q in unsafe]
        if not qs:
            continue
        outs = []
        for answers in ([refusal] * len(qs), [unsafe[q] for q in qs]):
            b = adapter.encode([s.image] * len(qs), qs, targets=answers).to(adapter.device)
            hs = adapter.model(**b.inputs, output_hidden_states=True).hidden_states
            last = b.inputs["attention_mask"].sum(-1) - 1  # right padding: last real token
            rows = torch.arange(len(qs))
            outs.append(torch.stack([h[rows.to(h.device), last.to(h.device)].to(adapter.device)
                                     for h in hs[1:]]))  # [layers, rows, d]
        dist += (outs[0] - outs[1]).float().norm(dim=-1).mean(-1).cpu()
        count += 1
    dist /= max(1, count)
    best = max(layers, key=lambda i: dist[i].item())
    return best, dist.tolist()
