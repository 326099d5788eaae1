"""The exact speed-ups of the optimisation loops, behind one type: ``PreparedBatch``.

Localization (Eq. 3), the gated edit (Eq. 7) and MEMIT's target values run the same batch through a
model many times while only a little of the computation changes. ``prepare`` does once what stays
the same, exactly (no approximation; every shortcut has a plain path, ``shortcuts=False``, and a test
comparing the two):

1. lower-layer replay: layers <= l are frozen, so their output is recorded once and a stand-in
   returns it (``hooks.replayed_prefix``); the vision tower is not run again;
2. prefix KV cache (only when the WHOLE model is frozen: localization): positions before the subject
   token never see the changed state (causal attention), so their keys/values at every layer are
   computed once per sample (``prefix_length``);
3. stems and tails (the same case): a question asked with several answer-start contexts is run once
   up to its answer (the stem, holding the subject token); each row then runs only its own ending
   (``_Split``);
4. logits only on targets: ``logits_to_keep`` from the position before the first target token.

A loop then calls ``PreparedBatch.nll`` (per-row NLL of the targets) or ``.logits`` with a
``HookState`` the prepared batch fills in for the hooks. ``prepare_rows`` turns localization's rows
(one per question and context, ``core.Row``) into such batches, whole samples per batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .adapters.base import Adapter, Batch
from .compat import cache_from_kv, cache_kv, cache_layers, forward_features, output_cache
from .core import Row, Sample, chunk_by_sample, encode_rows, row_nll
from .hooks import HookState, skipped_layers, swapped_layers

__all__ = ["PreparedBatch", "prepare", "prepare_rows", "record_layer_output", "prefix_length", "target_window", "causal_mask",
           "forward_features"]

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, heads, T, d_head]


@dataclass
class _Split:
    """The rows of a batch cut in two, for questions asked with several answer-start contexts: the
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
class _Shared:
    """The edit's rows cut after the prefix they all share (one image: the image's positions come
    before the first question token in every row). The edited weights change that prefix, so it is not
    cached across steps: each forward runs it once (one row), then every row's remaining tokens,
    PACKED into one sequence without padding (a block mask: each token sees the prefix and its own
    row's earlier tokens; its own position ids), reading the prefix's keys/values. Exact (causal
    attention); the rows' gradients flow back into the one prefix. Logits are taken only where a
    target follows and put back as [B, W, V] (``unpack``)."""

    inputs: dict[str, torch.Tensor]          # the prefix of one row
    out: torch.Tensor                        # [1, P, d] replayed output of ``layer`` at the prefix
    length: int                              # P
    keep: torch.Tensor                       # [K] packed positions whose logits are needed
    unpack: torch.Tensor                     # [B, W] -> index into those K logits (labels -100 where unused)


@dataclass
class PreparedBatch:
    """A batch ready for repeated forwards (see the module docstring). Built by ``prepare``."""

    inputs: dict                             # model inputs (positions >= start when a prefix is cached)
    labels: torch.Tensor                     # [B, T'] aligned with the logits the forward returns
    subject_index: torch.Tensor | None       # [B] (counted from ``start``); None: rows without a subject
    sample_of_row: torch.Tensor | None = None  # [B] row -> sample (for per-sample hooks)
    layer: int = -1                          # layers <= layer are replayed from ``out`` (-1: none)
    out: torch.Tensor | None = None          # recorded output of ``layer`` (positions >= start)
    start: int = 0                           # frozen prefix length (0: no cache)
    prefix: KV = field(default_factory=list)  # K/V of layers > layer, one row per sample
    rep: torch.Tensor | None = None          # row -> its sample's row in ``prefix``
    keep: int = 0                            # logits_to_keep (0 = all positions)
    split: _Split | None = None
    use_cache: bool | None = None            # passed to the forward when not None
    cache_arg: str | None = None             # the forward's KV-cache argument (compat.forward_features)
    shared: _Shared | None = None            # the edit's shared prefix, run once per forward

    @property
    def replays(self) -> bool:
        return self.out is not None

    def bind(self, state: HookState) -> HookState:
        """Point the hooks at this batch's rows (replayed output, subject positions, samples)."""
        state.out, state.subject_index, state.sample_of_row = self.out, self.subject_index, self.sample_of_row
        return state

    def _kwargs(self) -> dict:
        kw = {"logits_to_keep": self.keep} if self.keep else {}
        if self.start:
            return kw | {self.cache_arg: self._cache(self.start, (self.prefix, self.rep)), "use_cache": True}
        return kw if self.use_cache is None else kw | {"use_cache": self.use_cache}

    def logits(self, model, state: HookState) -> torch.Tensor:
        """The forward's logits [B, T', V] (aligned with ``labels``); not for split batches."""
        if self.split is not None:
            raise ValueError("a split batch has no logits of its own; use nll()")
        if self.shared is None:
            self.bind(state)
            return model(**self.inputs, **self._kwargs()).logits
        sh = self.shared
        state.out, state.subject_index, state.sample_of_row = sh.out, None, None  # no subject token in the prefix
        cache = output_cache(model(**sh.inputs, use_cache=True, logits_to_keep=1))
        kv = [cache_kv(cache, i) for i in range(self.layer + 1, cache_layers(cache))]
        self.bind(state)
        one = torch.zeros(1, dtype=torch.long, device=sh.keep.device)
        logits = model(**self.inputs, **{self.cache_arg: self._cache(sh.length, (kv, one))}, use_cache=True,
                       logits_to_keep=sh.keep).logits
        return logits[0][sh.unpack]

    def nll(self, model, state: HookState) -> torch.Tensor:
        """Per-row NLL of the targets [B] under whatever the hooks currently do."""
        if self.split is None:
            return row_nll(self.logits(model, state), self.labels)
        sp = self.split
        state.out, state.subject_index, state.sample_of_row = sp.stem_out, sp.stem_subject, self.sample_of_row[sp.stem_rows]
        kw = {self.cache_arg: self._cache(self.start, (self.prefix, sp.stem_sample))} if self.start else {}
        res = model(**sp.stem_inputs, use_cache=True, logits_to_keep=1, **kw)
        cache = output_cache(res)
        # the stems' own keys/values (the prefix part carries no gradient: taken from ``prefix`` again)
        stems = [tuple(t[:, :, self.start:] for t in cache_kv(cache, i)) for i in range(self.layer + 1, cache_layers(cache))]
        state.subject_index, state.out = None, sp.tail_out  # no subject token in the tails
        parts = ([(self.prefix, self.rep)] if self.start else []) + [(stems, sp.row_stem)]
        tails = self._cache(self.start + sp.stem_len, *parts)
        return row_nll(model(**sp.tail_inputs, **{self.cache_arg: tails}, use_cache=True).logits, sp.tail_labels)

    def _cache(self, length: int, *parts: tuple[KV, torch.Tensor]):
        """A fresh cache (it grows in place) holding, for the layers above ``self.layer``, the keys/values
        of each part (``kv`` list, rows picked by ``index``) one after the other along the positions.
        Layers <= l are replayed stand-ins and never read the cache; they only need the right length
        (the model takes the past length from layer 0)."""
        def pick(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # one source row: a view
            return t.expand(len(index), *t.shape[1:]) if len(t) == 1 else t.index_select(0, index.to(t.device))

        dummy = parts[0][0][0][0].new_zeros(1, 1, length, 1)
        kv = []
        for i in range(len(parts[0][0])):
            k, v = zip(*[(pick(p[i][0], index), pick(p[i][1], index)) for p, index in parts])
            kv.append((torch.cat(k, 2) if len(k) > 1 else k[0], torch.cat(v, 2) if len(v) > 1 else v[0]))
        return cache_from_kv([(dummy, dummy)] * (self.layer + 1) + kv)


# ---------------------------------------------------------------------------------------------- prepare
def prepare(adapter: Adapter, batch: Batch, layer: int, *, frozen_above: bool, shortcuts: bool = True,
            sample_of_row: torch.Tensor | None = None, question_of_row: torch.Tensor | None = None) -> PreparedBatch:
    """``batch`` ready for a loop in which only what happens at and above decoder layer ``layer``
    changes (layers <= ``layer`` are replayed; -1: none). ``frozen_above``: the layers above are frozen
    too (only the hooked state at the subject token changes: localization); then the prefix before the
    subject comes from a KV cache (one per sample: ``sample_of_row``), each question with several rows
    (``question_of_row``) runs once up to its answer, and the forwards pass ``use_cache=False``.
    Without ``shortcuts``: the batch as is (the whole model, all logits)."""
    if not shortcuts:
        return PreparedBatch(dict(batch.inputs), batch.labels, batch.subject_index, sample_of_row,
                             use_cache=False if frozen_above else None)
    if not frozen_above:
        return _prepare_edit(adapter, batch, layer)
    return _prepare_frozen(adapter, batch, layer, sample_of_row, question_of_row)


def prepare_rows(adapter: Adapter, samples: Sequence[Sample], rows: Sequence[Row], layer: int, *, batch_size: int,
                 shortcuts: bool = True) -> list[tuple[PreparedBatch, torch.Tensor]]:
    """Localization's rows as prepared batches of whole samples (at most ``batch_size`` rows, or one
    sample), the model frozen above ``layer`` too; each with its rows' weights [B]. A batch's
    ``sample_of_row`` [B] maps its rows to ``samples``; rows asking the same question of the same
    sample (with other contexts) share a stem."""
    device = adapter.device
    row_sample = torch.tensor([r.sample for r in rows], device=device)                 # [R] row -> sample
    row_weight = torch.tensor([r.weight for r in rows], device=device)                 # [R]
    questions = {key: i for i, key in enumerate(dict.fromkeys((r.sample, r.text) for r in rows))}
    row_group = torch.tensor([questions[(r.sample, r.text)] for r in rows], device=device)
    return [(prepare(adapter, encode_rows(adapter, samples, [rows[i] for i in c]).to(device), layer, frozen_above=True,
                     shortcuts=shortcuts, sample_of_row=row_sample[c], question_of_row=row_group[c]), row_weight[c])
            for c in chunk_by_sample(rows, batch_size)]


def _prepare_edit(adapter: Adapter, batch: Batch, layer: int) -> PreparedBatch:
    inputs, out = dict(batch.inputs), None
    if layer >= 0:
        out = record_layer_output(adapter, layer, batch.inputs)
        inputs = {k: v for k, v in inputs.items() if k not in adapter.vision_only_inputs}
    cache_arg, has_keep = forward_features(adapter.model)
    pb = PreparedBatch(inputs, batch.labels, batch.subject_index, layer=layer, out=out, cache_arg=cache_arg)
    if layer >= 0 and has_keep and _share_prefix(adapter, pb, batch):
        return pb
    if has_keep:  # logits from the position before the first target token on
        pb.keep = target_window(pb.labels)
        pb.labels = pb.labels[:, -pb.keep:]
    return pb


def _share_prefix(adapter: Adapter, pb: PreparedBatch, batch: Batch) -> bool:
    """Cut ``pb`` (layers <= ``pb.layer`` replayed) after the prefix all its rows share, and pack the rest
    (``_Shared``). The prefix ends at the first position where a row's token or replayed state differs
    (the ids alone do not tell two images apart), at the earliest subject token and before the first
    target. False (``pb`` unchanged) where that cannot be done exactly."""
    ids, mask = batch.inputs["input_ids"], batch.inputs.get("attention_mask")
    B, T = ids.shape
    right_padded = mask is None or bool((mask[:, 1:] <= mask[:, :-1]).all())
    per_token = [k for k, v in pb.inputs.items() if k not in ("input_ids", "attention_mask")
                 and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[-1] == T]
    if not adapter.prefix_cache or pb.cache_arg is None or not right_padded or per_token or B < 2:
        return False
    device = ids.device
    lengths = mask.sum(-1) if mask is not None else torch.full((B,), T, device=device)
    ref = torch.where(mask != 0, ids[:1], -1) if mask is not None else ids[:1]
    same = (ids == ref).all(0) & (pb.out == pb.out[:1]).all(-1).all(0).to(device)   # [T]
    P = int(same.long().cumprod(0).sum())
    if pb.subject_index is not None:
        P = min(P, int(pb.subject_index.min()))
    labelled = pb.labels != -100
    if not bool(labelled.any(-1).all()):
        return False
    first = labelled.float().argmax(-1)                                  # [B] first target of each row
    P = min(P, int(first.min()) - 1)  # the logit before the first target comes from the row's own part
    if P < 1:
        return False
    n = lengths - P                                                      # [B] tokens per row after the prefix
    offset = torch.cumsum(n, 0) - n                                      # [B] where each row starts, packed
    row = torch.repeat_interleave(torch.arange(B, device=device), n)    # [N] the row of each packed token
    pos = P + torch.arange(len(row), device=device) - offset[row]        # [N] its position in the row
    i, j = torch.arange(len(row), device=device)[:, None], torch.arange(len(row), device=device)[None]
    allowed = torch.cat([torch.ones(len(row), P, dtype=torch.bool, device=device),
                         (row[:, None] == row[None]) & (j <= i)], 1)     # [N, P + N]
    dtype = adapter.model.dtype
    block = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    # logits from the position before each row's first target to its end, as a [B, W] window
    start = first - 1
    W = int((lengths - start).max())
    at = start[:, None] + torch.arange(W, device=device)[None]           # [B, W] positions in the row
    valid = at < lengths[:, None]
    packed_at = offset[:, None] + at - P                                 # [B, W] positions in the packed row
    unpack = torch.zeros(B, W, dtype=torch.long, device=device)
    unpack[valid] = torch.arange(int(valid.sum()), device=device)
    labels = torch.where(valid, pb.labels.gather(1, at.clamp_max(T - 1)), torch.full_like(at, -100))
    head = {"input_ids": ids[:1, :P]} | ({"attention_mask": mask[:1, :P]} if mask is not None else {})
    pb.shared = _Shared(head, pb.out[:1, :P], P, packed_at[valid], unpack)
    pb.inputs = {"input_ids": ids[row, pos][None], "attention_mask": block[None, None], "position_ids": pos[None]}
    pb.out, pb.labels = pb.out[row.to(pb.out.device), pos.to(pb.out.device)][None], labels
    if pb.subject_index is not None:  # per row, its subject token's packed position
        pb.subject_index = offset + pb.subject_index.to(device) - P
    return True


def _prepare_frozen(adapter: Adapter, batch: Batch, layer: int, row_sample: torch.Tensor,
                    row_group: torch.Tensor) -> PreparedBatch:
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
    common = dict(sample_of_row=row_sample, layer=layer, use_cache=False, cache_arg=cache_arg)
    if not start:
        out, _ = _run(adapter, layer, batch.inputs, above=False)
        pb = PreparedBatch(text, batch.labels, batch.subject_index, out=out, **common)
    else:
        # 1. the prefix, once per sample: every layer's keys/values
        head = {"input_ids": ids[firsts, :start]} | ({"attention_mask": mask[firsts, :start]} if mask is not None else {})
        _, cache = _run(adapter, layer, head | ({k: v[firsts] for k, v in vision.items()} if image_in_prefix else {}),
                        above=True)
        kv = [cache_kv(cache, i) for i in range(adapter.num_layers)]
        # 2. every row after the prefix, layers <= l only: the output to replay
        tail = {"input_ids": ids[:, start:],
                "attention_mask": causal_mask(ids.shape[1] - start, ids.shape[1], adapter.model.dtype, ids.device)}
        lower = cache_from_kv([(k.index_select(0, rep.to(k.device)), v.index_select(0, rep.to(v.device)))
                               for k, v in kv[:layer + 1]])
        out, _ = _run(adapter, layer, tail | ({} if image_in_prefix else vision), above=False, cache=lower)
        pb = PreparedBatch(tail, batch.labels[:, start:], batch.subject_index - start, out=out, start=start,
                           prefix=[(k.clone(), v.clone()) for k, v in kv[layer + 1:]], rep=rep, **common)
    if fast and not start:
        pb.inputs = {**pb.inputs, "attention_mask": causal_mask(ids.shape[1], ids.shape[1], adapter.model.dtype, ids.device)}
    if fast and has_keep:
        lengths = (mask.sum(-1) if mask is not None else torch.full_like(row_sample, ids.shape[1])) - start
        pb.split = _split(start, pb.inputs["input_ids"], pb.labels, pb.out, pb.subject_index, lengths, row_group,
                          pb.rep, adapter.model.dtype)
        if pb.split is not None:
            return pb
    if has_keep:  # logits from the position before the first target token on
        pb.keep = target_window(pb.labels)
        pb.labels = pb.labels[:, -pb.keep:]
    return pb


# ---------------------------------------------------------------------------------------------- pieces
def _run(adapter: Adapter, layer: int, inputs: dict, *, above: bool, cache=None):
    """A frozen forward returning (output of ``layer``, the KV cache); ``above=False`` skips the
    layers above ``layer`` (pass-through stand-ins) and the vocabulary projection."""
    cache_arg, has_keep = forward_features(adapter.model)
    out = {}

    def hook(_m, _i, o):
        out["o"] = (o[0] if isinstance(o, tuple) else o).detach()
        return o

    kw = ({"logits_to_keep": 1} if has_keep else {}) | ({cache_arg: cache} if cache is not None else {})
    h = adapter.component(layer, "layer").register_forward_hook(hook)
    try:
        with torch.no_grad(), swapped_layers(adapter, {}) if above else skipped_layers(adapter, layer):
            res = adapter.model(**inputs, use_cache=cache is not None or above, **kw)
    finally:
        h.remove()
    return out["o"], output_cache(res)


def record_layer_output(adapter: Adapter, layer: int, inputs: dict) -> torch.Tensor:
    """The output of decoder layer ``layer`` for ``inputs`` [B, T, d]; the layers above it are skipped."""
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


def causal_mask(queries: int, keys: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive [1, 1, queries, keys] mask: the queries are the last ``queries`` of ``keys`` positions.
    For right-padded rows it is exact without a padding term: a real token never sees a later pad."""
    i = torch.arange(queries, device=device)[:, None] + (keys - queries)
    j = torch.arange(keys, device=device)[None]
    return torch.zeros(queries, keys, dtype=dtype, device=device).masked_fill(j > i, torch.finfo(dtype).min)[None, None]


def _split(start: int, ids: torch.Tensor, labels: torch.Tensor, out: torch.Tensor, subject_index: torch.Tensor,
           lengths: torch.Tensor, row_group: torch.Tensor, rep: torch.Tensor | None, dtype) -> _Split | None:
    """Stems and tails of a batch (see ``_Split``); None when no question has several rows or a stem
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
