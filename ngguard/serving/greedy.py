"""Greedy generation for serving: the answers of ``model.generate`` (greedy), with less work per batch.

    decoder = GreedyDecoder(adapter, vision_cache=256)
    if decoder.supported:
        answers = decoder.generate(images, texts, max_new_tokens=48, keys=[image_key(im) for im in images],
                                   flags=[True, False], rows=row_patch.rows)

What it does differently from ``transformers``' ``generate`` (same model calls, same greedy choice):

- **finished rows leave the batch**: a row that produced its end-of-sequence token is dropped from
  the batch (its key/value cache rows, attention mask and position) before the next step, instead of
  being fed padding until the longest answer ends. In a batch of short and long answers ("red" next
  to a refusal) most decode steps then run on a few rows.
- **image features by content**: the vision tower + projector output of each image is kept in a
  bounded LRU keyed by a hash of the image's pixels (``image_key``: mode, size and bytes, never the
  object), so an image seen again (the compare view's two rows, a chat follow-up, a retried request)
  skips the vision tower. The features do not depend on the protection state: patches edit
  decoder layers only (``ngguard.patch`` checks the names).
- **prompt prefixes by image and state**: the keys and values of each prompt's prefix up to the end
  of its image (LLaVA: "<s>USER: " + the image tokens) are kept in an LRU bounded in bytes, keyed by
  (image content, protection state, prefix tokens); a row whose prefix is known, or shares it with
  another row of the batch (the same image asked two questions), computes only its own question:
  [prefix | padding | question], the padding masked, positions continuing after the prefix. The
  prefix is the same tokens at the same positions whatever follows, so its keys and values are the
  same numbers a full prefill computes for them (up to float summation order). In per-row mode the
  state is the row's flag; in merged mode the guard's state under its lock.
- **keys and values written in place**: the generation's cache keeps each layer's keys and values
  in a buffer with room for the answer (``_ReservedLayer``), so a decode step writes its one new
  position instead of copying the whole cache (``torch.cat`` in transformers' ``DynamicLayer``, per
  layer and step: ~11% of a 66-row organism batch's CPU); finished rows leave the buffer as before.
- the generation loop is a few tensor operations per step (no logits processors, stopping
  criteria, streamer, output bookkeeping).

The model sees exactly what ``generate`` gives it (checked on the organism and the tiny LLaVA in the
tests): the prefill with ``input_ids``, the 2-D ``attention_mask``, ``position_ids`` = cumsum of
the mask - 1 (0 on padding), a ``DynamicCache`` built from the text config (its layers writing in
place), the image features as ``mm_encoder_outputs``, ``logits_to_keep=1``; then one token per row
and step, positions + 1, the mask grown by one column. The next token is the argmax of the float32 logits (first maximum), as
greedy ``generate`` picks it. Supported when the adapter says its model places tokens by 1-D
positions after a cache (``Adapter.prefix_cache``), has ``get_image_features``, its encoded batch
holds only ``input_ids``, ``attention_mask`` and ``pixel_values``, and its generation config adds
no logits processor (repetition penalty, forced tokens, ...); otherwise ``supported`` is False and
callers use ``generate``. ``verify=True`` (default): the first batch is also run through
``generate`` and any difference turns the fast path off for good (a warning says so).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable, ContextManager, Sequence

import torch
from loguru import logger
from PIL import Image
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

if TYPE_CHECKING:  # pragma: no cover
    from ngguard.adapters import Adapter
    from ngguard.serving.stop import StopAfter

__all__ = ["GreedyDecoder", "FeatureCache", "image_key"]


def image_key(image: Image.Image) -> bytes:
    """A content key of a decoded image: blake2b-128 of its mode, size and pixel bytes (two images with
    the same pixels share it, whatever object or file they came from)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.digest()


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(v) for v in value)


class FeatureCache:
    """A thread-safe LRU of at most ``max_items`` values by key (0: keeps nothing) and, with
    ``max_bytes``, at most that many bytes of tensors (a value is a tensor or nested tuples of
    them; one larger than ``max_bytes`` is not kept). ``hits`` and ``misses`` count lookups."""

    def __init__(self, max_items: int = 256, *, max_bytes: int | None = None, what: str = "vision cache size"):
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 0:
            raise ValueError(f"{what} must be a non-negative integer, got {max_items!r}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict = OrderedDict()
        self._sizes: dict = {}
        self.nbytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key, value) -> None:
        if self.max_items == 0:
            return
        size = _nbytes(value)
        if self.max_bytes is not None and size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self.nbytes -= self._sizes[key]
            self._items[key] = value
            self._sizes[key] = size
            self.nbytes += size
            self._items.move_to_end(key)
            while len(self._items) > self.max_items or (self.max_bytes is not None and self.nbytes > self.max_bytes):
                old, _ = self._items.popitem(last=False)
                self.nbytes -= self._sizes.pop(old)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._sizes.clear()
            self.nbytes = 0


RowsContext = Callable[[list[bool]], ContextManager]


class _ReservedLayer(DynamicLayer):
    """``DynamicLayer`` with its keys and values in buffers [batch, heads, capacity, head_dim] that have
    room for ``reserve`` more positions: ``update`` writes the new positions in place and returns views
    of the filled part (the numbers ``torch.cat`` would give); a buffer is reallocated (and copied)
    only when full."""

    def __init__(self, reserve: int):
        super().__init__()
        self.reserve = int(reserve)
        self._k: torch.Tensor | None = None  # [batch, heads, capacity, head_dim]
        self._v: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = 0 if self._k is None else self.keys.shape[-2]  # positions held
        m = key_states.shape[-2]  # positions added
        if self._k is None or n + m > self._k.shape[-2]:
            shape = (*key_states.shape[:-2], n + m + self.reserve)
            k = key_states.new_empty(*shape, key_states.shape[-1])
            v = value_states.new_empty(*shape, value_states.shape[-1])
            if n:
                k[..., :n, :] = self.keys
                v[..., :n, :] = self.values
            self._k, self._v = k, v
        self._k[..., n:n + m, :] = key_states
        self._v[..., n:n + m, :] = value_states
        self.keys, self.values = self._k[..., :n + m, :], self._v[..., :n + m, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None:  # a buffer holds at least one position
            n = self.keys.shape[-2]
            self._k, self._v = self._k[indices, ...], self._v[indices, ...]
            self.keys, self.values = self._k[..., :n, :], self._v[..., :n, :]


def _reserved_cache(config, reserve: int) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose plain full-attention layers are ``_ReservedLayer``s with
    room for ``reserve`` positions beyond their first update (other layer types, e.g. sliding
    windows, stay as transformers builds them)."""
    cache = DynamicCache(config=config)
    cache.layers = [_ReservedLayer(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class GreedyDecoder:
    """Greedy answers for batches of (image, text) through ``adapter``'s model (see the module
    docstring). ``vision_cache``: image features kept (0: none); ``verify``: check the first batch
    against ``generate``; ``stop``: a ``StopAfter``: a row ends at the end of the refusal as at its
    end-of-sequence token (and its answer is cut there)."""

    def __init__(self, adapter: "Adapter", *, vision_cache: int = 256, prefix_cache_mb: float = 64.0,
                 verify: bool = True, stop: "StopAfter | None" = None):
        self.adapter = adapter
        self.stop = stop  # a row also ends at the end of this refusal (``ngguard.serving.stop``)
        self.cache = FeatureCache(vision_cache)
        if not 0 <= float(prefix_cache_mb) <= 1_000_000:
            raise ValueError(f"prefix cache size must be in 0..1000000 MB, got {prefix_cache_mb!r}")
        self.prefixes = FeatureCache(1_000_000 if prefix_cache_mb > 0 else 0,
                                     max_bytes=int(prefix_cache_mb * 2**20), what="prefix cache size")
        self._verify = verify
        self._lock = threading.Lock()
        self.reason = self._unsupported()
        self.steps = 0  # decode steps run (for tests and logs)
        self.row_steps = 0  # rows x decode steps actually computed

    @property
    def supported(self) -> bool:
        return self.reason is None

    def _unsupported(self) -> str | None:
        ad, model = self.adapter, self.adapter.model
        if not getattr(ad, "prefix_cache", False):
            return f"{type(ad).__name__} does not place tokens by 1-D positions after a cache"
        if tuple(getattr(ad, "vision_only_inputs", ())) != ("pixel_values",):
            return f"{type(ad).__name__}'s vision tower takes more than pixel_values"
        if getattr(model.config, "is_encoder_decoder", False):
            return "an encoder-decoder model"
        if getattr(getattr(model, "base_model", None), "get_image_features", None) is None:
            return "the model has no get_image_features"
        if getattr(model, "hf_device_map", None):
            return "a model spread over devices"
        config = ad.greedy_config(1)
        try:
            processors = model._get_logits_processor(generation_config=config, input_ids_seq_length=1,
                                                     encoder_input_ids=torch.ones(1, 1, dtype=torch.long),
                                                     prefix_allowed_tokens_fn=None, logits_processor=None,
                                                     device="cpu", model_kwargs={})
        except Exception as e:  # noqa: BLE001 - an unknown generate version: use generate
            return f"cannot inspect the generation config ({type(e).__name__}: {e})"
        if len(processors):
            return f"the generation config adds logits processors ({', '.join(type(p).__name__ for p in processors)})"
        return None

    def _eos(self) -> set[int]:
        eos = self.adapter.greedy_config(1).eos_token_id
        return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])

    # ---- image features -------------------------------------------------------------------------------
    def _features(self, pixel_values: torch.Tensor, keys: Sequence[bytes] | None) -> list[torch.Tensor]:
        """One [tokens, hidden] feature block per image, from the cache where its key is known."""
        encoder = self.adapter.model.base_model.get_image_features
        if keys is None or self.cache.max_items == 0:
            return list(encoder(pixel_values=pixel_values, return_dict=True).pooler_output)
        feats: list[torch.Tensor | None] = [self.cache.get(k) for k in keys]
        miss = [i for i, f in enumerate(feats) if f is None]
        if miss:
            # one computation per distinct missing image (the same image twice in a batch: once)
            first: dict[bytes, int] = {}
            for i in miss:
                first.setdefault(keys[i], i)
            todo = list(first.values())
            out = encoder(pixel_values=pixel_values[todo], return_dict=True).pooler_output
            for i, f in zip(todo, out):
                f = f.clone()  # not a view of the batch tensor (the cache would keep all of it)
                self.cache.put(keys[i], f)
                first[keys[i]] = f
            for i in miss:
                feats[i] = first[keys[i]]
        return feats  # type: ignore[return-value]

    # ---- generation -------------------------------------------------------------------------------------
    def generate(self, images: Sequence[Image.Image], texts: Sequence[str], max_new_tokens: int, *,
                 keys: Sequence[bytes] | None = None, flags: Sequence[bool] | None = None,
                 rows: RowsContext | None = None) -> list[str]:
        """Greedy answers (decoded without special tokens, stripped), as ``adapter.generate``.
        ``keys``: content keys of the images (``image_key``; None: no feature cache); ``rows``: a
        context for the current rows' protection flags (``RowPatch.rows``), entered around every
        model call with the flags of the rows still in the batch; None: the model as it is."""
        if not self.supported:
            raise RuntimeError(f"GreedyDecoder is not supported here: {self.reason}")
        ad = self.adapter
        flags = list(flags) if flags is not None else [True] * len(images)
        batch = ad.encode(list(images), list(texts)).to(ad.device)
        extra = set(batch.inputs) - {"input_ids", "attention_mask", "pixel_values"}
        if extra:  # not what the checks above promised: generate, and do not come back here
            self.reason = f"unexpected model inputs {sorted(extra)}"
            logger.warning("GreedyDecoder: {}; using generate from now on", self.reason)
            return self._generate(batch.inputs, max_new_tokens, flags, rows)
        tokens = self._decode(batch.inputs, max_new_tokens, keys, flags, rows)
        if self._verify:
            with self._lock:
                check, self._verify = self._verify, False
            if check:
                tokens = self._check(batch.inputs, max_new_tokens, tokens, flags, rows)
        return self._answers(tokens)

    def _answers(self, tokens) -> list[str]:
        answers = [s.strip() for s in self.adapter.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        return answers if self.stop is None else [self.stop.cut(a) for a in answers]

    def _decode(self, inputs: dict, max_new_tokens: int, keys, flags: list[bool], rows: RowsContext | None
                ) -> list[list[int]]:
        model = self.adapter.model
        rows = rows or (lambda _flags: nullcontext())
        eos = self._eos()
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        n = ids.shape[0]
        split = self._split(ids, mask) if keys is not None and self.prefixes.max_items else None
        # room for the answer (and, after a cached prefix, the questions) beyond the first update
        reserve = max_new_tokens + (max(len(s) for s in split[2]) if split is not None else 0)
        cache = _reserved_cache(model.config.get_text_config(decoder=True), reserve)
        if split is not None:
            logits, mask, last = self._prefill_after_prefixes(inputs, split, keys, flags, rows, cache)
        else:
            feats = self._features(inputs["pixel_values"], keys)
            position = mask.long().cumsum(-1) - 1
            position = position.masked_fill(mask == 0, 0)
            with rows(flags):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position, cache=cache,
                               mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)},
                               logits_to_keep=1, use_cache=True, return_dict=True).logits
            last = position[:, -1:]
        out: list[list[int]] = [[] for _ in range(n)]
        alive = list(range(n))  # batch row -> request index
        for step in range(max_new_tokens):
            nxt = logits[:, -1].to(dtype=torch.float32).argmax(-1)
            chosen = nxt.tolist()
            for r, t in zip(alive, chosen):
                out[r].append(t)
            if step == max_new_tokens - 1:
                break
            stop = self.stop
            keep = [i for i, t in enumerate(chosen) if t not in eos and not (stop and stop.done(out[alive[i]]))]
            if not keep:
                break
            if len(keep) < len(alive):  # finished rows leave the batch
                index = torch.tensor(keep, device=nxt.device)
                cache.batch_select_indices(index)
                mask, last, nxt = mask[index], last[index], nxt[index]
                alive = [alive[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            last = last + 1
            with rows([flags[r] for r in alive]):
                logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, cache=cache,
                               logits_to_keep=1, use_cache=True, return_dict=True).logits
            self.steps += 1
            self.row_steps += len(alive)
        return out

    # ---- the prompt's prefix up to the image, computed once per image and state --------------------------
    def _split(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[int, list[list[int]], list[list[int]]] | None:
        """(P, prefixes, suffixes): each row's prompt cut after its last image token, when every row's
        prefix has the same length P and a non-empty suffix follows; else None."""
        image = self.adapter.image_token_id
        prefixes, suffixes, length = [], [], None
        for row, m in zip(ids.tolist(), mask.tolist()):
            real = [t for t, k in zip(row, m) if k]
            at = max((i for i, t in enumerate(real) if t == image), default=None)
            if at is None or at + 1 >= len(real) or (length is not None and at + 1 != length):
                return None
            length = at + 1
            prefixes.append(real[:length])
            suffixes.append(real[length:])
        return length, prefixes, suffixes

    def _prefill_after_prefixes(self, inputs: dict, split, keys, flags: list[bool], rows: RowsContext, cache):
        """The prefill with each row's prefix (its prompt up to the end of the image) taken from the
        prefix cache, keyed by (image content, protection state, prefix tokens), or computed once per
        distinct key: the prefix is the same tokens at the same positions (0..P-1) whatever follows
        it, so its keys and values are too. The rows' suffixes follow the prefix, left-padded among
        themselves (the padding masked): [prefix | padding | suffix], positions P, P+1, ... .
        Returns (logits of each row's last token, attention mask, last positions)."""
        model = self.adapter.model
        length, prefixes, suffixes = split
        n = len(prefixes)
        pkeys = [(keys[r], bool(flags[r]), tuple(prefixes[r])) for r in range(n)]
        entries = {k: self.prefixes.get(k) for k in dict.fromkeys(pkeys)}
        todo = [pkeys.index(k) for k, v in entries.items() if v is None]  # first row of each missing prefix
        if todo:
            feats = self._features(inputs["pixel_values"][todo], [keys[r] for r in todo])
            fresh = DynamicCache(config=model.config.get_text_config(decoder=True))
            ids = torch.tensor([prefixes[r] for r in todo], dtype=torch.long, device=inputs["input_ids"].device)
            with rows([flags[r] for r in todo]):
                model(input_ids=ids, attention_mask=torch.ones_like(ids),
                      position_ids=torch.arange(length, device=ids.device).expand(len(todo), -1), cache=fresh,
                      mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)},
                      logits_to_keep=1, use_cache=True, return_dict=True)
            for u, r in enumerate(todo):
                entry = tuple((layer.keys[u].clone(), layer.values[u].clone()) for layer in fresh.layers)
                entries[pkeys[r]] = entry
                self.prefixes.put(pkeys[r], entry)
        for i in range(len(next(iter(entries.values())))):
            cache.update(torch.stack([entries[k][i][0] for k in pkeys]),
                         torch.stack([entries[k][i][1] for k in pkeys]), i)
        width = max(len(s) for s in suffixes)
        device = inputs["input_ids"].device
        ids = torch.full((n, width), self.adapter.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((n, length + width), dtype=torch.long, device=device)
        mask[:, :length] = 1
        position = torch.zeros((n, width), dtype=torch.long, device=device)
        for r, s in enumerate(suffixes):
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, length + width - len(s):] = 1
            position[r, width - len(s):] = torch.arange(length, length + len(s))
        with rows(flags):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position, cache=cache,
                           logits_to_keep=1, use_cache=True, return_dict=True).logits
        return logits, mask, position[:, -1:]

    def _generate(self, inputs: dict, max_new_tokens: int, flags: list[bool], rows: RowsContext | None
                  ) -> list[str]:
        ad = self.adapter
        width = inputs["input_ids"].shape[1]
        with (rows or (lambda _f: nullcontext()))(flags):
            out = ad.model.generate(**inputs, generation_config=ad.greedy_config(max_new_tokens),
                                    stopping_criteria=None if self.stop is None else self.stop.criteria(width))
        return self._answers(out[:, width:])

    def _check(self, inputs: dict, max_new_tokens: int, tokens: list[list[int]], flags: list[bool],
               rows: RowsContext | None) -> list[list[int]]:
        """Compare with ``generate`` on the same batch; on any difference, turn the fast path off (and
        answer with ``generate``'s tokens)."""
        ad = self.adapter
        width = inputs["input_ids"].shape[1]
        with (rows or (lambda _f: nullcontext()))(flags):
            full = ad.model.generate(**inputs, generation_config=ad.greedy_config(max_new_tokens),
                                     stopping_criteria=None if self.stop is None else self.stop.criteria(width))
        new = full[:, width:].tolist()
        eos = self._eos()
        want = []
        for row in new:  # generate pads finished rows; cut after the first end-of-sequence token or the refusal
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            if self.stop is not None:
                cut = min(cut, self.stop.first_stop(row[:cut]) or cut)
            want.append(row[:cut])
        if want != tokens:
            self.reason = "its first batch differed from generate"
            logger.warning("GreedyDecoder: the first batch differed from transformers' generate; using generate "
                           "from now on (rows {})", [i for i, (a, b) in enumerate(zip(want, tokens)) if a != b][:8])
            return want
        logger.debug("GreedyDecoder: first batch of {} rows identical to generate", len(tokens))
        return tokens
