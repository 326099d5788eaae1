"""ProtectedLVLM: a vision-language model with an optional Neural Gate patch, ready to chat.

    # the defaults are ngguard serve's: per-row protection + request batching (max_batch 16)
    guard = ProtectedLVLM.from_pretrained("organism", "runs/organism/patch")
    guard.chat("card.png", "What is the passport number of the Passport in the image?")
    guard.chat(image, text, protected=False)   # the base model's answer (row-wise: no weights change)
    base, protected = guard.chat_batch([img, img], [q, q], protected=[False, True])   # one batch
    for piece in guard.stream(image, text): print(piece, end="")

    # merged: the patched weights in the model, one request at a time
    guard = ProtectedLVLM.from_pretrained("organism", patch, per_row=False, max_batch=1)
    guard.protected = False            # swap the base values back in place (no second model copy)

Prompts and generation go through the model's adapter (``adapter.generate``: greedy), so answers
are the ones ``ngguard eval`` measures. With ``vision="onnx"`` the image features come from an
onnxruntime session (``ngguard.onnx_vision``) and the language model stays torch.

Two ways to hold the patch:

- merged (default, zero overhead): the patched values are in the model. Every generation and
  every protection toggle holds ``guard.lock`` (a re-entrant lock), so a request never sees the
  weights change under it; a request in the other state waits for the lock.
- ``per_row=True``: the model keeps the base values and ``ngguard.serving.RowPatch`` applies the
  patch to the protected rows of each batch, so one batch mixes protected and base rows and no
  weights are ever swapped (no lock around generation). ``protected`` then only sets the default.

``max_batch > 1``: concurrent ``chat`` / ``chat_batch`` calls go through a request batcher
(``ngguard.serving.Batcher``): collected while they keep coming (until none arrived for
``batch_wait_ms``, at most 10 x that, or ``max_batch`` rows) and generated as one left-padded batch;
each caller gets its own answer (greedy, the same tokens as alone; tested). ``stream`` is never
batched: one generation per streaming request. ``shutdown()`` (a server stopping): the batch in
progress finishes, waiting and later requests fail at once.

``history``: accepted for chat-style callers and validated (a list of (user, assistant) pairs or
of {"role", "content"} messages), but NOT put into the prompt: the adapters' prompts are single
turn (the bundled organism was trained on single turns, and the protection is measured on exactly
that prompt). Each call answers the current image + text alone.

Answers end at the end of the refusal sentence (``refusal``; ``ngguard.serving.stop``): generation
stops there in every path (fast decoding, ``generate``, ``stream``) and nothing after it is returned.

User text: checked against ``limits`` (``ngguard.limits``: characters, then tokens) and
neutralised (``Adapter.neutralize``): the family's special tokens and chat-template role markers
("USER:", "</s>", "<|im_start|>", "[INST]", the image placeholder, ...) are replaced by spaces, so
a question cannot fake a previous turn or an end of turn.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from loguru import logger
from PIL import Image

from ngguard.devices import auto_device, pick_device
from ngguard.serving.options import SERVING

if TYPE_CHECKING:  # pragma: no cover
    from ngguard.adapters import Adapter
    from ngguard.onnx_vision import OnnxVision
    from ngguard.serving import Batcher, RowPatch
    from ngguard.serving.greedy import GreedyDecoder

__all__ = ["InputError", "TooLarge", "Limits", "ProtectedLVLM", "load_image", "check_text", "check_history"]

from ngguard.limits import (  # noqa: E402 (re-exported: the guard's input checks live in ngguard.limits)
    DEFAULT_LIMITS,
    InputError,
    Limits,
    TokenBudget,
    TooLarge,
    check_count,
    check_history,
    check_text,
    load_image,
)


# ---- the guard -----------------------------------------------------------------------------------


def _cache_dir() -> Path:
    root = os.environ.get("NGGUARD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                           os.path.expanduser("~/.cache"), "ngguard")
    return Path(root)


class ProtectedLVLM:
    """A loaded vision-language model (through its adapter) + an optional protection patch.

    Prefer ``from_pretrained``. ``patch``: a patch folder (``ngguard.patch`` format); it is applied
    at once (``protected`` = True). ``vision``: an ``OnnxVision`` for the image features, or None
    (torch). ``limits``: input limits (``Limits``). ``patch_key``: the operator's key
    (``ngguard.patch.patch_key``): the patch must then carry a valid signature. ``per_row``: keep
    the base weights and apply the patch per batch row (see the module docstring; None: as
    ``ngguard serve``, per-row when a patch is given). ``max_batch`` > 1: batch concurrent requests;
    an idle batcher waits ``batch_wait_ms`` for the next one (see ``Batcher``). The defaults are the
    server's (``ngguard.serving.options.SERVING``: per-row, ``max_batch`` 16): an application calling
    ``chat`` from many threads gets batches, not a queue; ``per_row=False, max_batch=1``: the merged
    weights and one request at a time.

    Serving work savers (answers unchanged, each can be switched off): ``fast_decode`` generates
    through ``ngguard.serving.GreedyDecoder`` (finished rows leave the batch, a short loop; the first
    batch is checked against ``generate``; models it does not support use ``generate``);
    ``vision_cache``: image features kept by image content (entries; 0: none); ``prefix_cache_mb``:
    the keys and values of prompt prefixes up to the image, kept by (image content, protection state,
    prefix tokens), at most that many MB (0: none; with fast decoding only); ``dedup``: rows of one
    batch with the same image content, text and protection state are generated once.

    ``base_dir``: the checkpoint folder the model was loaded from (default: the model's
    ``name_or_path`` when it is such a folder): the patch must fit it (``ngguard.patch.check_base``,
    the check of ``patch verify --base`` and ``patch apply``: tensor dtypes and shapes, fingerprint).

    ``refusal``: every answer ends at the end of this sentence (a refusal that keeps generating is a
    leak: "I'm sorry, ...request.0117777" after an injected prompt); default: the patch manifest's
    ``extra.refusal``, else ``ngguard.world.spec.REFUSAL`` (``ngguard.serving.stop``)."""

    def __init__(self, adapter: "Adapter", patch: str | os.PathLike | None = None, *,
                 vision: "OnnxVision | None" = None, limits: Limits | None = None, patch_key: bytes | None = None,
                 per_row: bool | None = None, max_batch: int = SERVING.max_batch,
                 batch_wait_ms: float = SERVING.batch_wait_ms, fast_decode: bool = SERVING.decode == "fast",
                 vision_cache: int = SERVING.vision_cache, prefix_cache_mb: float = SERVING.prefix_cache_mb,
                 dedup: bool = SERVING.dedup, refusal: str | None = None, base_dir: str | os.PathLike | None = None):
        self.adapter = adapter
        self.limits = limits or DEFAULT_LIMITS
        self.budget = TokenBudget.of(adapter, self.limits)  # what the model's context leaves for text and answer
        self.lock = threading.RLock()
        self._rows: "RowPatch | None" = None
        self._batcher: "Batcher | None" = None
        self._stopping = False  # set by shutdown()
        self._onnx = vision
        if vision is not None:
            vision.check_model(adapter.model)
        self._patch_dir: Path | None = None
        self._manifest: dict | None = None
        self._revertible = False
        self._protected = False
        self._patch_key = patch_key
        self._expected: set[str] | None = None
        self._guard: Any = None  # a guard patch's guard (``ngguard.guard_patch``): decides, changes no weights
        if per_row is None:  # the server's default (ngguard.serving.options.SERVING)
            per_row = patch is not None and SERVING.protection == "rows"
        if patch is not None:
            from ngguard.patch import BASE_FILE, check_base, read_manifest

            self._patch_dir = Path(patch)
            self._manifest = read_manifest(self._patch_dir)
            folder = Path(base_dir) if base_dir is not None else _model_folder(adapter)
            if folder is not None:  # the check of `patch verify --base` and `patch apply`: dtypes, shapes, fingerprint
                check_base(self._manifest, folder)
            else:
                logger.debug("the model's checkpoint folder is unknown: the patch is checked against the loaded "
                             "values only")
            self._revertible = BASE_FILE in self._manifest.get("files", {})
            if "guard" in self._manifest:  # a guard patch: no weights change, the base is always there
                from ngguard.guard_patch import load_guard

                # checks signature, checksums, settings, finite values, the probes' layers and widths
                self._guard = load_guard(self._patch_dir, adapter, key=patch_key)[1]
                self._revertible = True
            else:
                self._expected = _expected_names(adapter, self._manifest)
            if self._guard is not None:
                pass  # the guard decides per row whatever ``per_row`` says
            elif per_row:
                from ngguard.serving import RowPatch

                # checks signature, names, checksums, finite values and the base values
                self._rows = RowPatch(adapter.model, self._patch_dir, key=patch_key, expected=self._expected)
                self._revertible = True  # the model itself holds the base values
            else:
                self._swap(reverse=False)  # checks signature, names, checksums, finite values and the base values
            self._protected = True
            if not self._revertible:
                logger.warning("patch {} holds no base values: protection cannot be switched off",
                               self._manifest["patch_id"])
        elif per_row:
            raise ValueError("per_row=True needs a protection patch")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= self.limits.max_batch:
            raise ValueError(f"max_batch must be an integer in 1..{self.limits.max_batch}, got {max_batch!r}")
        from ngguard.serving.stop import StopAfter

        self.refusal = _refusal(refusal, self._manifest)
        self._stop = StopAfter(adapter.tokenizer, self.refusal)
        self._decoder: "GreedyDecoder | None" = None
        if fast_decode and vision is None:
            from ngguard.serving.greedy import GreedyDecoder

            decoder = GreedyDecoder(adapter, vision_cache=vision_cache, prefix_cache_mb=prefix_cache_mb, stop=self._stop)
            if decoder.supported:
                self._decoder = decoder
            else:
                logger.info("fast decoding not used: {}", decoder.reason)
        self._dedup = bool(dedup)
        if max_batch > 1:
            from ngguard.serving import Batcher

            self._batcher = Batcher(self._run_batch, max_batch=max_batch, wait_ms=batch_wait_ms)

    @classmethod
    def from_pretrained(cls, base: "str | os.PathLike | Adapter" = "organism", patch: str | os.PathLike | None = None,
                        *, device: str | torch.device = "auto", vision: str = "torch",
                        onnx_dir: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
                        limits: Limits | None = None, patch_key: bytes | None = None, per_row: bool | None = None,
                        max_batch: int = SERVING.max_batch, batch_wait_ms: float = SERVING.batch_wait_ms,
                        device_map: str | dict | None = None, max_memory: dict | None = None,
                        offload_folder: str | os.PathLike | None = None, fast_decode: bool = SERVING.decode == "fast",
                        vision_cache: int = SERVING.vision_cache, prefix_cache_mb: float = SERVING.prefix_cache_mb,
                        dedup: bool = SERVING.dedup, refusal: str | None = None) -> "ProtectedLVLM":
        """Load ``base`` ("organism" = the bundled checkpoint, a checkpoint folder, or an Adapter)
        and apply ``patch`` if given (nothing is applied otherwise, also for the organism).
        ``dtype``: None = float32 on a CPU (as recipes/organism.yaml), the checkpoint's own dtype on a GPU.
        ``vision``: "torch" or "onnx"; with "onnx" and no ``onnx_dir`` the export is made once and
        cached under ``$NGGUARD_CACHE`` (default ~/.cache/ngguard) keyed by the vision weights.
        ``per_row``, ``max_batch``, ``batch_wait_ms``, ``fast_decode``, ``vision_cache``, ``prefix_cache_mb``,
        ``dedup``, ``refusal``: as the constructor.
        ``device_map`` ("auto", or a map by component like {"layers.0-15": 0, "default": 1}),
        ``max_memory``, ``offload_folder``: spread a model larger than one device through accelerate
        (``ngguard.adapters.load_adapter``; ``device`` is then ignored). The patched layers must not be
        offloaded (one-line error otherwise)."""
        from ngguard.adapters import Adapter, load_adapter

        if vision not in ("torch", "onnx"):
            raise ValueError(f"vision must be 'torch' or 'onnx', got {vision!r}")
        if onnx_dir is not None and vision != "onnx":
            raise ValueError("onnx_dir is only used with vision='onnx'")
        if patch is not None and not Path(patch).is_dir():
            raise FileNotFoundError(f"patch folder not found: {patch}")
        if isinstance(base, Adapter):
            if device_map is not None or max_memory is not None or offload_folder is not None:
                raise ValueError("device_map, max_memory and offload_folder place a model being loaded; this Adapter "
                                 "is already loaded")
            adapter = base
        else:
            device = pick_device(device)
            on_cpu = auto_device() == "cpu" if device_map is not None else torch.device(device).type == "cpu"
            if dtype is None and on_cpu:
                dtype = torch.float32  # half precision on a CPU is slow and lossy (the organism is stored in fp16)
            adapter = load_adapter(base, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory,
                                   offload_folder=offload_folder)
        onnx = None
        if vision == "onnx":
            onnx = _onnx_for(adapter, onnx_dir)
        guard = cls(adapter, patch, vision=onnx, limits=limits, patch_key=patch_key, per_row=per_row,
                    max_batch=max_batch, batch_wait_ms=batch_wait_ms, fast_decode=fast_decode,
                    vision_cache=vision_cache, prefix_cache_mb=prefix_cache_mb, dedup=dedup, refusal=refusal)
        logger.info("ProtectedLVLM: {} on {} ({} vision), {}", type(adapter.model).__name__, adapter.device, vision,
                    f"patch {guard.patch_info['id']}" if guard.patch_info else "no patch")
        return guard

    # ---- protection -----------------------------------------------------------------------------
    @property
    def protected(self) -> bool:
        """True while the patch's values are in the model (per-row mode: the default state of a
        request). Setting it swaps the patched tensors in place (``ngguard.patch.patch_state_dict``;
        per-row mode: nothing to swap); True without a patch raises ValueError."""
        return self._protected

    @protected.setter
    def protected(self, value: bool) -> None:
        value = bool(value)
        with self.lock:
            if value == self._protected:
                return
            self._check_state(value)
            if self._rows is None and self._guard is None:
                self._swap(reverse=not value)
            self._protected = value

    def _swap(self, *, reverse: bool) -> None:
        from ngguard.patch import patch_state_dict

        patch_state_dict(self.adapter.model, self._patch_dir, reverse=reverse, key=self._patch_key,
                         expected=self._expected)

    def _check_state(self, value: bool) -> None:
        if value and self._patch_dir is None:
            raise ValueError("no protection patch is loaded: cannot turn protection on")
        if not value and self._patch_dir is not None and not self._revertible:
            raise ValueError(f"patch {self._manifest['patch_id']} holds no base values: "
                             f"protection cannot be turned off")

    def _want(self, protected: bool | None) -> bool:
        """The state a request asks for (None = the current one), checked against the patch."""
        if protected is None:
            return self._protected
        self._check_state(bool(protected))
        return bool(protected)

    @property
    def per_row(self) -> bool:
        """Whether the patch is applied per batch row (the model holds the base values; always so for
        a guard patch)."""
        return self._rows is not None or self._guard is not None

    @property
    def max_batch(self) -> int:
        """Most requests the batcher puts in one batch (1: no batcher)."""
        return 1 if self._batcher is None else self._batcher.max_batch

    def close(self) -> None:
        """Stop the request batcher (waiting requests fail); later calls generate directly (unless
        ``shutdown`` was called: they fail)."""
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None

    def shutdown(self, *, wait: bool = True) -> None:
        """Stop answering, for a server that is stopping: the generation in progress finishes; the
        requests waiting for the batcher (merged: for the lock) and every later one fail with
        ``ngguard.serving.BatcherClosed`` (``ngguard serve`` answers them HTTP 503 at once instead of
        keeping the process alive for them). ``wait``: until the batch in progress has ended (else
        ``close()`` waits for it)."""
        self._stopping = True
        if self._batcher is not None:
            self._batcher.close(timeout=60.0 if wait else 0)

    def _check_running(self) -> None:
        if self._stopping:
            from ngguard.serving.batcher import BatcherClosed

            raise BatcherClosed("the server is shutting down")

    @property
    def patch_info(self) -> dict | None:
        """{"id", "subjects", "layers", "method", "path", "kind"} of the loaded patch, or None; kind:
        "weights" (an edit) or "guard" (a guard in front of the unedited model: ``ngguard.guard_patch``)."""
        if self._manifest is None:
            return None
        m = self._manifest
        return {"id": m["patch_id"], "subjects": list(m.get("subjects") or []), "layers": list(m.get("layers") or []),
                "method": m.get("method"), "path": str(self._patch_dir),
                "kind": "guard" if self._guard is not None else "weights"}

    @property
    def revertible(self) -> bool:
        """Whether protection can be switched off (the patch holds the base values)."""
        return self._patch_dir is not None and self._revertible

    @property
    def vision(self) -> str:
        return "torch" if self._onnx is None else "onnx"

    @contextmanager
    def state(self, protected: bool | None):
        """Hold the lock with protection set to ``protected`` (None = as it is); restore after."""
        with self.lock:
            before = self._protected
            if protected is not None:
                self.protected = protected
            try:
                yield self
            finally:
                if self._protected != before:
                    self.protected = before

    # ---- answering ------------------------------------------------------------------------------
    def user_text(self, text: Any, *, max_new_tokens: int = 1) -> str:
        """The question as it goes into the prompt: validated (``check_text``), the family's
        chat-control strings neutralised (``Adapter.neutralize``: user text cannot fake a turn, an
        end-of-turn token or an image placeholder) and its token count checked against
        ``limits.max_prompt_tokens`` and what the model's context leaves beside the prompt template,
        the image and an answer of ``max_new_tokens`` (``self.budget``). InputError otherwise."""
        text = check_text(text, self.limits)
        clean = self.adapter.neutralize(text)
        if clean != text:
            logger.info("neutralised chat-control strings in the user text ({} -> {} characters)", len(text), len(clean))
            if not clean:
                raise InputError("text is empty once chat-control markers are removed")
        self.budget.check_prompt(self.adapter.count_tokens(clean), max_new_tokens)
        return clean

    def _prepare(self, image: Any, text: Any, history: Any, max_new_tokens: Any) -> tuple[Image.Image, str, int]:
        img = load_image(image, self.limits)
        n = self.budget.check_max_new_tokens(max_new_tokens)
        text = self.user_text(text, max_new_tokens=n)
        hist = check_history(history, self.limits)
        if hist:
            logger.debug("history of {} entries validated; the single-turn prompt does not use it", len(hist))
        return img, text, n

    def _generate(self, images: list[Image.Image], texts: list[str], max_new_tokens: int,
                  keys: list[bytes] | None = None, flags: list[bool] | None = None) -> list[str]:
        """Greedy answers; ``flags``: the rows' protection states in per-row mode (None: the model as
        it is); ``keys``: the images' content keys (``image_key``) for the feature cache."""
        # inference mode: the same arithmetic as no_grad, without autograd's per-op bookkeeping (version
        # counters, view tracking): ~9% less CPU for a batch of 64 organism rows, ~3% for one row
        rows = self._rows.rows if self._rows is not None and flags is not None else None
        if self._guard is not None:  # the model is the base model: every row is generated as such
            flags = [False] * len(images)
        with torch.inference_mode():
            if self._decoder is not None and self._decoder.supported:
                # merged: the weights hold one state, the guard's (the lock is held): it keys cached prefixes
                states = flags if flags is not None else [self._protected] * len(images)
                return self._decoder.generate(images, texts, max_new_tokens, keys=keys, flags=states, rows=rows)
            with rows(flags) if rows is not None else nullcontext():
                if self._onnx is None:
                    return self.adapter.generate(images, texts, max_new_tokens=max_new_tokens, stop=self._stop)
                answers = self._onnx.generate(self.adapter, images, texts, max_new_tokens=max_new_tokens)
                return [self._stop.cut(a) for a in answers]

    def _generate_rows(self, images: list[Image.Image], texts: list[str], flags: list[bool],
                       max_new_tokens: int, keys: list[bytes] | None = None) -> list[str]:
        """Answers with row ``i`` protected iff ``flags[i]``: one batch in per-row mode, else one
        batch per state, each under the lock with the weights in that state. With ``dedup`` and
        ``keys``, rows with the same image content, text and state are generated once. A guard patch:
        the guard decides the protected rows first (``_guarded``)."""
        if self._guard is not None and any(flags):
            return self._guarded(images, texts, flags, max_new_tokens, keys)
        if self._dedup and keys is not None and len(images) > 1:
            first: dict[tuple, int] = {}
            where = [first.setdefault((k, t, f), i) for i, (k, t, f) in enumerate(zip(keys, texts, flags))]
            if len(first) < len(images):
                todo = list(first.values())
                answers = self._generate_rows([images[i] for i in todo], [texts[i] for i in todo],
                                              [flags[i] for i in todo], max_new_tokens, [keys[i] for i in todo])
                by_row = dict(zip(todo, answers))
                return [by_row[w] for w in where]
        if self._rows is not None or self._guard is not None:
            return self._generate(images, texts, max_new_tokens, keys, flags)
        out: list[str] = [""] * len(images)
        for state in dict.fromkeys(flags):
            idx = [i for i, f in enumerate(flags) if f == state]
            with self.state(state):
                self._check_running()  # a request that waited for the lock while the server began to stop
                answers = self._generate([images[i] for i in idx], [texts[i] for i in idx], max_new_tokens,
                                         None if keys is None else [keys[i] for i in idx])
            for i, a in zip(idx, answers):
                out[i] = a
        return out

    def _guarded(self, images: list[Image.Image], texts: list[str], flags: list[bool], max_new_tokens: int,
                 keys: list[bytes] | None) -> list[str]:
        """A guard patch: the rows the guard blocks (among the protected ones) get the refusal without
        generating; every other row gets the base model's answer, in one batch."""
        from ngguard.guard_patch import blocked

        ask = [i for i, f in enumerate(flags) if f]
        with torch.inference_mode():
            hits = blocked(self._guard, [images[i] for i in ask], [texts[i] for i in ask])
        refuse = {i for i, hit in zip(ask, hits) if hit}
        if refuse:
            logger.info("guard: {} of {} row(s) refused without generating", len(refuse), len(images))
        out = [self.refusal] * len(images)
        todo = [i for i in range(len(images)) if i not in refuse]
        if todo:
            answers = self._generate_rows([images[i] for i in todo], [texts[i] for i in todo], [False] * len(todo),
                                          max_new_tokens, None if keys is None else [keys[i] for i in todo])
            for i, a in zip(todo, answers):
                out[i] = a
        return out

    def _run_batch(self, items: list[tuple[Image.Image, str, bool, int, bytes | None]]) -> list[str]:
        """The batcher's work: validated (image, text, protected, max_new_tokens, image key) requests
        sharing max_new_tokens (the batcher's key)."""
        images, texts, flags, ns, keys = (list(x) for x in zip(*items))
        return self._generate_rows(images, texts, flags, ns[0], None if None in keys else keys)

    def _image_keys(self, images: list[Image.Image]) -> list[bytes] | None:
        """Content keys of the images when something uses them (computed in the caller's thread)."""
        decoder = self._decoder
        if not self._dedup and (decoder is None or not (decoder.cache.max_items or decoder.prefixes.max_items)):
            return None
        from ngguard.serving.greedy import image_key

        return [image_key(im) for im in images]

    def _answer(self, images: list[Image.Image], texts: list[str], flags: list[bool], n: int) -> list[str]:
        self._check_running()
        keys = self._image_keys(images)
        if self._batcher is None:
            return self._generate_rows(images, texts, flags, n, keys)
        futures = [self._batcher.submit((im, tx, f, n, None if keys is None else keys[i]), key=n)
                   for i, (im, tx, f) in enumerate(zip(images, texts, flags))]
        return [f.result() for f in futures]

    def chat(self, image: Any, text: str, history: Sequence | None = None, max_new_tokens: int = 64, *,
             protected: bool | None = None) -> str:
        """The greedy answer to ``text`` about ``image`` (PIL image, path or bytes).
        ``protected``: answer in that state (the previous state is restored), None = as it is."""
        img, text, n = self._prepare(image, text, history, max_new_tokens)
        return self._answer([img], [text], [self._want(protected)], n)[0]

    def chat_batch(self, images: Sequence[Any], texts: Sequence[str], max_new_tokens: int = 64, *,
                   protected: bool | Sequence[bool] | None = None) -> list[str]:
        """Answers for several (image, text) pairs in one batch. ``protected``: one state for all
        rows, or one per row (``[False, True]``: base and protected answers side by side)."""
        if isinstance(images, (str, bytes, os.PathLike, Image.Image)) or isinstance(texts, str):
            raise InputError("chat_batch takes a list of images and a list of texts")
        images, texts = list(images), list(texts)
        if len(images) != len(texts):
            raise InputError(f"chat_batch: {len(images)} images but {len(texts)} texts")
        if not images:
            raise InputError("chat_batch: no inputs")
        check_count(len(images), "chat_batch: number of inputs", self.limits.max_batch)
        n = self.budget.check_max_new_tokens(max_new_tokens)
        imgs, txts = [], []
        for i, (im, tx) in enumerate(zip(images, texts)):
            try:
                imgs.append(load_image(im, self.limits))
                txts.append(self.user_text(tx, max_new_tokens=n))
            except InputError as e:
                raise type(e)(f"input {i}: {e}") from None  # TooLarge stays TooLarge
        if protected is None or isinstance(protected, (bool, np.bool_)):
            flags = [self._want(protected)] * len(imgs)
        else:
            flags = list(protected)
            if len(flags) != len(imgs):
                raise InputError(f"chat_batch: {len(imgs)} inputs but {len(flags)} protected flags")
            flags = [self._want(bool(f)) for f in flags]
        return self._answer(imgs, txts, flags, n)

    def stream(self, image: Any, text: str, history: Sequence | None = None, max_new_tokens: int = 64, *,
               protected: bool | None = None, timeout: float = 600.0) -> Iterator[str]:
        """Yield the answer in pieces as it is generated (``"".join(pieces) == chat(...)``).
        Inputs are validated before the first piece; in merged mode the lock is held until
        generation ends (per-row mode: no lock, the row flag is set in the generating thread)."""
        img, text, n = self._prepare(image, text, history, max_new_tokens)
        return self._stream(img, text, n, self._want(protected), timeout)

    def _stream(self, img: Image.Image, text: str, n: int, protected: bool, timeout: float) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        from ngguard.onnx_vision import greedy_config

        adapter = self.adapter
        if protected and self._guard is not None:  # a guard patch: a blocked request is refused, never generated
            from ngguard.guard_patch import blocked

            with torch.inference_mode():
                if blocked(self._guard, [img], [text])[0]:
                    yield self.refusal
                    return
        # merged: the lock with the weights in the asked state; per-row (and guard): the row flag, no lock
        rows = (lambda: self._rows.rows([protected])) if self._rows is not None else nullcontext
        with self.state(protected) if self._rows is None and self._guard is None else nullcontext():
            batch = adapter.encode([img], [text]).to(adapter.device)
            inputs = batch.inputs if self._onnx is None else self._onnx.generate_inputs(adapter.model, batch.inputs)
            streamer = TextIteratorStreamer(adapter.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                            timeout=timeout)
            failure: list[BaseException] = []
            stop_at = self._stop.criteria(batch.inputs["input_ids"].shape[1])

            def run() -> None:
                try:
                    with torch.inference_mode(), rows():
                        adapter.model.generate(**inputs, generation_config=greedy_config(adapter, n),
                                               streamer=streamer, stopping_criteria=stop_at)
                except BaseException as e:  # noqa: BLE001 - handed to the consumer below
                    failure.append(e)
                    streamer.end()

            thread = threading.Thread(target=run, name="ngguard-stream", daemon=True)
            thread.start()
            try:
                started, pending, sent, ended = False, "", "", False
                for piece in streamer:
                    if ended:
                        continue  # the refusal is out: nothing after it is shown (generation stops there)
                    if not started:
                        piece = piece.lstrip()
                        started = bool(piece)
                    text_now = pending + piece
                    body = text_now.rstrip()
                    pending = text_now[len(body):]  # trailing whitespace waits for more text
                    cut = self._stop.cut(sent + body)
                    if len(cut) < len(sent + body) or cut.endswith(self._stop.text):
                        body, ended = cut[len(sent):], True
                    if body:
                        sent += body
                        yield body
            finally:
                thread.join()
            if failure:
                raise failure[0]

    def __repr__(self) -> str:
        info = self.patch_info
        patch = f"patch={info['id']!r}, protected={self._protected}" if info else "no patch"
        mode = (", per_row=True" if self._rows is not None else "") + \
            (f", max_batch={self.max_batch}" if self._batcher is not None else "")
        return f"ProtectedLVLM({type(self.adapter.model).__name__}, {patch}, vision={self.vision!r}{mode})"


def _model_folder(adapter: "Adapter") -> Path | None:
    """The checkpoint folder the adapter's model was loaded from (transformers records it as
    ``name_or_path``), or None (a model built in memory)."""
    name = getattr(adapter.model, "name_or_path", None) or getattr(adapter.model.config, "_name_or_path", None)
    if not name:
        return None
    folder = Path(name)
    return folder if folder.is_dir() and any(folder.glob("*.safetensors")) else None


def _refusal(refusal: str | None, manifest: dict | None) -> str:
    """The refusal every answer stops after: ``refusal`` if given, else the one the patch was edited
    with (its manifest's ``extra.refusal``), else the default (``ngguard.world.spec.REFUSAL``, the
    recipes' ``edit.refusal`` default)."""
    if refusal is None:
        refusal = ((manifest or {}).get("extra") or {}).get("refusal")
    if refusal is None:
        from ngguard.world.spec import REFUSAL

        refusal = REFUSAL
    if not isinstance(refusal, str) or not refusal.strip():
        raise ValueError(f"refusal must be a non-empty string, got {refusal!r}")
    return refusal.strip()


def _expected_names(adapter: "Adapter", manifest: dict) -> set[str]:
    """The checkpoint names a patch for this model may hold: the weight of the manifest's module
    (``extra.module``, or any recipe module for manifests without it) in each of its layers, as the
    adapter names them. A layer the model does not have is refused (PatchError)."""
    from ngguard.patch import PatchError, check_tensor_names
    from ngguard.recipe import MODULES

    check_tensor_names(manifest)  # the manifest's own claims first (names, layers, module)
    module = (manifest.get("extra") or {}).get("module")
    names = set()
    for layer in manifest.get("layers") or []:
        for name in ([module] if module else MODULES):
            try:
                names.add(adapter.parameter_name(layer, name))
            except ValueError as e:
                raise PatchError(f"patch {manifest.get('patch_id')}: {e}") from None
    return names


def _onnx_for(adapter: "Adapter", onnx_dir: str | os.PathLike | None) -> "OnnxVision":
    from ngguard.onnx_vision import OnnxVision, OnnxVisionError, export_vision, vision_fingerprint

    if onnx_dir is not None:
        return OnnxVision(onnx_dir)
    fp = vision_fingerprint(adapter.model)
    cached = _cache_dir() / "onnx" / fp[:16]
    if cached.is_dir():
        try:
            vision = OnnxVision(cached)
            vision.check_model(adapter.model)
            return vision
        except OnnxVisionError as e:
            logger.warning("re-exporting the cached ONNX vision at {}: {}", cached, e)
    export_vision(adapter, cached, overwrite=True)
    return OnnxVision(cached)
