"""The paper's ablation: the Neural Gate edit (Eq. 7, same matrix, same losses) without the gate of Eq. 6,
i.e. plain fine-tuning of the down-projection."""
from __future__ import annotations

from typing import Sequence

from ..adapters.base import Adapter
from .core import EditResult, Sample
from .registry import EditSpec
from .neural_gate import gated_edit


def apply_no_gate(adapter: Adapter, samples: Sequence[Sample], layers: Sequence[int], *, module: str, refusal: str,
                  hparams: EditSpec, gates=None, retain: Sequence[Sample] = (), shortcuts: bool = True) -> EditResult:
    """``gates`` is ignored (there is none)."""
    return gated_edit(adapter, samples, layers, gates=None, module=module, refusal=refusal, hparams=hparams,
                      retain=retain, shortcuts=shortcuts, name="no_gate")
