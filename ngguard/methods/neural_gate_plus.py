"""neural_gate_plus: the Neural Gate edit (Eq. 6-7) through ONE gate shared by every subject, localized
across subjects on the privacy concept (issue 27, "where the privacy concept lives").

The paper (``neural_gate.py``) localizes per subject (Eq. 1-5): the dims of the subject token's state
that had to flip for THAT subject's refusal. Its edit then refuses "attribute questions about this kind
of card" and generalises poorly to unseen subjects. The organism, though, represents the subject's
privacy linearly at the subject's last token (``privacy_probe``: a probe fitted on the seen subjects
reads unseen ones at ~0.97-1.00 after layers 1-7). Here the gate's dims are those that carry that
contrast, the same for every subject:

  h_i^l [d]   the output of edited layer l at the subject's last token of question i, unedited model;
  private subjects = those of the edit's samples (they have sensitive questions), public ones = the
  other subjects named by the retention data (``edit.retain``: the public look-alikes; the utility
  images' subject too, where its questions name it). Every question that names its subject counts.

  contrast c^l [d] (``edit.gate_contrast``):
    mean_diff  (mean_priv - mean_pub) / sqrt((var_priv + var_pub) / 2), over the SUBJECTS' mean states
               (each subject weighs the same; the variances are between subjects of a class, so a dim
               scores high only where the privacy classes differ consistently across subjects)
    probe      the weights of an L2 logistic regression private-vs-public on the standardized states
               (``privacy_probe.fit_probe``), rows weighted so that each subject weighs the same
  gate G^l [d] (``edit.gate_top_k``, ``edit.gate_soft``):
    hard       G = 1 on the top gate_top_k % of dims by |c|, else 0 (the role of Eq. 5's strong dims)
    soft       G = |c| / max |c| (gradient through the subject token scaled per dim)
  Eq. 6  h <- stopgrad(h) + G * (h - stopgrad(h)) at the subject token (= where(G, h, stopgrad(h)) when hard)
  Eq. 7  the paper's edit (``neural_gate.gated_edit``: W_down, Eq. 2's losses, Adam, subject after subject)
         with G in place of every subject's own M_S > tau.
  columns (``edit.gate_columns``): also the edited matrix's INPUT side, at every position: the same contrast on
         the module's input at the subject token (the MLP's neurons, for down_proj) picks its top gate_top_k %
         columns, and only those columns of W_down change (its gradient is masked; Adam leaves the rest at 0).
         The subject token carries well under 1 % of the edit's gradient on the organism (docs/history.md),
         so the gate of Eq. 6 alone can change little; this conditions the whole edit on the privacy inputs.

Beyond the paper: the gate's source (a cross-subject contrast of the unedited states instead of Eq. 1-4's
per-sample scaling vectors; no scaling vector is trained, so no localization step runs), the one gate for
all subjects, the soft gate, the column restriction. The edit itself, its losses and data are the paper's, with the recipe's
``edit`` settings (retention, passes) as for ``neural_gate``.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Sequence

import torch
from loguru import logger

from ..adapters.base import Adapter, find_subject_span
from .registry import EditSpec
from .core import EditResult, Sample
from .hooks import HookState, edit_subject_state
from .neural_gate import gated_edit
from .privacy_probe import fit_probe


def _names_subject(text: str, subject: str) -> bool:
    try:
        find_subject_span(text, subject)
        return True
    except ValueError:
        return False


@torch.no_grad()
def subject_states(adapter: Adapter, samples: Sequence[Sample], layers: Sequence[int], *, module: str | None = None,
                   batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """At the subject's last token of every question of ``samples`` that names its subject (sensitive and
    benign): the output of each decoder layer of ``layers`` [N, len(layers), d] and, with ``module``, the input
    of that module of each layer [N, len(layers), in] (else None), fp32 CPU; and the subject of each row."""
    adapter.model.eval()
    rows = [(s.image, q, s.subject) for s in samples for q in [*s.sensitive, *(p for p, _ in s.benign)]
            if _names_subject(q, s.subject)]
    outs, ins, state = [], [], HookState()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = adapter.encode([r[0] for r in chunk], [r[1] for r in chunk], subjects=[r[2] for r in chunk])
        batch = batch.to(adapter.device)
        state.subject_index, seen, seen_in = batch.subject_index, {}, {}
        at = (torch.arange(len(chunk)), batch.subject_index.cpu())
        with ExitStack() as hooks:  # the hook of Eq. 6, reading the state at the subject token instead of gating it
            for l in layers:
                hooks.enter_context(edit_subject_state(adapter, l, lambda h, rows, l=l: seen.setdefault(l, h),
                                                       lambda: state.subject_index))
                if module is not None:
                    h = adapter.component(l, module).register_forward_hook(  # (returns None: the output stays)
                        lambda _m, x, _o, l=l: seen_in.__setitem__(l, x[0].float().cpu()[at]))
                    hooks.callback(h.remove)
            adapter.model(**batch.inputs)
        outs.append(torch.stack([seen[l].float().cpu() for l in layers], 1))
        ins += [torch.stack([seen_in[l] for l in layers], 1)] if module is not None else []
    states = torch.cat(outs) if outs else torch.zeros(0, len(layers), adapter.hidden_size)
    return states, (torch.cat(ins) if ins else None), [r[2] for r in rows]


def _subject_weights(subjects: Sequence[str], labels: torch.Tensor) -> torch.Tensor:
    """Row weights: each class weighs 1/2, each subject the same within its class."""
    count = {s: subjects.count(s) for s in set(subjects)}
    n_cls = {c: len({s for s, y in zip(subjects, labels.tolist()) if y == c}) for c in (0.0, 1.0)}
    return torch.tensor([0.5 / (count[s] * n_cls[y]) for s, y in zip(subjects, labels.tolist())])


def privacy_contrast(states: torch.Tensor, subjects: Sequence[str], private: set[str], *, how: str = "mean_diff",
                     l2: float = 1e-2) -> torch.Tensor:
    """The contrast c [d] private vs public subjects of ``states`` [N, d] (one layer), per dim (module docstring)."""
    labels = torch.tensor([float(s in private) for s in subjects])
    if how == "probe":
        probe = fit_probe(states.unsqueeze(1), labels, [0], l2=l2, weights=_subject_weights(subjects, labels))
        return probe.w
    if how != "mean_diff":
        raise ValueError(f"edit.gate_contrast: {how!r} is not one of mean_diff, probe")
    names = list(dict.fromkeys(subjects))
    means = torch.stack([states[[i for i, s in enumerate(subjects) if s == n]].double().mean(0) for n in names])
    is_priv = torch.tensor([n in private for n in names])
    mp, mq = means[is_priv], means[~is_priv]
    var = lambda m: m.var(0, unbiased=True) if len(m) > 1 else torch.zeros_like(m[0])  # noqa: E731
    return ((mp.mean(0) - mq.mean(0)) / ((var(mp) + var(mq)) / 2).sqrt().clamp_min(1e-6)).float()


def gate_from_contrast(contrast: torch.Tensor, *, top_k: float = 10.0, soft: bool = False) -> torch.Tensor:
    """The shared gate G [d]: bool, the top ``top_k`` % dims by |c| (hard), or float |c| / max |c| (soft)."""
    score = contrast.abs()
    if soft:
        return score / score.max().clamp_min(1e-12)
    k = max(1, round(score.numel() * top_k / 100))
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask[torch.topk(score, k).indices] = True
    return mask


def shared_gates(adapter: Adapter, samples: Sequence[Sample], retain: Sequence[Sample], layers: Sequence[int],
                 hparams: EditSpec, module: str | None = None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict]:
    """layer -> the one gate of all subjects (``gate_from_contrast``); with ``hparams.gate_columns``, layer ->
    the input columns of ``module`` its edit may change (the same contrast on the module's input, always hard),
    else {}; and what they were built from."""
    private = {s.subject for s in samples if s.sensitive}
    public = [s for s in retain if s.subject not in private]
    if not private or not public:
        raise ValueError("method neural_gate_plus contrasts private with public subjects: it needs training samples "
                         "and retention samples of other subjects (edit.retain with public)")
    states, inputs, subjects = subject_states(adapter, [*samples, *public], layers,
                                              module=module if hparams.gate_columns else None)
    if not {*subjects} - private:
        raise ValueError("method neural_gate_plus: no retention question names its (public) subject")
    gates, columns = {}, {}
    info = {"private": sorted(private), "public": sorted({*subjects} - private), "rows": len(subjects)}
    for j, layer in enumerate(layers):
        c = privacy_contrast(states[:, j], subjects, private, how=hparams.gate_contrast)
        gates[layer] = gate_from_contrast(c, top_k=hparams.gate_top_k, soft=hparams.gate_soft)
        info[f"layer {layer}"] = {"gate_share": round(float((gates[layer] > 0).float().mean()), 4),
                                  "top_dims": torch.topk(c.abs(), min(5, c.numel())).indices.tolist()}
        if inputs is not None:  # not in the paper: the edit reads only the privacy-carrying inputs of the module
            ci = privacy_contrast(inputs[:, j], subjects, private, how=hparams.gate_contrast)
            columns[layer] = gate_from_contrast(ci, top_k=hparams.gate_top_k)
            info[f"layer {layer}"]["column_share"] = round(float(columns[layer].float().mean()), 4)
    logger.info(f"neural_gate_plus: shared gate ({hparams.gate_contrast}, "
                f"{'soft' if hparams.gate_soft else f'top {hparams.gate_top_k}%'}): {info}")
    return gates, columns, info


def apply_neural_gate_plus(adapter: Adapter, samples: Sequence[Sample], layers: Sequence[int], *, module: str,
                           refusal: str, hparams: EditSpec, gates=None, retain: Sequence[Sample] = (),
                           shortcuts: bool = True) -> EditResult:
    """``REGISTRY["neural_gate_plus"]``: Eq. 7 through one gate per layer shared by every subject
    (``shared_gates``); ``gates`` (per-subject localization) is ignored."""
    shared, columns, _ = shared_gates(adapter, samples, retain, layers, hparams, module)
    per_subject = {l: {s.subject: shared[l] for s in samples} for l in layers}  # Eq. 6: the same G for every subject
    return gated_edit(adapter, samples, layers, gates=per_subject, module=module, refusal=refusal, hparams=hparams,
                      retain=retain, shortcuts=shortcuts, name="neural_gate_plus", columns=columns or None)
