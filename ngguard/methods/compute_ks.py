"""The edit requests and their keys.

A request = one sensitive question about one training image (MEMIT's request = one prompt about one
subject): its key k at layer l is the input of the edited down-projection at the subject's last
token; its value is the output of the last edited layer at that token. Causal attention: neither
depends on what follows the subject, so the answer-start contexts share the question's key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..adapters.base import Adapter
from .core import Sample
from .fastpath import record_layer_output


@dataclass(frozen=True)
class Request:
    sample: int      # index into the samples
    question: str    # one of samples[sample].sensitive


def requests_of(samples: Sequence[Sample]) -> list[Request]:
    return [Request(i, q) for i, s in enumerate(samples) for q in s.sensitive]


@torch.no_grad()
def subject_states(adapter: Adapter, samples: Sequence[Sample], requests: Sequence[Request], *, key_layer: int | None,
                   out_layer: int, module: str = "down_proj", refusal: str,
                   batch_size: int = 32) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Keys ([n, d_k], float32: input of ``module`` of ``key_layer`` at the subject token; None when
    ``key_layer`` is None) and values ([n, d], float32: output of ``out_layer`` there), under the
    model's current weights. Rows are encoded as for training (right padding, the refusal as target)
    so positions match the target-value optimisation exactly."""
    if key_layer is not None and key_layer > out_layer:
        raise ValueError(f"key layer {key_layer} is above the output layer {out_layer}")
    keys, outs = [], []
    seen: dict[str, torch.Tensor] = {}
    handle = None
    if key_layer is not None:
        handle = adapter.component(key_layer, module).register_forward_pre_hook(
            lambda _m, inputs: seen.__setitem__("k", inputs[0]))
    try:
        for i in range(0, len(requests), batch_size):
            chunk = requests[i:i + batch_size]
            batch = adapter.encode([samples[r.sample].image for r in chunk], [r.question for r in chunk],
                                   targets=[refusal] * len(chunk),
                                   subjects=[samples[r.sample].subject for r in chunk]).to(adapter.device)
            out = record_layer_output(adapter, out_layer, batch.inputs)          # [b, T, d]; layers above skipped
            rows = torch.arange(len(chunk), device=out.device)
            idx = batch.subject_index.to(out.device)
            outs.append(out[rows, idx].float())                                  # [b, d]
            if key_layer is not None:
                k = seen["k"]                                                    # on the key layer's device
                keys.append(k[rows.to(k.device), idx.to(k.device)].float().to(out.device))  # [b, d_k]
    finally:
        if handle is not None:
            handle.remove()
    return (torch.cat(keys) if keys else None), torch.cat(outs)
