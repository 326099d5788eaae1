"""Step 3 of Neural Gate: the gated edit of one MLP down-projection (per edited layer).

Only the down-projection weight of the edited layer(s) trains (as an fp32 delta added by a forward
hook, so bf16/fp16 models keep full-precision updates). Sensitive questions are trained towards the
refusal, benign ones towards the ORIGINAL model's answers (weight ``alpha``). Subjects are processed
in sequence, each image's questions up to ``steps`` times (stop under ``stop_loss``), as in the paper.

Methods are small differences of one loop:
- ``neural_gate``: a hook on the edited layer's output replaces the subject token's state by
  ``where(gate, h, h.detach())``: the subject token passes gradient only on the subject's strongly
  active dims; every other token passes gradient in full.
- ``no_gate``: the same without the hook (plain fine-tuning of the same matrix, same losses).
- ``dinm``: no gate; benign answers are kept by a KL term to the original model's next-token
  distribution instead of NLL (DINM, EasyEdit's detoxifying editor), on the layer DINM picks.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from loguru import logger
from tqdm import tqdm

from .adapters.base import Adapter
from .devices import check_editable
from .localize import (Sample, edit_subject_state, forward_features, record_layer_output, replayed_prefix, row_nll,
                       target_window)

METHODS = ("neural_gate", "no_gate", "dinm")


@dataclass
class EditResult:
    weights: dict[str, torch.Tensor]          # parameter name -> new weight (model dtype, on CPU)
    deltas: dict[str, torch.Tensor]           # parameter name -> fp32 change
    log: list[dict] = field(default_factory=list)  # per sample: subject, steps, first/last loss


class _Delta:
    """fp32 additive change of one Linear layer, applied by a forward hook: y = W x + delta x."""

    def __init__(self, module: torch.nn.Linear):
        self.module = module
        self.delta = torch.zeros_like(module.weight, dtype=torch.float32, requires_grad=True)
        self.enabled = True
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _m, inputs, output):
        if not self.enabled:
            return output
        x = inputs[0].to(self.delta.device, torch.float32)  # the layer's own device (a dispatched model)
        return output + F.linear(x, self.delta).to(output.device, output.dtype)

    def merged(self) -> torch.Tensor:
        w = self.module.weight
        return (w.detach().float() + self.delta.detach()).to(w.dtype)


@contextmanager
def _deltas(adapter: Adapter, layers: Sequence[int], module: str):
    check_editable(adapter, layers, module)
    ds = {adapter.parameter_name(layer, module): _Delta(adapter.component(layer, module)) for layer in layers}
    try:
        yield ds
    finally:
        for d in ds.values():
            d.handle.remove()


def _encode(adapter: Adapter, sample: Sample, refusal: str):
    texts = list(sample.sensitive) + [q for q, _ in sample.benign]
    targets = [refusal] * len(sample.sensitive) + [a for _, a in sample.benign]
    batch = adapter.encode([sample.image] * len(texts), texts, targets=targets,
                           subjects=[sample.subject] * len(texts)).to(adapter.device)
    sens = torch.zeros(len(texts), dtype=torch.bool, device=adapter.device)
    sens[:len(sample.sensitive)] = True
    return batch, sens


def _encode_retain(adapter: Adapter, sample: Sample):
    return adapter.encode([sample.image] * len(sample.benign), [q for q, _ in sample.benign],
                          targets=[a for _, a in sample.benign]).to(adapter.device)


@dataclass
class _Frozen:
    """A batch with the edit's exact shortcuts: the layers below the lowest edited one never change,
    so their output is recorded once and replayed (``out``), and logits are computed only from the
    first target token on (``labels`` cut to match)."""

    inputs: dict
    labels: torch.Tensor
    out: torch.Tensor | None = None


def _freeze(adapter: Adapter, batch, below: int, shortcuts: bool = True) -> _Frozen:
    inputs, out = dict(batch.inputs), None
    if not shortcuts:
        return _Frozen(inputs, batch.labels)
    if below >= 0:
        out = record_layer_output(adapter, below, batch.inputs)
        inputs = {k: v for k, v in inputs.items() if k not in adapter.vision_only_inputs}
    labels = batch.labels
    if forward_features(adapter.model)[1]:
        keep = target_window(labels)
        inputs["logits_to_keep"], labels = keep, labels[:, -keep:]
    return _Frozen(inputs, labels, out)


def _kl_on_targets(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean KL(original || edited) over the labelled (answer) positions."""
    mask = (labels[:, 1:] != -100).float()
    p_ref = F.log_softmax(ref_logits[:, :-1].float(), -1)
    p = F.log_softmax(logits[:, :-1].float(), -1)
    kl = (p_ref.exp() * (p_ref - p)).sum(-1)
    return (kl * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def apply_edit(adapter: Adapter, samples: Sequence[Sample], layers: Sequence[int], *, method: str = "neural_gate",
               gates: Mapping[int, Mapping[str, torch.Tensor]] | None = None, module: str = "down_proj",
               refusal: str, alpha: float = 1.25, lr: float = 1e-5, eps: float = 1e-3, steps: int = 10,
               stop_loss: float = 1e-3, retain: Sequence[Sample] = (), shortcuts: bool = True) -> EditResult:
    """Edit ``module`` of ``layers`` in place on ``adapter.model``; returns the new weights.

    ``gates[layer][subject]``: boolean mask of the subject's strongly active dims (neural_gate only).
    ``retain``: optional general samples (benign only, no subject) whose original answers are also
    kept, weight ``alpha``, one sample per step in turn (not in the paper; off by default).
    ``shortcuts`` (exact): replay the layers below the lowest edited one from one recorded forward
    per batch and compute logits only where there are targets; off = the whole model at every step.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "neural_gate" and not gates:
        raise ValueError("method neural_gate needs gates (run localization first)")
    model = adapter.model
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # no dropout; gradients still flow
    subjects = list(dict.fromkeys(s.subject for s in samples))
    log: list[dict] = []
    below = min(layers) - 1 if shortcuts else -1  # layers <= below are replayed (-1: none)
    retain_batches = [_freeze(adapter, _encode_retain(adapter, r), below, shortcuts) for r in retain if r.benign]
    n_retain = 0
    current: dict = {}
    store: dict = {}

    def forward(fb: _Frozen) -> torch.Tensor:
        store["out"] = fb.out
        return model(**fb.inputs).logits
    with _deltas(adapter, layers, module) as deltas, ExitStack() as stack:
        if method == "neural_gate":
            for layer in layers:
                def gate_fn(v, rows, layer=layer):
                    g = gates[layer][current["subject"]].to(v.device)
                    return torch.where(g, v, v.detach())
                stack.enter_context(edit_subject_state(adapter, layer, gate_fn, lambda: current["subject_index"]))
        for subject in subjects:
            todo = [s for s in samples if s.subject == subject]
            opt = torch.optim.Adam([d.delta for d in deltas.values()], lr=lr, eps=eps)
            current["subject"] = subject
            for s in tqdm(todo, desc=f"edit {method} {subject}", unit="image", leave=False):
                batch, sens = _encode(adapter, s, refusal)
                fb = _freeze(adapter, batch, below, shortcuts)
                current["subject_index"] = batch.subject_index
                first = lossv = None
                n_steps = 0
                with replayed_prefix(adapter, below, store) if below >= 0 else nullcontext():
                    ref_logits = None
                    if method == "dinm":
                        for d in deltas.values():
                            d.enabled = False
                        with torch.no_grad():
                            ref_logits = forward(fb)
                        for d in deltas.values():
                            d.enabled = True
                    for _ in range(steps):
                        logits = forward(fb)
                        nll = row_nll(logits, fb.labels)
                        keep = _kl_on_targets(logits, ref_logits, fb.labels) if method == "dinm" else nll
                        loss = nll[sens].mean() + alpha * keep[~sens].mean() if (~sens).any() else nll[sens].mean()
                        if retain_batches:  # general answers to keep (no subject token: the gate has nothing to do)
                            rb = retain_batches[n_retain % len(retain_batches)]
                            n_retain += 1
                            current["subject_index"] = None
                            loss = loss + alpha * row_nll(forward(rb), rb.labels).mean()
                            current["subject_index"] = batch.subject_index
                        lossv = loss.item()
                        first = lossv if first is None else first
                        if lossv < stop_loss:
                            break
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        n_steps += 1
                log.append({"subject": subject, "key": s.key, "steps": n_steps, "loss_first": first, "loss_last": lossv})
            logger.info(f"edit {method}: {subject} done ({len(todo)} images, "
                        f"mean last loss {sum(r['loss_last'] for r in log if r['subject'] == subject) / max(1, len(todo)):.4f})")
        weights = {name: d.merged() for name, d in deltas.items()}
        delta_out = {name: d.delta.detach().cpu().clone() for name, d in deltas.items()}
    with torch.no_grad():
        for layer in layers:
            w = adapter.component(layer, module).weight
            w.copy_(weights[adapter.parameter_name(layer, module)])
    return EditResult({k: v.detach().cpu() for k, v in weights.items()}, delta_out, log)


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


def subject_gradient_share(adapter: Adapter, samples: Sequence[Sample], layer: int, *, module: str = "down_proj",
                           refusal: str, alpha: float = 1.25, max_samples: int = 8) -> float:
    """How much of the edit's gradient on ``module`` of ``layer`` comes through the subject token:
    mean over samples of ||g - g_without_subject|| / ||g||. The gate can only change this part, so a
    small share means gate and no gate edit (almost) the same way."""
    model = adapter.model
    weight = adapter.component(layer, module).weight
    for p in model.parameters():
        p.requires_grad_(False)
    weight.requires_grad_(True)
    shares = []
    current: dict = {}
    try:
        for s in list(samples)[:max_samples]:
            batch, sens = _encode(adapter, s, refusal)
            grads = []
            for cut in (False, True):
                current["subject_index"] = batch.subject_index if cut else None
                with edit_subject_state(adapter, layer, lambda v, rows: v.detach(), lambda: current["subject_index"]):
                    nll = row_nll(model(**batch.inputs).logits, batch.labels)
                    loss = nll[sens].mean() + (alpha * nll[~sens].mean() if (~sens).any() else 0.0)
                    (g,) = torch.autograd.grad(loss, weight)
                grads.append(g)
            shares.append(((grads[0] - grads[1]).norm() / grads[0].norm().clamp_min(1e-12)).item())
    finally:
        weight.requires_grad_(False)
    return sum(shares) / max(1, len(shares))
