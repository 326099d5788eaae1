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
``gated_edit``. Around them: the exact speed-ups (``ngguard.methods.fastpath``: ``prepare``, ``prepare_rows``),
the hooks (``ngguard.methods.hooks``), the loops' bookkeeping (``loops``: early stopping, logs, write-back),
the layer search (``ngguard.layer_search``); ``reference`` is the plain localization the tests hold
this one to.
"""
from __future__ import annotations

from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from tqdm import tqdm

from ..adapters.base import Adapter
from .core import EditResult, Row, Sample, encode_sample, kl_on_targets, row_nll
from .fastpath import live_replay_holds, prepare, prepare_rows
from .hooks import Delta, HookState, deltas, edit_subject_state, replay_stand_ins, replayed_prefix, swapped_layers
from .registry import DEFAULT_CONTEXTS, EditSpec
from .loops import EditLog, SampleStop, check_localizable, commit, freeze, retain_batches, unedited_logits


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
                   shortcuts: bool = True, desc: str | None = None) -> LayerLocalization:
    """Train one scaling vector per sample at ``layer`` (Eq. 1) on Eq. 3; return scales and gates (Eq. 4).
    All samples' vectors train in one batched loop (independent: the model is frozen), each stopping
    under ``stop_loss``. ``shortcuts``: the exact speed-ups of ``fastpath``. The plain reference, one sample
    at a time, the whole model at every step, is ``reference.localize_reference`` (the tests' oracle)."""
    check_localizable(adapter, layer)
    model, n, d = adapter.model, len(samples), adapter.hidden_size
    freeze(model)
    batches = prepare_rows(adapter, samples, sample_rows(samples, refusal, alpha, contexts), layer,
                           batch_size=batch_size, shortcuts=shortcuts)             # [(rows, their Eq. 3 weights [B])]
    m = torch.full((n, d), init, device=adapter.layer_device(layer), requires_grad=True)  # [n, d] on the layer's device
    opt = torch.optim.Adam([m], lr=lr, eps=eps)
    stop, state = SampleStop(n, stop_loss, adapter.device), HookState()

    def scaled(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:                   # h [B, d] at the subject
        idx = state.sample_of_row.to(m.device)[rows.to(m.device)]
        return h * torch.tanh(m[idx]).to(h.device, h.dtype)                            # Eq. 1

    bar = tqdm(range(steps), desc=desc or f"localize L{layer}", unit="step", leave=False, disable=desc is None and n == 1)
    with (replayed_prefix(adapter, layer, state) if shortcuts else nullcontext()), \
            edit_subject_state(adapter, layer, scaled, lambda: state.subject_index):
        for _ in bar:
            opt.zero_grad()
            sample_loss = torch.zeros(n, device=adapter.device)                        # [n]
            for pb, weight in batches:
                if stop.skip(pb.sample_of_row):
                    continue
                per_row = pb.nll(model, state) * weight                                # Eq. 2, weighted (Eq. 3) [B]
                per_row.sum().backward()
                sample_loss.index_add_(0, pb.sample_of_row, per_row.detach())
            reg = l1 * (m - init).abs().mean(-1)                                       # Eq. 3: the L1 term [n]
            sample_loss += reg.detach().to(adapter.device)
            active = stop.record(sample_loss)
            (reg * active.float().to(m.device)).sum().backward()                       # only samples still training
            stop.step(opt, m)
            bar.set_postfix(loss=f"{sample_loss[active].mean().item():.3f}", done=f"{int(stop.done.sum())}/{n}")
            if stop.all_done:
                break
    return LayerLocalization.of(layer, torch.tanh(m.detach()).cpu(), [s.subject for s in samples], stop.last, stop.used)


# ---------------------------------------------------------------------------------------------- Eq. 4-5
def gates_from_scales(scales: torch.Tensor, subjects: Sequence[str]) -> dict[str, torch.Tensor]:
    """M[j] per subject = share of that subject's samples whose scale at j is negative. scales [n, d]."""
    return {subject: (scales[[i for i, s in enumerate(subjects) if s == subject]] < 0).float().mean(0)  # Eq. 4
            for subject in dict.fromkeys(subjects)}


@dataclass
class LayerLocalization:
    layer: int
    scales: torch.Tensor                 # [n_samples, hidden] = tanh(m) after training
    subjects: list[str]                  # subject of each sample
    losses: torch.Tensor                 # [n_samples] final loss
    steps: torch.Tensor                  # [n_samples] steps each sample used
    gates: dict[str, torch.Tensor] = field(default_factory=dict)  # subject -> M [hidden] in [0, 1]

    @classmethod
    def of(cls, layer: int, scales: torch.Tensor, subjects: list[str], losses, steps) -> "LayerLocalization":
        return cls(layer, scales, subjects, losses, steps, gates_from_scales(scales, subjects))

    def strong(self, subject: str, threshold: float = 0.3, top_k: float | None = None) -> torch.Tensor:
        """Boolean mask [hidden] of strongly active dims of ``subject`` (M > threshold, or the top_k% by M)."""
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
        """Per subject: shares of inactive (M = 0), weak and strong dims (Eq. 5), and the mean final loss."""
        share = lambda mask: mask.float().mean().item()  # noqa: E731
        return {subject: {"inactive": share(M == 0), "weak": share((M > 0) & ~self.strong(subject, threshold, top_k)),
                          "strong": share(self.strong(subject, threshold, top_k)),
                          "mean_loss": self.losses[self._idx(subject)].mean().item()} for subject, M in self.gates.items()}

    def strong_share(self, threshold: float = 0.3, top_k: float | None = None) -> float:
        """Mean share of strongly active dims over subjects (the layer-search criterion)."""
        return sum(s["strong"] for s in self.stats(threshold, top_k).values()) / max(1, len(self.gates))


# ---------------------------------------------------------------------------------------------- Eq. 6-7
def gate(mask: torch.Tensor):
    """The hook function of Eq. 6 for a subject's strong dims ``mask`` [d]: h [B, d] at the subject token
    passes gradient only where the mask is on."""
    return lambda h, rows: torch.where(mask.to(h.device), h, h.detach())                # Eq. 6


def gated_edit(adapter: Adapter, samples: Sequence[Sample], layers: Sequence[int], *,
               gates: Mapping[int, Mapping[str, torch.Tensor]] | None, module: str, refusal: str, hparams: EditSpec,
               keep: str = "nll", retain: Sequence[Sample] = (), shortcuts: bool = True,
               name: str = "neural_gate") -> EditResult:
    """Eq. 7 on ``module`` of ``layers``, in place on ``adapter.model``; returns the new weights. Only an
    fp32 delta of each matrix trains (``hooks.deltas``); subjects in sequence, each image's questions up
    to ``hparams.steps`` times, the whole sequence ``hparams.passes`` times (1: the paper; a fresh Adam per
    subject and pass). ``gates[layer][subject]``: the strong dims (Eq. 6); None: no gate (no_gate).
    ``keep``: the benign term, "nll" (Eq. 2) or "kl" (DINM). ``retain``: general samples whose original
    answers are kept too, weight alpha, one per step (not in the paper). ``shortcuts``: layers below the
    lowest edited one are replayed, and that one too where it can be (``_replayed_layers``, ``fastpath.prepare``)."""
    model, alpha = adapter.model, hparams.alpha
    freeze(model)
    model.eval()  # no dropout; gradients still flow
    log, state = EditLog(name), HookState()
    order = [(p, subject) for p in range(hparams.passes) for subject in dict.fromkeys(s.subject for s in samples)]
    with deltas(adapter, layers, module) as ds:
        top, live = _replayed_layers(adapter, samples, layers, module, ds, refusal, shortcuts)
        prep = lambda batch: prepare(adapter, batch, top, frozen_above=False, shortcuts=shortcuts, live=live)  # noqa: E731
        stand_ins = replay_stand_ins(adapter, top, state, live[1] if live else None) if top >= 0 else {}
        retained = retain_batches(adapter, retain, prep)
        for pass_, subject in order:
            opt = torch.optim.Adam([d.delta for d in ds.values()], lr=hparams.lr, eps=hparams.eps)
            with ExitStack() as gated:
                for layer in layers if gates is not None else ():
                    gated.enter_context(edit_subject_state(adapter, layer, gate(gates[layer][subject]),  # Eq. 6
                                                           lambda: state.subject_index, module=stand_ins.get(layer)))
                for s in log.images(samples, subject):
                    batch, sens = encode_sample(adapter, s, refusal)                   # sens [B] bool
                    pb, run = prep(batch), log.image(subject, s.key, pass_)
                    with swapped_layers(adapter, stand_ins):
                        ref_logits = unedited_logits(pb, model, state, ds) if keep == "kl" else None
                        for _ in range(hparams.steps):
                            logits = pb.logits(model, state)                           # [B, T, V]
                            nll = row_nll(logits, pb.labels)                           # Eq. 2 [B]
                            kept = kl_on_targets(logits, ref_logits, pb.labels) if keep == "kl" else nll
                            loss = objective(nll, kept, sens, alpha)
                            if retained is not None:  # general answers to keep (no subject token: no gate there)
                                loss = loss + alpha * next(retained).nll(model, state).mean()
                            if run.stop(loss.item(), hparams.stop_loss):
                                break
                            opt.zero_grad()
                            loss.backward()     # Eq. 7: the gate (Eq. 6) masks the subject token's part
                            opt.step()          # Eq. 7
            log.subject_done(subject, pass_)
        return commit(adapter, ds, layers, module, log)


def _replayed_layers(adapter: Adapter, samples: Sequence[Sample], layers: Sequence[int], module: str,
                     ds: Mapping[str, Delta], refusal: str, shortcuts: bool) -> tuple[int, tuple[str, Delta] | None]:
    """Which decoder layers the edit replays (``fastpath.prepare``): with ``shortcuts`` every layer below the
    lowest edited one, and that one too (``live``: its module's delta added to its recorded output) where
    its module's output adds into its output (checked on the first sample); (-1, None): none."""
    if not shortcuts:
        return -1, None
    lowest = min(layers)
    delta = ds[adapter.parameter_name(lowest, module)]
    batch = encode_sample(adapter, samples[0], refusal)[0] if samples else None
    if batch is not None and live_replay_holds(adapter, lowest, module, delta, batch.inputs):
        return lowest, (module, delta)
    return lowest - 1, None


def apply_neural_gate(adapter: Adapter, samples: Sequence[Sample], layers: Sequence[int], *, module: str, refusal: str,
                      hparams: EditSpec, gates: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
                      retain: Sequence[Sample] = (), shortcuts: bool = True) -> EditResult:
    """The method's step 3 (``REGISTRY["neural_gate"]``): Eq. 7 through the gates of localization."""
    if not gates:
        raise ValueError("method neural_gate needs gates (run localization first)")
    return gated_edit(adapter, samples, layers, gates=gates, module=module, refusal=refusal, hparams=hparams,
                      retain=retain, shortcuts=shortcuts)
