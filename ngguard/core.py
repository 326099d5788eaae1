"""Shared types and the token losses, written once.

``Sample``: all questions about one training image (the unit of localization and of the edit loop).
``EditResult``: what every editing method returns (``ngguard.methods.REGISTRY``).
``row_nll`` / ``kl_on_targets``: the per-row losses every method builds its objective from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class Sample:
    """All questions about one training image: the unit of localization and of the edit loop."""

    image: Image.Image
    subject: str
    sensitive: list[str]
    benign: list[tuple[str, str]]  # (prompt, the ORIGINAL model's answer)
    key: str = ""


@dataclass
class EditResult:
    weights: dict[str, torch.Tensor]          # parameter name -> new weight (model dtype, on CPU)
    deltas: dict[str, torch.Tensor]           # parameter name -> fp32 change
    log: list[dict] = field(default_factory=list)  # per sample: subject, steps, first/last loss


def row_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token NLL of the labelled tokens, per row. logits [B, T, V], labels [B, T] (-100 = no
    target, not shifted) -> [B]."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = labels[:, 1:]
    mask = tgt != -100
    tok = -logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    return tok.sum(-1) / mask.sum(-1).clamp_min(1)


def kl_on_targets(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean KL(original || edited) over the labelled (answer) positions -> [B]."""
    mask = (labels[:, 1:] != -100).float()
    p_ref = F.log_softmax(ref_logits[:, :-1].float(), -1)
    p = F.log_softmax(logits[:, :-1].float(), -1)
    kl = (p_ref.exp() * (p_ref - p)).sum(-1)
    return (kl * mask).sum(-1) / mask.sum(-1).clamp_min(1)
