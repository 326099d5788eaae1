"""Neural Gate (Cao et al., ECCV 2026; restated in shared/NEURAL_GATE.md), equation by equation.

l: a decoder layer; h_i [d]: its output at the LAST subject token of the questions about training
image i; S: a subject (passport, receipt, ...); q: a question; alpha = 1.25; tau = 0.3.

  Eq. 1  h_i <- h_i * s_i,  s_i = tanh(m_i),  m_i = 2 at the start            (scaling vector)
  Eq. 2  L_refuse = NLL(refusal | q sensitive [+ answer-start context]),
         L_keep   = NLL(the original model's answer | q benign)
  Eq. 3  L_loc(m_i) = mean L_refuse + alpha * mean L_keep + lambda * mean_j |m_i[j] - 2|
  Eq. 4  M_S[j] = share of S's samples i with s_i[j] < 0                      (neuron score)
  Eq. 5  inactive: M = 0; weak: 0 < M <= tau; strong: M > tau (or the top k% by M)
  Eq. 6  h <- where(M_S > tau, h, stopgrad(h)) at the subject token           (the gate)
  Eq. 7  W_down <- W_down - lr * [ (M_S > tau) * grad_subject L + grad_other L ],
         L = mean L_refuse + alpha * mean L_keep (Eq. 2), Adam, subject after subject

The numbering follows the order of shared/NEURAL_GATE.md (check it against the paper before citing).
Grep ``# Eq. N`` for where each is computed. Steps 1-2 (Eq. 1-5): ``localize_layer``; step 3 (Eq. 6-7):
``gated_edit``. The exact speed-ups both loops use are in ``ngguard.fastpath`` (``prepare``), the hooks
in ``ngguard.hooks``; ``ngguard.methods.reference`` is the plain localization the tests hold this to.
"""
from __future__ import annotations

from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from loguru import logger
from tqdm import tqdm

from ..adapters.base import Adapter, Batch
from ..core import EditResult, Row, Sample, chunk_by_sample, encode_rows, encode_sample, kl_on_targets, row_nll
from ..fastpath import prepare
from ..hooks import HookState, deltas, edit_subject_state, replayed_prefix
from ..recipe import DEFAULT_CONTEXTS, EditSpec, LocalizationSpec


# ---------------------------------------------------------------------------------------------- Eq. 2-3
def sample_rows(samples: Sequence[Sample], refusal: str, alpha: float, contexts: Sequence[str] = ()) -> list[Row]:
    """One row per (question[, context]); weights such that each sample's sum(weight * NLL) is
    Eq. 3 without the L1 term: mean L_refuse (over its questions x contexts) + alpha * mean L_keep."""
    rows: list[Row] = []
    for i, s in enumerate(samples):
        sens = [(q, None) for q in s.sensitive] + [(q, c) for q in s.sensitive for c in contexts]
        for q, c in sens:
            rows.append(Row(i, q, s.subject, refusal, 1.0 / len(sens), c))             # Eq. 3: mean L_refuse
        for q, a in s.benign:
            rows.append(Row(i, q, s.subject, a, alpha / len(s.benign)))                # Eq. 3: alpha * mean L_keep
    return rows


def objective(nll: torch.Tensor, keep: torch.Tensor, sensitive: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 2-3 for one image's rows in the edit: mean L_refuse + alpha * mean L_keep. ``nll`` [B]
    per-row NLL; ``keep`` [B] the keep term per row (the NLL, or DINM's KL); ``sensitive`` [B] bool."""
    if not (~sensitive).any():
        return nll[sensitive].mean()
    return nll[sensitive].mean() + alpha * keep[~sensitive].mean()                   # Eq. 2


# ---------------------------------------------------------------------------------------------- Eq. 1, 3
def localize_layer(adapter: Adapter, samples: Sequence[Sample], layer: int, *, refusal: str, alpha: float = 1.25,
                   contexts: Sequence[str] = DEFAULT_CONTEXTS, steps: int = 25, lr: float = 0.5, eps: float = 1e-3,
                   l1: float = 1e-3, init: float = 2.0, stop_loss: float = 0.05, batch_size: int = 64,
                   batched: bool = True, shortcuts: bool = True, desc: str | None = None) -> LayerLocalization:
    """Train one scaling vector per sample at ``layer`` (Eq. 1) on Eq. 3; return scales and gates (Eq. 4).

    All samples' vectors train in one batched loop (they are independent: the model is frozen), each
    with early stopping under ``stop_loss``. ``shortcuts``: the exact speed-ups of ``fastpath.prepare``.
    ``batched=False``: the independent plain reference, one sample at a time, the whole model at every
    step (``ngguard.methods.reference``, the procedure of the authors' code; the tests' oracle)."""
    if layer >= adapter.num_layers - 1:
        raise ValueError(f"layer {layer} is the top layer of {adapter.num_layers}: its output at the subject token reaches "
                         f"no later token, so no scaling vector there can change the answer; localize layers "
                         f"0..{adapter.num_layers - 2}")
    model = adapter.model
    for p in model.parameters():
        p.requires_grad_(False)
    device, n, d = adapter.device, len(samples), adapter.hidden_size
    if not batched:
        from .reference import localize_reference
        return localize_reference(adapter, samples, layer, refusal=refusal, alpha=alpha, contexts=contexts, steps=steps,
                                  lr=lr, eps=eps, l1=l1, init=init, stop_loss=stop_loss)

    rows = sample_rows(samples, refusal, alpha, contexts)
    row_sample = torch.tensor([r.sample for r in rows], device=device)                 # [R] row -> sample
    row_weight = torch.tensor([r.weight for r in rows], device=device)                 # [R] Eq. 3 weights
    questions = {key: i for i, key in enumerate(dict.fromkeys((r.sample, r.text) for r in rows))}
    row_group = torch.tensor([questions[(r.sample, r.text)] for r in rows], device=device)
    chunks = [(c, prepare(adapter, encode_rows(adapter, samples, [rows[i] for i in c]).to(device), layer,
                          frozen_above=True, shortcuts=shortcuts, sample_of_row=row_sample[c], question_of_row=row_group[c]))
              for c in chunk_by_sample(rows, batch_size)]
    # the scaling vectors live on the layer's own device (a model spread by a device_map), the
    # per-sample bookkeeping where the logits come back (``adapter.device``)
    m = torch.full((n, d), init, device=adapter.layer_device(layer), requires_grad=True)  # [n, d]
    opt = torch.optim.Adam([m], lr=lr, eps=eps)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    used = torch.zeros(n, dtype=torch.long)
    last = torch.full((n,), float("inf"))
    state = HookState()

    def scaled(h: torch.Tensor, rows_: torch.Tensor) -> torch.Tensor:                  # h [B, d] at the subject
        idx = state.sample_of_row.to(m.device)[rows_.to(m.device)]
        return h * torch.tanh(m[idx]).to(h.device, h.dtype)                            # Eq. 1

    bar = tqdm(range(steps), desc=desc or f"localize L{layer}", unit="step", leave=False, disable=desc is None and n == 1)
    with (replayed_prefix(adapter, layer, state) if shortcuts else nullcontext()), \
            edit_subject_state(adapter, layer, scaled, lambda: state.subject_index):
        for _ in bar:
            opt.zero_grad()
            sample_loss = torch.zeros(n, device=device)                                # [n]
            for c, pb in chunks:
                rs = row_sample[c]
                if done[rs].all():
                    continue
                per_row = pb.nll(model, state) * row_weight[c]                         # Eq. 2, weighted (Eq. 3)
                per_row.sum().backward()
                sample_loss.index_add_(0, rs, per_row.detach())
            reg = l1 * (m - init).abs().mean(-1)                                       # Eq. 3: the L1 term [n]
            sample_loss += reg.detach().to(device)
            active = ~done
            last[active.cpu()] = sample_loss[active].cpu()
            used[active.cpu()] += 1
            newly_done = active & (sample_loss < stop_loss)
            (reg * active.float().to(m.device)).sum().backward()                       # only samples still training
            frozen = (~active | newly_done).to(m.device)
            keep = m.detach()[frozen].clone()
            m.grad[frozen] = 0
            opt.step()
            with torch.no_grad():  # finished samples keep their vector exactly
                m[frozen] = keep
            done |= newly_done
            bar.set_postfix(loss=f"{sample_loss[active].mean().item():.3f}", done=f"{int(done.sum())}/{n}")
            if done.all():
                break
    return LayerLocalization.of(layer, torch.tanh(m.detach()).cpu(), [s.subject for s in samples], last, used)


def localize(adapter: Adapter, samples: Sequence[Sample], layer: int, spec: LocalizationSpec, edit: EditSpec, *,
             desc: str | None = None) -> LayerLocalization:
    """``localize_layer`` with the recipe's sections (the refusal and alpha are the edit's: the same in
    steps 1 and 3)."""
    return localize_layer(adapter, samples, layer, refusal=edit.refusal, alpha=edit.alpha, contexts=spec.contexts,
                          steps=spec.steps, lr=spec.lr, eps=spec.eps, l1=spec.l1, init=spec.init,
                          stop_loss=spec.stop_loss, batch_size=spec.batch_size, desc=desc)


# ---------------------------------------------------------------------------------------------- Eq. 4-5
def gates_from_scales(scales: torch.Tensor, subjects: Sequence[str]) -> dict[str, torch.Tensor]:
    """M[j] per subject = share of that subject's samples whose scale at j is negative. scales [n, d]."""
    gates = {}
    for subject in dict.fromkeys(subjects):
        idx = [i for i, s in enumerate(subjects) if s == subject]
        gates[subject] = (scales[idx] < 0).float().mean(0)                             # Eq. 4
    return gates


@dataclass
class LayerLocalization:
    layer: int
    scales: torch.Tensor                 # [n_samples, hidden] = tanh(m) after training
    subjects: list[str]                  # subject of each sample
    losses: torch.Tensor                 # final loss per sample
    steps: torch.Tensor                  # steps each sample used
    gates: dict[str, torch.Tensor] = field(default_factory=dict)  # subject -> M in [0, 1]

    @classmethod
    def of(cls, layer: int, scales: torch.Tensor, subjects: list[str], losses, steps) -> "LayerLocalization":
        return cls(layer, scales, subjects, losses, steps, gates_from_scales(scales, subjects))

    def strong(self, subject: str, threshold: float = 0.3, top_k: float | None = None) -> torch.Tensor:
        """Boolean mask of strongly active dims of ``subject`` (M > threshold, or the top_k% by M)."""
        M = self.gates[subject]
        if top_k is not None:
            k = max(1, round(M.numel() * top_k / 100))
            mask = torch.zeros_like(M, dtype=torch.bool)
            mask[torch.topk(M + 1e-6 * -self.scales[self._idx(subject)].mean(0), k).indices] = True
            return mask & (M > 0)                                                      # Eq. 5 (top-k variant)
        return M > threshold                                                           # Eq. 5

    def _idx(self, subject: str) -> list[int]:
        return [i for i, s in enumerate(self.subjects) if s == subject]

    def stats(self, threshold: float = 0.3, top_k: float | None = None) -> dict[str, dict[str, float]]:
        """Per subject: shares of inactive (M = 0), weak and strong dims (Eq. 5)."""
        out = {}
        for subject, M in self.gates.items():
            strong = self.strong(subject, threshold, top_k)
            out[subject] = {
                "inactive": (M == 0).float().mean().item(),
                "weak": ((M > 0) & ~strong).float().mean().item(),
                "strong": strong.float().mean().item(),
                "mean_loss": self.losses[self._idx(subject)].mean().item(),
            }
        return out

    def strong_share(self, threshold: float = 0.3, top_k: float | None = None) -> float:
        """Mean share of strongly active dims over subjects (the layer-search criterion)."""
        return sum(s["strong"] for s in self.stats(threshold, top_k).values()) / max(1, len(self.gates))


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    inter, union = (a & b).sum().item(), (a | b).sum().item()
    return 1.0 if union == 0 else inter / union


# ---------------------------------------------------------------------------------------------- Eq. 6-7
def gate(mask: torch.Tensor):
    """The hook function of Eq. 6 for a subject's strong dims ``mask`` [d]: h [B, d] at the subject token
    passes gradient only where the mask is on."""
    return lambda h, rows: torch.where(mask.to(h.device), h, h.detach())                # Eq. 6


def gated_edit(adapter: Adapter, samples: Sequence[Sample], layers: Sequence[int], *,
               gates: Mapping[int, Mapping[str, torch.Tensor]] | None, module: str, refusal: str, alpha: float,
               lr: float, eps: float, steps: int, stop_loss: float, keep: str = "nll", retain: Sequence[Sample] = (),
               shortcuts: bool = True, name: str = "neural_gate") -> EditResult:
    """Eq. 7 on ``module`` of ``layers``, in place on ``adapter.model``; returns the new weights.

    Only an fp32 delta of each edited matrix trains (``hooks.deltas``); subjects in sequence, each
    image's questions up to ``steps`` times (stop under ``stop_loss``). ``gates[layer][subject]``: the
    subject's strong dims (Eq. 6); None: no gate (the no_gate ablation). ``keep``: the benign term,
    "nll" (Eq. 2) or "kl" (DINM: KL to the unedited model's distribution). ``retain``: general samples
    (benign only) whose original answers are also kept, weight ``alpha``, one per step in turn (not in
    the paper). ``shortcuts``: layers below the lowest edited one are replayed (``fastpath.prepare``)."""
    model = adapter.model
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # no dropout; gradients still flow
    log: list[dict] = []
    below = min(layers) - 1 if shortcuts else -1  # layers <= below are replayed (-1: none)

    def prep(batch: Batch):
        return prepare(adapter, batch, below, frozen_above=False, shortcuts=shortcuts)

    retain_batches = [prep(adapter.encode([r.image] * len(r.benign), [q for q, _ in r.benign],
                                          targets=[a for _, a in r.benign]).to(adapter.device))
                      for r in retain if r.benign]
    n_retain = 0
    state = HookState()
    with deltas(adapter, layers, module) as ds:
        for subject in dict.fromkeys(s.subject for s in samples):
            todo = [s for s in samples if s.subject == subject]
            opt = torch.optim.Adam([d.delta for d in ds.values()], lr=lr, eps=eps)
            with ExitStack() as gated:
                for layer in layers if gates is not None else ():
                    gated.enter_context(edit_subject_state(adapter, layer, gate(gates[layer][subject]),
                                                           lambda: state.subject_index))
                for s in tqdm(todo, desc=f"edit {name} {subject}", unit="image", leave=False):
                    batch, sens = encode_sample(adapter, s, refusal)
                    pb = prep(batch)
                    first = lossv = None
                    n_steps = 0
                    with replayed_prefix(adapter, below, state) if below >= 0 else nullcontext():
                        ref_logits = None
                        if keep == "kl":
                            for d in ds.values():
                                d.enabled = False
                            with torch.no_grad():
                                ref_logits = pb.logits(model, state)
                            for d in ds.values():
                                d.enabled = True
                        for _ in range(steps):
                            logits = pb.logits(model, state)
                            nll = row_nll(logits, pb.labels)                               # Eq. 2
                            kept = kl_on_targets(logits, ref_logits, pb.labels) if keep == "kl" else nll
                            loss = objective(nll, kept, sens, alpha)
                            if retain_batches:  # general answers to keep (no subject token: no gate there)
                                rb = retain_batches[n_retain % len(retain_batches)]
                                n_retain += 1
                                loss = loss + alpha * rb.nll(model, state).mean()
                            lossv = loss.item()
                            first = lossv if first is None else first
                            if lossv < stop_loss:
                                break
                            opt.zero_grad()
                            loss.backward()     # Eq. 7: the gate (Eq. 6) masks the subject token's part
                            opt.step()          # Eq. 7
                            n_steps += 1
                    log.append({"subject": subject, "key": s.key, "steps": n_steps, "loss_first": first,
                                "loss_last": lossv})
            logger.info(f"edit {name}: {subject} done ({len(todo)} images, mean last loss "
                        f"{sum(r['loss_last'] for r in log if r['subject'] == subject) / max(1, len(todo)):.4f})")
        weights = {pname: d.merged() for pname, d in ds.items()}
        delta_out = {pname: d.delta.detach().cpu().clone() for pname, d in ds.items()}
    with torch.no_grad():
        for layer in layers:
            adapter.component(layer, module).weight.copy_(weights[adapter.parameter_name(layer, module)])
    return EditResult({k: v.detach().cpu() for k, v in weights.items()}, delta_out, log)


def apply_neural_gate(adapter: Adapter, samples: Sequence[Sample], layers: Sequence[int], *, module: str, refusal: str,
                      hparams: EditSpec, gates: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
                      retain: Sequence[Sample] = (), shortcuts: bool = True) -> EditResult:
    """The method's step 3 (``REGISTRY["neural_gate"]``): Eq. 7 through the gates of localization."""
    if not gates:
        raise ValueError("method neural_gate needs gates (run localization first)")
    return gated_edit(adapter, samples, layers, gates=gates, module=module, refusal=refusal, alpha=hparams.alpha,
                      lr=hparams.lr, eps=hparams.eps, steps=hparams.steps, stop_loss=hparams.stop_loss, retain=retain,
                      shortcuts=shortcuts)
