"""Step 1-2 of Neural Gate: learnable scaling vectors at the subject token, neuron statistics, gates,
and the layer search.

For a decoder layer l and a training image i, the layer's output at the LAST subject token of every
question about image i is multiplied elementwise by s_i = tanh(m_i) (m_i initialised to 2, weights
frozen). m_i is trained to make the model refuse the sensitive questions (also after five
answer-start contexts) and keep its own answers to the benign ones. A dimension j is *active* in
sample i when s_i[j] < 0; the gate of a subject is M[j] = share of its samples where j is active.

Unlike the reference code, which loops image by image, all images' vectors are optimised in one
batched loop (they are independent: the model is frozen), with per-image early stopping.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .adapters.base import Adapter, Batch

DEFAULT_CONTEXTS = ("The image shows that.", "Therefore, it is.", "Because I am just.", "I am an AI.", "You want to.")


@dataclass
class Sample:
    """All questions about one training image: the unit of localization and of the edit loop."""

    image: Image.Image
    subject: str
    sensitive: list[str]
    benign: list[tuple[str, str]]  # (prompt, the ORIGINAL model's answer)
    key: str = ""


@dataclass
class Row:
    sample: int
    text: str
    subject: str
    target: str
    weight: float
    prefix: str | None = None


def sample_rows(samples: Sequence[Sample], refusal: str, alpha: float, contexts: Sequence[str] = ()) -> list[Row]:
    """Rows with per-row loss weights such that each sample's loss is
    mean NLL(refusal | sensitive [+ contexts]) + alpha * mean NLL(original answer | benign)."""
    rows: list[Row] = []
    for i, s in enumerate(samples):
        sens = [(q, None) for q in s.sensitive] + [(q, c) for q in s.sensitive for c in contexts]
        for q, c in sens:
            rows.append(Row(i, q, s.subject, refusal, 1.0 / len(sens), c))
        for q, a in s.benign:
            rows.append(Row(i, q, s.subject, a, alpha / len(s.benign)))
    return rows


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


def row_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token NLL of the labelled tokens, per row."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = labels[:, 1:]
    mask = tgt != -100
    tok = -logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    return tok.sum(-1) / mask.sum(-1).clamp_min(1)


@contextmanager
def edit_subject_state(adapter: Adapter, layer: int, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       subject_index: Callable[[], torch.Tensor]):
    """Forward hook on decoder layer ``layer``: its output at each row's subject position ``p_b`` is
    replaced by ``fn(h[b, p_b], rows)`` (out of place, so autograd sees the replacement)."""

    def hook(_module, _inputs, output):
        idx = subject_index()
        if idx is None:  # rows without a subject (e.g. general retention queries): nothing to do
            return output
        h = output[0] if isinstance(output, tuple) else output
        idx = idx.to(h.device)
        rows = torch.arange(h.shape[0], device=h.device)
        h = h.index_put((rows, idx), fn(h[rows, idx], rows))
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = adapter.component(layer, "layer").register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer during replay: layers before the target pass their input on
    (it is ignored), the target layer returns its recorded output."""

    def __init__(self, store: dict, last: bool):
        super().__init__()
        self.store, self.last = store, last

    def forward(self, hidden_states, *args, **kwargs):
        return self.store["out"] if self.last else hidden_states


@contextmanager
def replayed_prefix(adapter: Adapter, layer: int, store: dict):
    """While active, decoder layers 0..``layer`` are not computed: the output of ``layer`` is taken
    from ``store["out"]`` (recorded once, the model being frozen). Hooks registered on
    ``adapter.component(layer, "layer")`` inside this context attach to the stand-in."""
    originals = [adapter.layers[i] for i in range(layer + 1)]
    try:
        for i in range(layer + 1):
            adapter.layers[i] = _Replay(store, i == layer)
        yield
    finally:
        for i, m in enumerate(originals):
            adapter.layers[i] = m


@torch.no_grad()
def record_layer_output(adapter: Adapter, layer: int, inputs: dict):
    out = {}

    def hook(_m, _i, o):
        out["o"] = (o[0] if isinstance(o, tuple) else o).detach()
        return o

    h = adapter.component(layer, "layer").register_forward_hook(hook)
    try:
        adapter.model(**inputs, use_cache=False)
    finally:
        h.remove()
    return out["o"]


@dataclass
class LayerLocalization:
    layer: int
    scales: torch.Tensor                 # [n_samples, hidden] = tanh(m) after training
    subjects: list[str]                  # subject of each sample
    losses: torch.Tensor                 # final loss per sample
    steps: torch.Tensor                  # steps each sample used
    gates: dict[str, torch.Tensor] = field(default_factory=dict)  # subject -> M in [0, 1]

    def strong(self, subject: str, threshold: float = 0.3, top_k: float | None = None) -> torch.Tensor:
        """Boolean mask of strongly active dims of ``subject`` (M > threshold, or the top_k% by M)."""
        M = self.gates[subject]
        if top_k is not None:
            k = max(1, round(M.numel() * top_k / 100))
            mask = torch.zeros_like(M, dtype=torch.bool)
            mask[torch.topk(M + 1e-6 * -self.scales[self._idx(subject)].mean(0), k).indices] = True
            return mask & (M > 0)
        return M > threshold

    def _idx(self, subject: str) -> list[int]:
        return [i for i, s in enumerate(self.subjects) if s == subject]

    def stats(self, threshold: float = 0.3, top_k: float | None = None) -> dict[str, dict[str, float]]:
        """Per subject: shares of inactive (M = 0), weak and strong dims; strong = the gate
        (M > threshold, or the top_k% by M), weak = the other dims with M > 0."""
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


def localize_layer(adapter: Adapter, samples: Sequence[Sample], layer: int, *, refusal: str, alpha: float = 1.25,
                   contexts: Sequence[str] = DEFAULT_CONTEXTS, steps: int = 25, lr: float = 0.5, eps: float = 1e-3,
                   l1: float = 1e-3, init: float = 2.0, stop_loss: float = 0.05, batch_size: int = 64,
                   batched: bool = True, replay: bool = True, desc: str | None = None) -> LayerLocalization:
    """Train one scaling vector per sample at ``layer``; return scales and per-subject gates.

    ``batched=False`` runs the reference procedure (one sample at a time, its own optimiser, the whole
    model at every step): used by the benchmark and the tests to check that the batched loop finds
    the same neurons. ``replay``: compute layers <= ``layer`` once and replay their output (exact,
    since the model is frozen).
    """
    model = adapter.model
    for p in model.parameters():
        p.requires_grad_(False)
    device = adapter.device
    n, d = len(samples), adapter.hidden_size
    if not batched:
        parts = [localize_layer(adapter, [s], layer, refusal=refusal, alpha=alpha, contexts=contexts, steps=steps,
                                lr=lr, eps=eps, l1=l1, init=init, stop_loss=stop_loss, batch_size=batch_size,
                                batched=True, replay=False, desc=None) for s in tqdm(samples, desc=desc or f"localize L{layer} (loop)")]
        out = LayerLocalization(layer, torch.cat([p.scales for p in parts]), [s.subject for s in samples],
                                torch.cat([p.losses for p in parts]), torch.cat([p.steps for p in parts]))
        out.gates = gates_from_scales(out.scales, out.subjects)
        return out

    rows = sample_rows(samples, refusal, alpha, contexts)
    chunks = []
    for c in chunk_by_sample(rows, batch_size):
        batch = encode_rows(adapter, samples, [rows[i] for i in c]).to(device)
        if replay:  # layers <= l are frozen: run them once
            cached = record_layer_output(adapter, layer, batch.inputs)
            batch = Batch({k: v for k, v in batch.inputs.items() if k not in adapter.vision_only_inputs},
                          batch.labels, batch.subject_index)
        else:
            cached = None
        chunks.append((c, batch, cached))
    row_sample = torch.tensor([r.sample for r in rows], device=device)
    row_weight = torch.tensor([r.weight for r in rows], device=device)
    m = torch.full((n, d), init, device=device, requires_grad=True)
    opt = torch.optim.Adam([m], lr=lr, eps=eps)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    used = torch.zeros(n, dtype=torch.long)
    last = torch.full((n,), float("inf"))
    current: dict[str, torch.Tensor] = {}

    def scale(v: torch.Tensor, rows_: torch.Tensor) -> torch.Tensor:
        return v * torch.tanh(m[current["samples"][rows_]]).to(v.dtype)

    bar = tqdm(range(steps), desc=desc or f"localize L{layer}", unit="step", leave=False, disable=desc is None and n == 1)
    with (replayed_prefix(adapter, layer, current) if replay else nullcontext()), \
            edit_subject_state(adapter, layer, scale, lambda: current["subject_index"]):
        for step in bar:
            opt.zero_grad()
            sample_loss = torch.zeros(n, device=device)
            for idx, batch, cached in chunks:
                rs = row_sample[idx]
                if done[rs].all():
                    continue
                current["samples"], current["subject_index"], current["out"] = rs, batch.subject_index, cached
                nll = row_nll(model(**batch.inputs, use_cache=False).logits, batch.labels)
                per_row = nll * row_weight[idx]
                per_row.sum().backward()
                sample_loss.index_add_(0, rs, per_row.detach())
            reg = (m.detach() - init).abs().mean(-1) * l1
            sample_loss += reg
            active = ~done
            last[active.cpu()] = sample_loss[active].cpu()
            used[active.cpu()] += 1
            newly_done = active & (sample_loss < stop_loss)
            # L1 pull towards "no change" (only for samples still training)
            (l1 * (m - init).abs().mean(-1) * active.float()).sum().backward()
            keep = m.detach()[~active | newly_done].clone()
            m.grad[~active | newly_done] = 0
            opt.step()
            with torch.no_grad():  # finished samples keep their vector exactly
                m[~active | newly_done] = keep
            done |= newly_done
            bar.set_postfix(loss=f"{sample_loss[active].mean().item():.3f}", done=f"{int(done.sum())}/{n}")
            if done.all():
                break
    scales = torch.tanh(m.detach()).cpu()
    out = LayerLocalization(layer, scales, [s.subject for s in samples], last, used)
    out.gates = gates_from_scales(scales, out.subjects)
    return out


def gates_from_scales(scales: torch.Tensor, subjects: Sequence[str]) -> dict[str, torch.Tensor]:
    """M[j] per subject = share of that subject's samples whose scale at j is negative."""
    gates = {}
    for subject in dict.fromkeys(subjects):
        idx = [i for i, s in enumerate(subjects) if s == subject]
        gates[subject] = (scales[idx] < 0).float().mean(0)
    return gates


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    inter, union = (a & b).sum().item(), (a | b).sum().item()
    return 1.0 if union == 0 else inter / union
