"""Target values z = h + delta for each request, MEMIT's compute_v adapted to refusal.

For request r (a sensitive question about one image) a vector delta_r is added to the output of the
last edited layer L at the subject's last token, the model frozen, and trained with Adam on

    loss_r = mean NLL(refusal | question [+ answer-start context])                 (the new "fact")
           + kl_factor * KL(original || edited) on the answer to one benign question
             about the same image, delta_r added at its subject token too             (MEMIT's essence KL)
           + weight_decay * ||delta_r|| / ||h_r||^2                                 (as in the reference code)

and after each step clamped to ||delta_r|| <= clamp_norm_factor * ||h_r||; a request stops once its
loss is under ``stop_loss``. MEMIT's KL prompt is "{subject} is a"; here a benign question about
the same image plays that part (what must not change about the subject; the image's benign
questions are taken in turn over its requests). Requests are independent: they
are optimised chunk by chunk (whole requests, at most ``batch_size`` rows), each with its own Adam
state per element, so the result does not depend on the chunking.

``shortcuts`` (exact, the model being frozen): layers <= L are replayed from one recorded forward per
chunk and logits are computed only where there are targets; off = the whole model at every step.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
from tqdm import tqdm

from ..adapters.base import Adapter
from .core import Sample, chunk_by_sample, encode_rows, kl_on_targets, row_nll
from .fastpath import prepare
from .hooks import HookState, edit_subject_state, replayed_prefix
from .neural_gate import sample_rows
from .compute_ks import Request


def compute_vs(adapter: Adapter, samples: Sequence[Sample], requests: Sequence[Request], layer: int, h: torch.Tensor,
               *, refusal: str, contexts: Sequence[str], steps: int = 25, lr: float = 0.1, weight_decay: float = 0.5,
               clamp_norm_factor: float = 0.75, kl_factor: float = 0.0625, stop_loss: float = 0.05,
               batch_size: int = 32, shortcuts: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """Returns z ([n, d] float32 = h + delta) and one log entry per request. ``h``: [n, d] the
    output of ``layer`` at each request's subject token (``subject_states``)."""
    model = adapter.model
    for p in model.parameters():
        p.requires_grad_(False)
    device = adapter.device
    h = h.to(device)
    per_request = [_pseudo_sample(samples[r.sample], r.question) for r in requests]
    rows = sample_rows(per_request, refusal, 1.0, contexts)
    deltas = torch.zeros_like(h)
    log: list[dict] = []
    current: dict = {}
    state = HookState()

    def add_delta(v: torch.Tensor, rows_: torch.Tensor) -> torch.Tensor:
        if current.get("delta") is None:
            return v
        rr, delta = state.sample_of_row, current["delta"]
        return v + delta[rr[rows_.to(rr.device)].to(delta.device)].to(v.device, v.dtype)

    for chunk in tqdm(chunk_by_sample(rows, batch_size), desc=f"target values L{layer}", unit="chunk", leave=False):
        crows = [rows[i] for i in chunk]
        req = sorted({r.sample for r in crows})                                      # requests of this chunk
        local = {g: j for j, g in enumerate(req)}
        batch = encode_rows(adapter, per_request, crows).to(device)
        fb = prepare(adapter, batch, layer if shortcuts else -1, frozen_above=False, shortcuts=shortcuts)  # before the replay swaps layers
        row_request = torch.tensor([local[r.sample] for r in crows], device=device)
        fb.sample_of_row = row_request                                               # row -> its request's delta
        is_kl = torch.tensor([r.text != requests[r.sample].question for r in crows], device=device)
        weight = torch.tensor([r.weight for r in crows], device=device) * torch.where(is_kl, kl_factor, 1.0)
        current.update(delta=None)
        with replayed_prefix(adapter, layer, state) if shortcuts else nullcontext(), \
                edit_subject_state(adapter, layer, add_delta, lambda: state.subject_index):
            delta, used, first, last = _optimise(model, fb, state, h[req], row_request, is_kl, weight, current, steps=steps,
                                                 lr=lr, weight_decay=weight_decay, clamp_norm_factor=clamp_norm_factor,
                                                 stop_loss=stop_loss)
        deltas[req] = delta
        for j, g in enumerate(req):
            s = samples[requests[g].sample]
            log.append({"subject": s.subject, "key": s.key, "question": requests[g].question, "steps": int(used[j]),
                        "loss_first": float(first[j]), "loss_last": float(last[j])})
    return h + deltas, log


def _pseudo_sample(s: Sample, question: str) -> Sample:
    """A request as a sample: its question (+ contexts) towards the refusal, and ONE benign question of
    the same image for the KL term (MEMIT: one essence prompt per request), taken in turn."""
    benign = [s.benign[s.sensitive.index(question) % len(s.benign)]] if s.benign else []
    return Sample(s.image, s.subject, [question], benign, key=s.key)


def _optimise(model, fb, state: HookState, h: torch.Tensor, row_request: torch.Tensor, is_kl: torch.Tensor, weight: torch.Tensor,
              current: dict, *, steps: int, lr: float, weight_decay: float, clamp_norm_factor: float,
              stop_loss: float):
    """One chunk's deltas ([m, d]), steps used, first and last loss per request."""
    m, device = len(h), h.device
    ref = None
    if is_kl.any():
        with torch.no_grad():
            ref = fb.logits(model, state)                                         # the original model (no delta)
    norm = h.norm(dim=-1)                                                            # [m]
    delta = torch.zeros_like(h, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    done = torch.zeros(m, dtype=torch.bool, device=device)
    used = torch.zeros(m, dtype=torch.long)
    first = last = None
    current["delta"] = delta
    try:
        for _ in range(steps):
            logits = fb.logits(model, state)
            per_row = row_nll(logits, fb.labels)
            if ref is not None:
                per_row = torch.where(is_kl, kl_on_targets(logits, ref, fb.labels), per_row)
            loss = torch.zeros(m, device=device).index_add(0, row_request, per_row * weight)
            loss = loss + weight_decay * delta.norm(dim=-1) / norm ** 2             # the reference code's decay term
            lv = loss.detach().cpu()
            first = lv.clone() if first is None else first
            last = lv.clone() if last is None else torch.where(done.cpu(), last, lv)
            done |= loss.detach() < stop_loss
            if done.all():
                break
            used[(~done).cpu()] += 1
            opt.zero_grad()
            loss[~done].sum().backward()
            keep = delta.detach()[done].clone()
            opt.step()
            with torch.no_grad():
                delta[done] = keep                                                   # finished requests stay put
                cap = clamp_norm_factor * norm
                n = delta.norm(dim=-1)
                delta.mul_(torch.where(n > cap, cap / n.clamp_min(1e-12), torch.ones_like(n))[:, None])
    finally:
        current["delta"] = None
    return delta.detach(), used, first, last
