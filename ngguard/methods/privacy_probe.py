"""Where "this question asks for something private" lives, read off the hidden state: a linear probe.

Beyond the paper (issue 27). Neural Gate localizes per subject (which dimensions of the subject
token's state had to flip for THAT subject's refusal), so its edit learns "refuse attribute questions
about these kinds of card". The organism, though, answers "Is the passport number private?"
correctly for subjects no edit saw: privacy is represented. This module finds it across ALL
subjects at once: a logistic regression on the decoder's hidden state at the last prompt token
(the state the answer is generated from), trained to tell the sensitive training questions from the
benign ones AND from the retention questions (public look-alikes asked with the same words, awareness
questions, general answers). It is a contrast across subjects (private vs public, field vs property,
extraction vs awareness), not a per-subject mask.

Used by:
- ``privacy_probe`` (a registry method that edits no weights): refuse where the probe fires, the
  unedited model answers everything else (``ProbeGuard``; a classifier in front of the model, the
  hidden-state cousin of ``keyword_filter``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from loguru import logger
from PIL import Image
from tqdm import tqdm


def _open(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


@torch.no_grad()
def prompt_states(adapter, queries: Sequence, layers: Sequence[int], *, batch_size: int = 64,
                  desc: str = "probe states") -> torch.Tensor:
    """The output of each decoder layer in ``layers`` at the LAST prompt token (after the generation
    prompt: where the answer starts) for every query -> [N, len(layers), d] (fp32, CPU)."""
    out = []
    qs = list(queries)
    for i in tqdm(range(0, len(qs), batch_size), desc=desc, unit="batch", disable=len(qs) <= batch_size):
        chunk = qs[i:i + batch_size]
        batch = adapter.encode([_open(q.image) for q in chunk], [q.prompt for q in chunk]).to(adapter.device)
        hs = adapter.model(**batch.inputs, output_hidden_states=True).hidden_states  # (embeddings, layer 0, ...)
        out.append(torch.stack([hs[l + 1][:, -1].float().cpu() for l in layers], 1))  # left padding: -1 = last
    return torch.cat(out) if out else torch.zeros(0, len(layers), adapter.hidden_size)


@dataclass
class LinearProbe:
    """p(private | h) = sigmoid(w . (h - mean) / std + b) on the concatenated states of ``layers``."""

    layers: tuple[int, ...]
    mean: torch.Tensor
    std: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    threshold: float = 0.5
    log: dict = field(default_factory=dict)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        x = (states.flatten(1) - self.mean) / self.std
        return x @ self.w + self.b

    def fires(self, states: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(states)) > self.threshold


def fit_probe(states: torch.Tensor, labels: torch.Tensor, layers: Sequence[int], *, l2: float = 1e-2,
              steps: int = 200, weights: torch.Tensor | None = None, threshold: float = 0.5) -> LinearProbe:
    """L2-regularised logistic regression (full-batch L-BFGS, deterministic) on standardised
    features. ``weights``: per-row loss weights (e.g. to balance classes)."""
    x = states.flatten(1).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = labels.double()
    wts = torch.ones_like(y) if weights is None else weights.double()
    wts = wts / wts.sum()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none") * wts).sum() \
            + l2 * (w * w).sum() / 2
        loss.backward()
        return loss

    loss = opt.step(closure)
    with torch.no_grad():
        acc = (((x @ w + b) > 0).double() == y).double().mean().item()
    logger.info(f"probe: {x.shape[0]} rows, {x.shape[1]} features, train loss {float(loss):.4f}, accuracy {acc:.3f}")
    return LinearProbe(tuple(layers), mean.float(), std.float(), w.detach().float(), b.detach().float(), threshold,
                       {"train_accuracy": acc, "rows": int(x.shape[0])})
