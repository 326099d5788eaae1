"""Shared types and the token losses, written once.

``Sample``: all questions about one training image (the unit of localization and of the edit loop).
``EditResult``: what every editing method returns (``ngguard.methods.REGISTRY``).
``Row`` / ``encode_rows`` / ``chunk_by_sample`` / ``encode_sample``: samples as model batches.
``row_nll`` / ``kl_on_targets``: the per-row losses every method builds its objective from.
``jaccard``: the overlap of two neuron masks. ``WeightBackup``: a snapshot of the edited matrices, to try an edit and roll it back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..adapters.base import Adapter, Batch


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


@dataclass
class Row:
    sample: int
    text: str
    subject: str
    target: str
    weight: float
    prefix: str | None = None


def encode_rows(adapter: Adapter, samples: Sequence[Sample], rows: Sequence[Row]) -> Batch:
    return adapter.encode([samples[r.sample].image for r in rows], [r.text for r in rows],
                          targets=[r.target for r in rows],
                          prefixes=[r.prefix or "" for r in rows] if any(r.prefix for r in rows) else None,
                          subjects=[r.subject for r in rows])


def chunk_by_sample(rows: Sequence[Row], max_rows: int) -> list[list[int]]:
    """Row indices grouped into chunks of whole samples, at most ``max_rows`` rows (or one sample)."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    for i, r in enumerate(rows):
        starts_sample = i == 0 or rows[i - 1].sample != r.sample
        if starts_sample and cur and len(cur) + sum(1 for x in rows if x.sample == r.sample) > max_rows:
            chunks.append(cur)
            cur = []
        cur.append(i)
    if cur:
        chunks.append(cur)
    return chunks


def encode_sample(adapter: Adapter, sample: Sample, refusal: str) -> tuple[Batch, torch.Tensor]:
    """One image's rows for the edit: sensitive questions -> refusal, benign -> original answers;
    and which rows are sensitive [B]."""
    texts = list(sample.sensitive) + [q for q, _ in sample.benign]
    targets = [refusal] * len(sample.sensitive) + [a for _, a in sample.benign]
    batch = adapter.encode([sample.image] * len(texts), texts, targets=targets,
                           subjects=[sample.subject] * len(texts)).to(adapter.device)
    sens = torch.zeros(len(texts), dtype=torch.bool, device=adapter.device)
    sens[:len(sample.sensitive)] = True
    return batch, sens


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a & b| / |a | b| of two boolean masks (1.0 when both are empty)."""
    inter, union = (a & b).sum().item(), (a | b).sum().item()
    return 1.0 if union == 0 else inter / union


class WeightBackup:
    """Snapshot of ``module`` of ``layers``, to try edits and roll back (``restore``)."""

    def __init__(self, adapter: Adapter, layers: Sequence[int], module: str):
        self.params = {adapter.parameter_name(l, module): adapter.component(l, module).weight for l in layers}
        self.saved = {k: p.detach().clone() for k, p in self.params.items()}

    def restore(self) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.saved[k])
