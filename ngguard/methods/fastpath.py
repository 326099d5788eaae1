"""The exact speed-ups of the optimisation loops, behind one type: ``PreparedBatch``.

Localization (Eq. 3), the gated edit (Eq. 7) and MEMIT's target values run the same batch through a
model many times while only a little of the computation changes. ``prepare`` does once what stays
the same, exactly (no approximation; every shortcut has a plain path, ``shortcuts=False``, and a test
comparing the two):

1. lower-layer replay: layers <= l are frozen, so their output is recorded once and a stand-in
   returns it (``hooks.replayed_prefix``); the vision tower is not run again. In the edit the lowest
   edited layer is replayed too (``live``): its output without the edit and the edited module's input
   are recorded, and each forward adds only the delta's term (exact up to summation order);
2. prefix KV cache (only when the WHOLE model is frozen: localization): positions before the subject
   token never see the changed state (causal attention), so their keys/values at every layer are
   computed once per sample (``prefix_length``);
3. stems and tails (the same case): a question asked with several answer-start contexts is run once
   up to its answer (the stem, holding the subject token); each row then runs only its own ending;
   stems and tails packed into one sequence without padding (``_Packed``);
4. the edit's shared prefix: an image's rows share the positions before the question, run once per
   step (they change with the edited weights), the rest of the rows packed (``_Shared``);
5. logits only on targets: ``logits_to_keep`` from the position before the first target token (a
   window per row where the rows are packed).

A loop then calls ``PreparedBatch.nll`` (per-row NLL of the targets) or ``.logits`` with a
``HookState`` the prepared batch fills in for the hooks. ``prepare_rows`` turns localization's rows
(one per question and context, ``core.Row``) into such batches, whole samples per batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..adapters.base import Adapter, Batch
from ..compat import cache_from_kv, cache_kv, cache_layers, forward_features, output_cache
from .core import Row, Sample, chunk_by_sample, encode_rows, row_nll
from .hooks import Delta, HookState, skipped_layers, swapped_layers

__all__ = ["PreparedBatch", "prepare", "prepare_rows", "record_layer_output", "prefix_length", "target_window", "causal_mask",
           "forward_features"]

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, heads, T, d_head]


@dataclass
class _Lines:
    """Rows cut after a frozen or shared prefix, their remaining tokens PACKED without padding into a
    few lines of equal width (a block of tokens that attend to each other never straddles two lines).
    A 4D block mask lets each token see the prefix keys it may see and the earlier tokens of its own
    block that it may see; each token keeps its position id. Logits are computed only in the columns
    where a needed one lies and handed back per row as a window [R, W] (``unpack``)."""

    inputs: dict[str, torch.Tensor]          # ids [L, W], the mask [L, 1, W, K + W], position ids [L, W]
    out: torch.Tensor                        # [L, W, d] replayed output of ``layer`` at the packed tokens
    subject: tuple[torch.Tensor, torch.Tensor] | None  # (line, column) of each subject token
    cols: torch.Tensor                       # [C] columns whose logits are computed
    pick: tuple[torch.Tensor, torch.Tensor]  # [K] (line, index into ``cols``) of each needed logit
    unpack: torch.Tensor                     # [R, W'] -> index into those K logits

    def logits(self, model, state: HookState, layer: int, cache_arg: str | None, prefix: KV) -> torch.Tensor:
        """[R, W', V] under the hooks (``state.out`` and ``state.subject_index`` set here)."""
        state.out, state.subject_index = self.out, self.subject
        kw: dict = {"use_cache": False}
        if prefix:  # layers <= l are replayed stand-ins: they only give the cache its length
            L = self.out.shape[0]
            dummy = prefix[0][0].new_zeros(1, 1, prefix[0][0].shape[2], 1)
            kv = [(k.expand(L, *k.shape[1:]), v.expand(L, *v.shape[1:])) for k, v in prefix]
            kw = {cache_arg: cache_from_kv([(dummy, dummy)] * (layer + 1) + kv), "use_cache": True}
        logits = model(**self.inputs, **kw, logits_to_keep=self.cols).logits
        return logits[self.pick][self.unpack]


@dataclass
class _Packed:
    """Localization's rows after the frozen prefix: first the STEMS (each distinct question once, up to
    just before its first target, holding the subject token), then every row's TAIL (its own ending:
    answer-start context and target), packed in lines (``_Lines``; a stem and its tails are one block).
    One stem instead of six copies of each sensitive question, and no padding."""

    lines: _Lines
    stem_rows: torch.Tensor                  # [G] stem -> one of its rows
    prefix: KV                               # per layer above: the batch's samples' prefixes one after another [1, h, n*P, d]


@dataclass
class _Shared:
    """The edit's rows cut after the prefix they all share (one image: the image's positions come
    before the first question token in every row). The edited weights change that prefix, so it is not
    cached across steps: each forward runs it once (one row), then the rows' remaining tokens packed
    (``_Lines``), reading the prefix's keys/values (exact: causal attention; the rows' gradients flow
    back into the one prefix)."""

    inputs: dict[str, torch.Tensor]          # the prefix of one row
    out: torch.Tensor                        # [1, P, d] replayed output of ``layer`` at the prefix
    lines: _Lines


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
    packed: _Packed | None = None            # localization's stems and tails, packed
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
        if self.packed is not None:
            raise ValueError("a packed batch has no logits of its own; use nll()")
        if self.shared is None:
            self.bind(state)
            return model(**self.inputs, **self._kwargs()).logits
        sh = self.shared
        state.out, state.subject_index, state.sample_of_row = sh.out, None, None  # no subject token in the prefix
        cache = output_cache(model(**sh.inputs, use_cache=True, logits_to_keep=1))
        kv = [cache_kv(cache, i) for i in range(self.layer + 1, cache_layers(cache))]
        state.sample_of_row = self.sample_of_row
        return sh.lines.logits(model, state, self.layer, self.cache_arg, kv)

    def nll(self, model, state: HookState) -> torch.Tensor:
        """Per-row NLL of the targets [B] under whatever the hooks currently do."""
        if self.packed is None:
            return row_nll(self.logits(model, state), self.labels)
        pk = self.packed
        state.sample_of_row = self.sample_of_row[pk.stem_rows]
        return row_nll(pk.lines.logits(model, state, self.layer, self.cache_arg, pk.prefix), self.labels)

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
            sample_of_row: torch.Tensor | None = None, question_of_row: torch.Tensor | None = None,
            live: tuple[str, Delta] | None = None) -> PreparedBatch:
    """``batch`` ready for a loop in which only what happens at and above decoder layer ``layer``
    changes (layers <= ``layer`` are replayed; -1: none). ``frozen_above``: the layers above are frozen
    too (only the hooked state at the subject token changes: localization); then the prefix before the
    subject comes from a KV cache (one per sample: ``sample_of_row``), each question with several rows
    (``question_of_row``) runs once up to its answer, and the forwards pass ``use_cache=False``.
    ``live`` (the edit): (module, its ``Delta``) of layer ``layer`` itself, replayed by ``hooks.LiveReplay``:
    ``out`` then holds the layer's output with the delta off and the module's input, side by side.
    Without ``shortcuts``: the batch as is (the whole model, all logits)."""
    if not shortcuts:
        return PreparedBatch(dict(batch.inputs), batch.labels, batch.subject_index, sample_of_row,
                             use_cache=False if frozen_above else None)
    if not frozen_above:
        return _prepare_edit(adapter, batch, layer, live)
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


def _prepare_edit(adapter: Adapter, batch: Batch, layer: int, live: tuple[str, Delta] | None = None) -> PreparedBatch:
    inputs, out = dict(batch.inputs), None
    if layer >= 0:
        out = record_layer_output(adapter, layer, batch.inputs) if live is None else record_live(adapter, layer, *live, batch.inputs)
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
    P = min(P, int(labelled.float().argmax(-1).min()) - 1)  # the logit before each first target: the row's own
    if P < 1:
        return False
    n = lengths - P                                                      # [B] tokens per row after the prefix
    pos, row = _ranges(torch.full_like(n, P), n)                         # [N] each packed token's position and row
    first = torch.cumsum(n, 0) - n                                       # [B] where each row starts, packed
    keep, unpack, labels = _window(pb.labels, lengths, first, torch.full_like(n, P))
    subject = None if pb.subject_index is None else first + pb.subject_index.to(device) - P
    lines = _layout(ids, pb.out, row, pos, group=row, own=row, sample=None, prefix_sample=torch.zeros(P, device=device),
                    keep=keep, unpack=unpack, subject=subject, dtype=adapter.model.dtype)
    head = {"input_ids": ids[:1, :P]} | ({"attention_mask": mask[:1, :P]} if mask is not None else {})
    pb.shared = _Shared(head, pb.out[:1, :P], lines)
    pb.inputs, pb.out, pb.labels, pb.subject_index = lines.inputs, lines.out, labels, None
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
        packed = _pack(start, pb.inputs["input_ids"], pb.labels, pb.out, pb.subject_index, lengths, row_group,
                       pb.rep, pb.prefix, adapter.model.dtype)
        if packed is not None:
            pb.packed, pb.labels = packed
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


def record_live(adapter: Adapter, layer: int, module: str, delta: Delta, inputs: dict) -> torch.Tensor:
    """For ``hooks.LiveReplay``: the output of decoder layer ``layer`` with ``delta`` switched off and the
    input of its ``module``, concatenated along the features [B, T, d + d_in]; the layers above skipped."""
    seen = {}
    h = adapter.component(layer, module).register_forward_pre_hook(lambda _m, args: seen.update(x=args[0].detach()))
    enabled, delta.enabled = delta.enabled, False
    try:
        out = record_layer_output(adapter, layer, inputs)
    finally:
        delta.enabled = enabled
        h.remove()
    return torch.cat([out, seen["x"].to(out.dtype)], -1)


def live_replay_holds(adapter: Adapter, layer: int, module: str, delta: Delta, inputs: dict) -> bool:
    """Whether the output of ``layer`` is its output without ``delta`` plus the delta's term on the input of
    ``module`` (the module's output adds into the layer's output, as an MLP's down-projection does), on
    ``inputs`` with a random delta: the condition under which ``hooks.LiveReplay`` stands in exactly."""
    d = adapter.hidden_size
    if delta.delta.shape[0] != d:  # the module's output is not in the layer's space
        return False
    rec = record_live(adapter, layer, module, delta, inputs)
    saved = delta.delta.detach().clone()
    with torch.no_grad():
        delta.delta.copy_(torch.randn(saved.shape, generator=torch.Generator().manual_seed(0)).to(saved) * 1e-2)
        try:
            enabled, delta.enabled = delta.enabled, True
            real = record_layer_output(adapter, layer, inputs)
            replayed = delta(rec[..., d:], rec[..., :d])
        finally:
            delta.enabled = enabled
            delta.delta.copy_(saved)
    return real.shape == replayed.shape and torch.allclose(real.float(), replayed.float(), rtol=1e-4, atol=1e-5)


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


def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For segments (start, count): every segment's positions one after another [sum(counts)], and the
    segment each belongs to."""
    seg = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    return starts[seg] + torch.arange(len(seg), device=counts.device) - first[seg], seg


def _window(labels: torch.Tensor, lengths: torch.Tensor, packed_start: torch.Tensor, row_start: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits each row needs, from the position before its first target to its end, as a window
    [R, W]: (packed positions to keep [K], ``unpack`` [R, W] into them, the window's labels [R, W]).
    ``packed_start``/``row_start`` [R]: where the row's packed part begins, in the packed sequence
    and in the row."""
    R, T = labels.shape
    first = (labels != -100).float().argmax(-1)
    begin = first - 1
    W = int((lengths - begin).max())
    at = begin[:, None] + torch.arange(W, device=labels.device)[None]         # [R, W] positions in the row
    valid = at < lengths[:, None]
    unpack = torch.zeros(R, W, dtype=torch.long, device=labels.device)
    unpack[valid] = torch.arange(int(valid.sum()), device=labels.device)
    keep = (packed_start[:, None] + at - row_start[:, None])[valid]
    return keep, unpack, torch.where(valid, labels.gather(1, at.clamp_max(T - 1)), torch.full_like(at, -100))


def _pack(start: int, ids: torch.Tensor, labels: torch.Tensor, out: torch.Tensor, subject_index: torch.Tensor,
          lengths: torch.Tensor, row_group: torch.Tensor, rep: torch.Tensor | None, prefix: KV, dtype
          ) -> tuple[_Packed, torch.Tensor] | None:
    """Stems and tails of a batch, packed (``_Packed``), and the window labels [R, W]; None when a
    stem would not hold its subject token or a row has no target. All tensors are the rows AFTER the
    frozen prefix of length ``start`` (positions counted from there); ``lengths``: real length of each
    row; ``rep``: row -> its sample's row of ``prefix`` (None without a prefix)."""
    device = ids.device
    labelled = labels != -100
    if not bool(labelled.any(-1).all()):
        return None
    heads, row_stem = _heads(row_group)                                        # stem -> a row; row -> stem
    first = labelled.float().argmax(-1)
    shared = _common_run(ids, ids[heads[row_stem]])
    end = torch.minimum(shared, first - 1)                                      # targets' logits: in the tails
    stem_end = torch.full((len(heads),), ids.shape[1], device=device).scatter_reduce(0, row_stem, end, "amin")
    if bool((subject_index.to(device) >= stem_end[row_stem]).any()):          # the subject token must be in the stem
        return None
    stem_pos, stem_of = _ranges(torch.zeros_like(stem_end), stem_end)
    tail_pos, tail_row = _ranges(stem_end[row_stem], lengths - stem_end[row_stem])
    n_stem = len(stem_pos)
    src_row = torch.cat([heads[stem_of], tail_row])                             # [N]
    pos = torch.cat([stem_pos, tail_pos])
    group = torch.cat([stem_of, row_stem[tail_row]])                          # a stem and its tails: one block
    own = torch.cat([torch.full_like(stem_of, -1), tail_row])                  # -1: a stem token (seen by its tails)
    kv: KV = []
    sample = prefix_sample = None
    if start:  # the batch's samples' prefixes, one after another: a token sees its own sample's
        n_s = len(prefix[0][0])
        sample, prefix_sample = rep.to(device)[src_row], torch.arange(n_s, device=device).repeat_interleave(start)
        flat = lambda t: t.transpose(0, 1).reshape(1, t.shape[1], n_s * t.shape[2], t.shape[3])  # noqa: E731
        kv = [(flat(k), flat(v)) for k, v in prefix]
    stem_first = torch.cumsum(stem_end, 0) - stem_end                          # [G] where each stem starts, packed
    tail_n = lengths - stem_end[row_stem]
    tail_first = len(stem_pos) + torch.cumsum(tail_n, 0) - tail_n             # [R]
    keep, unpack, window_labels = _window(labels, lengths, tail_first, stem_end[row_stem])
    lines = _layout(ids, out, src_row, pos, group=group, own=own, sample=sample, prefix_sample=prefix_sample, keep=keep,
                    unpack=unpack, subject=stem_first + subject_index.to(device)[heads], dtype=dtype, offset=start)
    return _Packed(lines, heads, kv), window_labels


def _layout(ids: torch.Tensor, out: torch.Tensor, src_row: torch.Tensor, pos: torch.Tensor, *, group: torch.Tensor,
            own: torch.Tensor, sample: torch.Tensor | None, prefix_sample: torch.Tensor | None, keep: torch.Tensor,
            unpack: torch.Tensor, subject: torch.Tensor | None, dtype, offset: int = 0) -> _Lines:
    """Packed tokens (flat [N]: token ``pos`` of row ``src_row``) laid out in lines (``_Lines``). A token
    sees the earlier tokens of its ``group`` (a block, kept in one line) whose ``own`` is -1 or its own,
    and the prefix keys of its ``sample`` (``prefix_sample`` [K]: the sample of each prefix key; with
    ``sample`` None every token sees them all). ``keep``/``subject``: flat indices of the needed logits
    and of the subject tokens; ``offset``: added to the position ids."""
    device, N = ids.device, len(src_row)
    sizes = torch.bincount(group)
    keys = 0 if prefix_sample is None else len(prefix_sample)

    def lay(width: int) -> tuple[list[int], list[int], int]:                  # greedy, blocks in order
        line_of, start_of, line, col = [], [], 0, 0
        for size in sizes.tolist():
            if col + size > width:
                line, col = line + 1, 0
            line_of.append(line)
            start_of.append(col)
            col += size
        return line_of, start_of, line + 1

    # the width with the least work: token slots, each costing ~16 d^2 in the linear layers and ~4 d (keys)
    # in attention (CPU attention with a mask counted twice)
    d = out.shape[-1]
    W = min(range(int(sizes.max()), N + 8, 8), key=lambda w: lay(w)[2] * w * (1 + (keys + w) / (4 * d)))
    line_of, start_of, L = lay(W)
    order = torch.argsort(group * N + torch.arange(N, device=device))         # by block, in packed order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(N, device=device) - (torch.cumsum(sizes, 0) - sizes)[group[order]]
    t_line = torch.tensor(line_of, device=device)[group]
    t_col = torch.tensor(start_of, device=device)[group] + rank

    def grid(values: torch.Tensor, fill: torch.Tensor | int) -> torch.Tensor:
        g = fill.clone() if isinstance(fill, torch.Tensor) else torch.full((L, W), fill, dtype=values.dtype, device=device)
        g[t_line, t_col] = values
        return g

    pad = -2 - torch.arange(L * W, device=device).view(L, W)                    # padding: a block of its own
    G, O, P = grid(group, pad), grid(own, pad), grid(pos, 0)
    allowed = (G[:, :, None] == G[:, None]) & (P[:, None] <= P[:, :, None]) & ((O[:, None] == -1) | (O[:, None] == O[:, :, None]))
    if prefix_sample is not None and len(prefix_sample):
        if sample is None:
            seen = torch.ones(L, W, len(prefix_sample), dtype=torch.bool, device=device)
        else:
            seen = grid(sample, -1)[:, :, None] == prefix_sample.to(device)[None, None]
        allowed = torch.cat([seen, allowed], -1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    cols = torch.unique(t_col[keep])
    out_grid = out.new_zeros(L, W, out.shape[-1])
    out_grid[t_line.to(out.device), t_col.to(out.device)] = out[src_row.to(out.device), pos.to(out.device)]
    return _Lines(inputs={"input_ids": grid(ids[src_row, pos], 0), "attention_mask": mask, "position_ids": P + offset},
                  out=out_grid, subject=None if subject is None else (t_line[subject], t_col[subject]), cols=cols,
                  pick=(t_line[keep], torch.searchsorted(cols, t_col[keep])), unpack=unpack)
