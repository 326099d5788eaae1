"""Step 1-2 of Neural Gate: learnable scaling vectors at the subject token, neuron statistics, gates,
and the layer search.

For a decoder layer l and a training image i, the layer's output at the LAST subject token of every
question about image i is multiplied elementwise by s_i = tanh(m_i) (m_i initialised to 2, weights
frozen). m_i is trained to make the model refuse the sensitive questions (also after five
answer-start contexts) and keep its own answers to the benign ones. A dimension j is *active* in
sample i when s_i[j] < 0; the gate of a subject is M[j] = share of its samples where j is active.

Unlike the reference code, which loops image by image and runs the whole model at every step, all
images' vectors are optimised in one batched loop (they are independent: the model is frozen), with
per-image early stopping, and what the frozen model makes constant is computed once (exactly, see
``_prepare_chunk``): the layers up to l, the prompt prefix before the subject token (a KV cache), and
each question's shared part across its answer-start contexts (``_Split``).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm
from transformers import DynamicCache

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
def _swapped_layers(adapter: Adapter, stand_ins: dict[int, torch.nn.Module]):
    originals = {i: adapter.layers[i] for i in stand_ins}
    try:
        for i, m in stand_ins.items():
            adapter.layers[i] = m
        yield
    finally:
        for i, m in originals.items():
            adapter.layers[i] = m


def replayed_prefix(adapter: Adapter, layer: int, store: dict):
    """While active, decoder layers 0..``layer`` are not computed: the output of ``layer`` is taken
    from ``store["out"]`` (recorded once, the model being frozen). Hooks registered on
    ``adapter.component(layer, "layer")`` inside this context attach to the stand-in."""
    return _swapped_layers(adapter, {i: _Replay(store, i == layer) for i in range(layer + 1)})


def record_layer_output(adapter: Adapter, layer: int, inputs: dict) -> torch.Tensor:
    """The output of decoder layer ``layer`` for ``inputs``; the layers above it are skipped."""
    return _run(adapter, layer, inputs, above=False)[0]


def _heads(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a row -> group key: the first row of each group (groups in sorted key order) and each
    row's group number."""
    groups, index = keys.unique(return_inverse=True)
    heads = torch.stack([(keys == g).nonzero()[0, 0] for g in groups])
    return heads, index


def _common_run(ids: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row: how many leading tokens it shares with its reference row ``ref``."""
    return (ids == ref).long().cumprod(-1).sum(-1)


def prefix_length(batch: Batch, row_sample: torch.Tensor) -> int:
    """How many leading positions are frozen for every row during localization: tokens the row shares
    with the first row of its sample (same image, so the same states), cut at the earliest subject
    token. Causal attention: positions before the subject never see the scaled state, so their keys and
    values at every layer stay what they were; they are computed once instead of at every step."""
    ids, mask = batch.inputs["input_ids"], batch.inputs.get("attention_mask")
    heads, index = _heads(row_sample)
    ref = ids[heads[index]]
    if mask is not None:  # padding is never shared
        ref = torch.where(mask != 0, ref, -1)
    shared = int(_common_run(ids, ref).min())
    return max(0, min(shared, int(batch.subject_index.min())))


def target_window(labels: torch.Tensor) -> int:
    """How many trailing positions need logits: from the one before the first target token on
    (``logits_to_keep``; labels[:, -keep:] are then aligned with those logits)."""
    first = (labels != -100).float().argmax(-1)
    return labels.shape[1] - max(0, int(first.min()) - 1)


def forward_features(model) -> tuple[str | None, bool]:
    """Name of the forward's KV-cache argument (``cache`` in recent transformers, ``past_key_values``
    before) and whether it takes ``logits_to_keep``."""
    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    return name, "logits_to_keep" in params


@dataclass
class _Split:
    """The rows of a chunk cut in two, for questions asked with several answer-start contexts: the
    STEMS (each distinct question once, from the end of the frozen prefix to just before its first
    target) carry the subject token; the TAILS (every row from its stem's end on) attend to their
    stem's keys and values. One stem instead of six copies of each sensitive question."""

    stem_inputs: dict[str, torch.Tensor]
    stem_out: torch.Tensor                   # replayed output of the layer at the stem positions
    stem_subject: torch.Tensor
    stem_sample: torch.Tensor | None         # stem -> row of ``prefix`` (its sample); None without a prefix
    stem_rows: torch.Tensor                  # stem -> one of its rows (for the scaling vector)
    tail_inputs: dict[str, torch.Tensor]     # with explicit position_ids and a 4D mask that skips stem padding
    tail_out: torch.Tensor
    tail_labels: torch.Tensor
    row_stem: torch.Tensor                   # row -> its stem
    stem_len: int                            # padded stem length (after the prefix)


@dataclass
class _Chunk:
    """Whole samples' rows, prepared once for the batched optimisation loop."""

    rows: list[int]                          # indices into the sample_rows list
    inputs: dict[str, torch.Tensor]          # model inputs (positions >= start when a prefix is cached)
    labels: torch.Tensor
    subject_index: torch.Tensor
    out: torch.Tensor | None = None          # replayed output of the layer (positions >= start)
    start: int = 0                           # frozen prefix length (0: no cache)
    prefix: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # K/V of layers > l, one row per sample
    rep: torch.Tensor | None = None          # row -> its sample's row in ``prefix``
    keep: int = 0                            # logits_to_keep (0 = all positions)
    split: _Split | None = None

    def _cache(self, layer: int, length: int, *parts: tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]):
        """A fresh cache (it grows in place) holding, for the layers above ``layer``, the keys/values of
        each part (``kv`` list, rows picked by ``index``) one after the other along the positions.
        Layers <= l are replayed stand-ins and never read the cache; they only need the right length
        (the model takes the past length from layer 0)."""
        def pick(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # one source row: a view
            return t.expand(len(index), *t.shape[1:]) if len(t) == 1 else t.index_select(0, index.to(t.device))

        dummy = parts[0][0][0][0].new_zeros(1, 1, length, 1)
        kv = []
        for i in range(len(parts[0][0])):
            k, v = zip(*[(pick(p[i][0], index), pick(p[i][1], index)) for p, index in parts])
            kv.append((torch.cat(k, 2) if len(k) > 1 else k[0], torch.cat(v, 2) if len(v) > 1 else v[0]))
        return DynamicCache(ddp_cache_data=[(dummy, dummy)] * (layer + 1) + kv)

    def nll(self, model, layer: int, cache_arg: str | None, current: dict, row_sample: torch.Tensor) -> torch.Tensor:
        """Per-row NLL of the targets under the current scaling vectors (``current`` feeds the hooks)."""
        if self.split is None:
            current["samples"], current["subject_index"], current["out"] = row_sample, self.subject_index, self.out
            kw = {"logits_to_keep": self.keep} if self.keep else {}
            if self.start:
                kw |= {cache_arg: self._cache(layer, self.start, (self.prefix, self.rep)), "use_cache": True}
            else:
                kw |= {"use_cache": False}
            return row_nll(model(**self.inputs, **kw).logits, self.labels)
        sp = self.split
        current["samples"], current["subject_index"], current["out"] = row_sample[sp.stem_rows], sp.stem_subject, sp.stem_out
        kw = {cache_arg: self._cache(layer, self.start, (self.prefix, sp.stem_sample))} if self.start else {}
        res = model(**sp.stem_inputs, use_cache=True, logits_to_keep=1, **kw)
        cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
        # the stems' own keys/values (the prefix part carries no gradient: taken from ``prefix`` again)
        stems = [(cache.layers[i].keys[:, :, self.start:], cache.layers[i].values[:, :, self.start:])
                 for i in range(layer + 1, len(cache.layers))]
        current["subject_index"], current["out"] = None, sp.tail_out  # no subject token in the tails
        parts = ([(self.prefix, self.rep)] if self.start else []) + [(stems, sp.row_stem)]
        tails = self._cache(layer, self.start + sp.stem_len, *parts)
        return row_nll(model(**sp.tail_inputs, **{cache_arg: tails}, use_cache=True).logits, sp.tail_labels)


def _split(start: int, ids: torch.Tensor, labels: torch.Tensor, out: torch.Tensor, subject_index: torch.Tensor,
           lengths: torch.Tensor, row_group: torch.Tensor, rep: torch.Tensor | None, dtype) -> _Split | None:
    """Stems and tails of a chunk (see ``_Split``); None when no question has several rows or a stem
    would not hold its subject token. All tensors are the rows AFTER the frozen prefix of length
    ``start`` (positions counted from there); ``lengths``: real (unpadded) length of each row."""
    device = ids.device
    stem_rows_t, row_stem = _heads(row_group)
    if len(stem_rows_t) == len(row_group):
        return None
    first_label = (labels != -100).float().argmax(-1)
    shared = _common_run(ids, ids[stem_rows_t[row_stem]])
    stem_rows, stem_end = stem_rows_t.tolist(), []
    for g_i in range(len(stem_rows)):
        members = row_stem == g_i
        end = min(int(shared[members].min()), int(first_label[members].min()) - 1)  # targets' logits: in the tails
        if end <= int(subject_index[members].max()):  # the subject token must be in the stem
            return None
        stem_end.append(end)
    S, n_stems = max(stem_end), len(stem_rows)
    stem_ids = ids.new_zeros(n_stems, S)
    stem_out = out.new_zeros(n_stems, S, out.shape[-1])
    for g_i, (r, e) in enumerate(zip(stem_rows, stem_end)):
        stem_ids[g_i, :e], stem_out[g_i, :e] = ids[r, :e], out[r, :e]
    ends = torch.tensor(stem_end, device=device)[row_stem]              # per row: where its tail starts
    C = int((lengths - ends).max())
    pos = ends[:, None] + torch.arange(C, device=device)[None]          # [R, C], counted after the prefix
    at = pos.clamp_max(ids.shape[1] - 1)
    tail_labels = torch.where(pos < lengths[:, None], labels.gather(1, at), torch.full_like(at, -100))
    # keys: [frozen prefix | stems, padded to S | tails]: a row sees the prefix and its own stem up to
    # the stem's end, then its own tail causally
    j = torch.arange(start + S + C, device=device)[None, None]
    i = torch.arange(C, device=device)[None, :, None]
    allowed = (j < start + ends[:, None, None]) | ((j >= start + S) & (j - start - S <= i))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return _Split(
        stem_inputs={"input_ids": stem_ids, "attention_mask": causal_mask(S, start + S, dtype, device)},
        stem_out=stem_out, stem_subject=subject_index[stem_rows_t],
        stem_sample=None if rep is None else rep[stem_rows_t], stem_rows=stem_rows_t,
        tail_inputs={"input_ids": ids.gather(1, at), "attention_mask": mask[:, None], "position_ids": pos + start},
        tail_out=out.gather(1, at.to(out.device)[..., None].expand(-1, -1, out.shape[-1])), tail_labels=tail_labels,
        row_stem=row_stem, stem_len=S)


def causal_mask(queries: int, keys: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive [1, 1, queries, keys] mask: the queries are the last ``queries`` of ``keys`` positions.
    For right-padded rows it is exact without a padding term: a real token never sees a later pad."""
    i = torch.arange(queries, device=device)[:, None] + (keys - queries)
    j = torch.arange(keys, device=device)[None]
    return torch.zeros(queries, keys, dtype=dtype, device=device).masked_fill(j > i, torch.finfo(dtype).min)[None, None]


def _run(adapter: Adapter, layer: int, inputs: dict, *, above: bool, cache=None):
    """A frozen forward returning (output of ``layer``, the KV cache); ``above=False`` skips the
    layers above ``layer`` (pass-through stand-ins) and the vocabulary projection."""
    cache_arg, has_keep = forward_features(adapter.model)
    out = {}

    def hook(_m, _i, o):
        out["o"] = (o[0] if isinstance(o, tuple) else o).detach()
        return o

    skip = {} if above else {i: _Replay({}, False) for i in range(layer + 1, adapter.num_layers)}
    kw = ({"logits_to_keep": 1} if has_keep else {}) | ({cache_arg: cache} if cache is not None else {})
    h = adapter.component(layer, "layer").register_forward_hook(hook)
    try:
        with torch.no_grad(), _swapped_layers(adapter, skip):
            res = adapter.model(**inputs, use_cache=cache is not None or above, **kw)
    finally:
        h.remove()
    return out["o"], getattr(res, "cache", None) or getattr(res, "past_key_values", None)


def _prepare_chunk(adapter: Adapter, layer: int, batch: Batch, rows: list[int], row_sample: torch.Tensor,
                   row_group: torch.Tensor, *, shortcuts: bool) -> _Chunk:
    """Without ``shortcuts``: the batch as the reference runs it (whole model, all logits). With them
    (all exact, the model being frozen): layers <= l are replayed from one recorded forward; with
    ``adapter.prefix_cache``, the prefix before the subject token is run once per sample and taken
    from a KV cache (``prefix_length``), each question asked with several answer-start contexts is run
    once up to its answer (``_Split``; ``row_group`` = question of each row), and the masks are built
    once; logits are computed only from the first target token on."""
    if not shortcuts:
        return _Chunk(rows, batch.inputs, batch.labels, batch.subject_index)
    cache_arg, has_keep = forward_features(adapter.model)
    ids, mask = batch.inputs["input_ids"], batch.inputs.get("attention_mask")
    right_padded = mask is None or bool((mask[:, 1:] <= mask[:, :-1]).all())
    fast = adapter.prefix_cache and cache_arg is not None and right_padded
    start = prefix_length(batch, row_sample) if fast else 0
    vision = {k: v for k, v in batch.inputs.items() if k in adapter.vision_only_inputs}
    text = {k: v for k, v in batch.inputs.items() if k not in adapter.vision_only_inputs}
    heads, rep = _heads(row_sample)  # the first row of each sample; row -> its sample
    firsts = heads.tolist()
    if start:  # the image must lie wholly before the cut in every row, or wholly after it in every row
        is_image = ids[firsts] == adapter.image_token_id
        first_image = torch.where(is_image.any(-1), is_image.float().argmax(-1), ids.shape[1])
        last_image = torch.where(is_image.any(-1), ids.shape[1] - 1 - is_image.flip(-1).float().argmax(-1), -1)
        if bool((last_image >= start).any()):
            start = min(start, int(first_image.min()))
        image_in_prefix = bool((last_image >= 0).any()) and bool((last_image < start).all())
        others = [k for k, v in text.items() if k not in ("input_ids", "attention_mask")
                  and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == ids.shape[1]]
        if others:
            raise ValueError(f"prefix cache: per-token inputs {others} are not supported; set prefix_cache = False")
    if not start:
        out, _ = _run(adapter, layer, batch.inputs, above=False)
        chunk = _Chunk(rows, text, batch.labels, batch.subject_index, out)
    else:
        # 1. the prefix, once per sample: every layer's keys/values
        head = {"input_ids": ids[firsts, :start]} | ({"attention_mask": mask[firsts, :start]} if mask is not None else {})
        _, cache = _run(adapter, layer, head | ({k: v[firsts] for k, v in vision.items()} if image_in_prefix else {}),
                        above=True)
        kv = [(cache.layers[i].keys, cache.layers[i].values) for i in range(adapter.num_layers)]
        # 2. every row after the prefix, layers <= l only: the output to replay
        tail = {"input_ids": ids[:, start:],
                "attention_mask": causal_mask(ids.shape[1] - start, ids.shape[1], adapter.model.dtype, ids.device)}
        lower = DynamicCache(ddp_cache_data=[(k.index_select(0, rep.to(k.device)), v.index_select(0, rep.to(v.device)))
                                             for k, v in kv[:layer + 1]])
        out, _ = _run(adapter, layer, tail | ({} if image_in_prefix else vision), above=False, cache=lower)
        chunk = _Chunk(rows, tail, batch.labels[:, start:], batch.subject_index - start, out, start,
                       [(k.clone(), v.clone()) for k, v in kv[layer + 1:]], rep)
    if fast and not start:
        chunk.inputs = {**chunk.inputs, "attention_mask": causal_mask(ids.shape[1], ids.shape[1], adapter.model.dtype,
                                                                      ids.device)}
    if fast and has_keep:
        lengths = (mask.sum(-1) if mask is not None else torch.full_like(row_sample, ids.shape[1])) - start
        chunk.split = _split(start, chunk.inputs["input_ids"], chunk.labels, chunk.out, chunk.subject_index, lengths,
                             row_group, chunk.rep, adapter.model.dtype)
        if chunk.split is not None:
            return chunk
    if has_keep:  # logits from the position before the first target token on
        chunk.keep = target_window(chunk.labels)
        chunk.labels = chunk.labels[:, -chunk.keep:]
    return chunk


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
                   batched: bool = True, shortcuts: bool = True, desc: str | None = None) -> LayerLocalization:
    """Train one scaling vector per sample at ``layer``; return scales and per-subject gates.

    ``batched=False`` runs the reference procedure (one sample at a time, its own optimiser, the whole
    model at every step): used by the benchmark and the tests to check that the batched loop finds
    the same neurons. ``shortcuts`` (exact, the model being frozen): replay layers <= ``layer`` from one
    recorded forward, take the prefix before the subject token from a KV cache, compute logits only
    where there are targets (see ``_prepare_chunk``).
    """
    if layer >= adapter.num_layers - 1:
        raise ValueError(f"layer {layer} is the top layer of {adapter.num_layers}: its output at the subject token reaches "
                         f"no later token, so no scaling vector there can change the answer; localize layers "
                         f"0..{adapter.num_layers - 2}")
    model = adapter.model
    for p in model.parameters():
        p.requires_grad_(False)
    device = adapter.device
    n, d = len(samples), adapter.hidden_size
    if not batched:
        parts = [localize_layer(adapter, [s], layer, refusal=refusal, alpha=alpha, contexts=contexts, steps=steps,
                                lr=lr, eps=eps, l1=l1, init=init, stop_loss=stop_loss, batch_size=batch_size,
                                batched=True, shortcuts=False, desc=None) for s in tqdm(samples, desc=desc or f"localize L{layer} (loop)")]
        out = LayerLocalization(layer, torch.cat([p.scales for p in parts]), [s.subject for s in samples],
                                torch.cat([p.losses for p in parts]), torch.cat([p.steps for p in parts]))
        out.gates = gates_from_scales(out.scales, out.subjects)
        return out

    rows = sample_rows(samples, refusal, alpha, contexts)
    row_sample = torch.tensor([r.sample for r in rows], device=device)
    row_weight = torch.tensor([r.weight for r in rows], device=device)
    questions = {key: i for i, key in enumerate(dict.fromkeys((r.sample, r.text) for r in rows))}
    row_group = torch.tensor([questions[(r.sample, r.text)] for r in rows], device=device)
    chunks = [_prepare_chunk(adapter, layer, encode_rows(adapter, samples, [rows[i] for i in c]).to(device), c,
                             row_sample[c], row_group[c], shortcuts=shortcuts)
              for c in chunk_by_sample(rows, batch_size)]
    cache_arg, _ = forward_features(model)
    # the scaling vectors live on the layer's own device (a model spread by a device_map), the
    # per-sample bookkeeping where the logits come back (``adapter.device``)
    m = torch.full((n, d), init, device=adapter.layer_device(layer), requires_grad=True)
    opt = torch.optim.Adam([m], lr=lr, eps=eps)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    used = torch.zeros(n, dtype=torch.long)
    last = torch.full((n,), float("inf"))
    current: dict[str, torch.Tensor] = {}

    def scale(v: torch.Tensor, rows_: torch.Tensor) -> torch.Tensor:
        idx = current["samples"].to(m.device)[rows_.to(m.device)]
        return v * torch.tanh(m[idx]).to(v.device, v.dtype)

    bar = tqdm(range(steps), desc=desc or f"localize L{layer}", unit="step", leave=False, disable=desc is None and n == 1)
    with (replayed_prefix(adapter, layer, current) if shortcuts else nullcontext()), \
            edit_subject_state(adapter, layer, scale, lambda: current["subject_index"]):
        for step in bar:
            opt.zero_grad()
            sample_loss = torch.zeros(n, device=device)
            for ch in chunks:
                rs = row_sample[ch.rows]
                if done[rs].all():
                    continue
                nll = ch.nll(model, layer, cache_arg, current, rs)
                per_row = nll * row_weight[ch.rows]
                per_row.sum().backward()
                sample_loss.index_add_(0, rs, per_row.detach())
            reg = (m.detach() - init).abs().mean(-1).to(device) * l1
            sample_loss += reg
            active = ~done
            last[active.cpu()] = sample_loss[active].cpu()
            used[active.cpu()] += 1
            newly_done = active & (sample_loss < stop_loss)
            # L1 pull towards "no change" (only for samples still training)
            (l1 * (m - init).abs().mean(-1) * active.float().to(m.device)).sum().backward()
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
