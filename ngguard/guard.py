"""ProtectedLVLM: a vision-language model with an optional Neural Gate patch, ready to chat.

    guard = ProtectedLVLM.from_pretrained("organism", "runs/organism/patch")
    guard.chat("card.png", "What is the passport number of the Passport in the image?")
    guard.protected = False            # swap the base values back in place (no second model copy)
    guard.chat(image, text, protected=True)    # one answer in a given state, atomically
    for piece in guard.stream(image, text): print(piece, end="")

    # per-row protection + request batching (what `ngguard serve` and A/B callers use)
    guard = ProtectedLVLM.from_pretrained("organism", patch, per_row=True, max_batch=16)
    base, protected = guard.chat_batch([img, img], [q, q], protected=[False, True])   # one batch

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
(``ngguard.serving.Batcher``): collected for up to ``batch_wait_ms`` (or ``max_batch`` rows) and
generated as one left-padded batch; each caller gets its own answer (greedy, the same tokens as
alone; tested). ``stream`` is never batched: one generation per streaming request.

``history``: accepted for chat-style callers and validated (a list of (user, assistant) pairs or
of {"role", "content"} messages), but NOT put into the prompt: the adapters' prompts are single
turn (the bundled organism was trained on single turns, and the protection is measured on exactly
that prompt). Each call answers the current image + text alone.
"""
from __future__ import annotations

import io
import os
import threading
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from loguru import logger
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # pragma: no cover
    from ngguard.adapters import Adapter
    from ngguard.onnx_vision import OnnxVision
    from ngguard.serving import Batcher, RowPatch

__all__ = ["InputError", "Limits", "ProtectedLVLM", "load_image", "check_text", "check_history"]

MB = 1024 * 1024


class InputError(ValueError):
    """A bad image, text, history or option given to ProtectedLVLM, as one line."""


@dataclass(frozen=True)
class Limits:
    """Input limits. ``max_pixels``: width x height of a decoded image; ``max_bytes``: size of an
    encoded image (file or bytes); ``max_text_chars``: length of the question."""

    max_pixels: int = 4096 * 4096
    max_bytes: int = 20 * MB
    max_text_chars: int = 2000
    max_new_tokens: int = 512
    max_batch: int = 64
    max_history_messages: int = 200

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_bytes", "max_text_chars", "max_new_tokens", "max_batch",
                     "max_history_messages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


# ---- input validation -----------------------------------------------------------------------------


def _size_text(n: int) -> str:
    return f"{n / MB:.1f} MB" if n >= MB else f"{n} bytes"


def _check_size(width: int, height: int, limits: Limits, what: str) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f"{what} has zero size ({width}x{height})")
    if width * height > limits.max_pixels:
        raise InputError(f"{what} is too large: {width}x{height} = {width * height} pixels "
                         f"(limit {limits.max_pixels} pixels)")


def _decode(data: bytes, limits: Limits, what: str) -> Image.Image:
    if not data:
        raise InputError(f"{what} is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InputError(f"{what} is too large: {_size_text(len(data))} (limit {_size_text(limits.max_bytes)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size  # from the header, before decoding the pixels
            _check_size(width, height, limits, what)
            im.load()
            return _rgb(im, what)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{what} is too large (decompression bomb guard; limit {limits.max_pixels} pixels)") from None
    except UnidentifiedImageError:
        raise InputError(f"{what} is not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise InputError(f"{what} is corrupt or truncated ({reason})") from None


def _rgb(im: Image.Image, what: str) -> Image.Image:
    try:
        return im if im.mode == "RGB" else im.convert("RGB")
    except (OSError, ValueError) as e:
        raise InputError(f"{what} cannot be converted to RGB ({' '.join(str(e).split())})") from None


def load_image(image: Any, limits: Limits | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image, a path (str / Path), encoded bytes or an HxW[xC] uint8
    array. Raises ``InputError`` for anything else, an unreadable/corrupt file, a zero-size image,
    or one over the limits."""
    limits = limits or Limits()
    if isinstance(image, Image.Image):
        _check_size(image.width, image.height, limits, "image")
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as e:
            raise InputError(f"image is corrupt or truncated ({' '.join(str(e).split())})") from None
        return _rgb(image, "image")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(bytes(image), limits, "image data")
    if isinstance(image, (str, os.PathLike)):
        if isinstance(image, str) and not image.strip():
            raise InputError("image path is empty")
        path = Path(image)
        if not path.exists():
            raise InputError(f"image file not found: {path}")
        if not path.is_file():
            raise InputError(f"image path is not a file: {path}")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise InputError(f"image file {path.name} is too large: {_size_text(size)} "
                             f"(limit {_size_text(limits.max_bytes)})")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"image file {path} cannot be read ({e.strerror or e})") from None
        return _decode(data, limits, f"image file {path.name}")
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise InputError(f"image array must be HxW, HxWx3 or HxWx4, got shape {list(image.shape)}")
        _check_size(int(arr.shape[1]), int(arr.shape[0]), limits, "image array")
        if arr.dtype != np.uint8:
            raise InputError(f"image array must be uint8, got {arr.dtype}")
        return _rgb(Image.fromarray(np.ascontiguousarray(arr)), "image array")
    if image is None:
        raise InputError("no image given")
    raise InputError(f"image must be a PIL image, a file path, bytes or a uint8 array, got {type(image).__name__}")


def check_text(text: Any, limits: Limits | None = None) -> str:
    """The question with outer whitespace removed; ``InputError`` if not a string, empty or too long."""
    limits = limits or Limits()
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise InputError("text is empty")
    if len(text) > limits.max_text_chars:
        raise InputError(f"text is too long: {len(text)} characters (limit {limits.max_text_chars})")
    if "\x00" in text:
        raise InputError("text contains a NUL character")
    return text


_ROLES = ("user", "assistant", "system")


def check_history(history: Any, limits: Limits | None = None) -> list:
    """Validate a chat history: None, or a list of (user, assistant) pairs (str or None each), or of
    {"role": "user"|"assistant"|"system", "content": ...} messages (content: str, a list of parts
    or a dict, as Gradio sends). Returns it as a list; ``InputError`` on a wrong shape."""
    limits = limits or Limits()
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise InputError(f"history must be a list of (user, assistant) pairs or of role/content messages, "
                         f"got {type(history).__name__}")
    if len(history) > limits.max_history_messages:
        raise InputError(f"history is too long: {len(history)} entries (limit {limits.max_history_messages})")
    for i, item in enumerate(history):
        if isinstance(item, dict):
            role = item.get("role")
            if role not in _ROLES:
                raise InputError(f"history[{i}]: role must be one of {', '.join(_ROLES)}, got {role!r}")
            if "content" not in item:
                raise InputError(f"history[{i}]: message has no 'content'")
            content = item["content"]
            if not isinstance(content, (str, list, tuple, dict)) and content is not None:
                raise InputError(f"history[{i}]: content must be a string, a list of parts or a dict, "
                                 f"got {type(content).__name__}")
        elif isinstance(item, (list, tuple)):
            if len(item) != 2:
                raise InputError(f"history[{i}]: expected a (user, assistant) pair, got {len(item)} items")
            for j, part in enumerate(item):
                if part is not None and not isinstance(part, (str, dict, list, tuple)):
                    raise InputError(f"history[{i}][{j}]: expected a string, got {type(part).__name__}")
        else:
            raise InputError(f"history[{i}]: expected a (user, assistant) pair or a role/content message, "
                             f"got {type(item).__name__}")
    return list(history)


def _check_max_new_tokens(n: Any, limits: Limits) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= int(n) <= limits.max_new_tokens:
        raise InputError(f"max_new_tokens must be an integer in 1..{limits.max_new_tokens}, got {n!r}")
    return int(n)


# ---- the guard -----------------------------------------------------------------------------------


def _device(device: str | torch.device | None) -> str | torch.device:
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _cache_dir() -> Path:
    root = os.environ.get("NGGUARD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                           os.path.expanduser("~/.cache"), "ngguard")
    return Path(root)


class ProtectedLVLM:
    """A loaded vision-language model (through its adapter) + an optional protection patch.

    Prefer ``from_pretrained``. ``patch``: a patch folder (``ngguard.patch`` format); it is applied
    at once (``protected`` = True). ``vision``: an ``OnnxVision`` for the image features, or None
    (torch). ``limits``: input limits (``Limits``). ``per_row``: keep the base weights and apply the
    patch per batch row (see the module docstring). ``max_batch`` > 1: batch concurrent requests,
    waiting at most ``batch_wait_ms`` for company."""

    def __init__(self, adapter: "Adapter", patch: str | os.PathLike | None = None, *,
                 vision: "OnnxVision | None" = None, limits: Limits | None = None, per_row: bool = False,
                 max_batch: int = 1, batch_wait_ms: float = 5.0):
        self.adapter = adapter
        self.limits = limits or Limits()
        self.lock = threading.RLock()
        self._rows: "RowPatch | None" = None
        self._batcher: "Batcher | None" = None
        self._onnx = vision
        if vision is not None:
            vision.check_model(adapter.model)
        self._patch_dir: Path | None = None
        self._manifest: dict | None = None
        self._revertible = False
        self._protected = False
        if patch is not None:
            from ngguard.patch import BASE_FILE, patch_state_dict, read_manifest

            self._patch_dir = Path(patch)
            self._manifest = read_manifest(self._patch_dir)
            self._revertible = BASE_FILE in self._manifest.get("files", {})
            if per_row:
                from ngguard.serving import RowPatch

                self._rows = RowPatch(adapter.model, self._patch_dir)  # checks checksums and the base values
                self._revertible = True  # the model itself holds the base values
            else:
                patch_state_dict(adapter.model, self._patch_dir)  # checks checksums and the base values
            self._protected = True
            if not self._revertible:
                logger.warning("patch {} holds no base values: protection cannot be switched off",
                               self._manifest["patch_id"])
        elif per_row:
            raise ValueError("per_row=True needs a protection patch")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= self.limits.max_batch:
            raise ValueError(f"max_batch must be an integer in 1..{self.limits.max_batch}, got {max_batch!r}")
        if max_batch > 1:
            from ngguard.serving import Batcher

            self._batcher = Batcher(self._run_batch, max_batch=max_batch, wait_ms=batch_wait_ms)

    @classmethod
    def from_pretrained(cls, base: "str | os.PathLike | Adapter" = "organism", patch: str | os.PathLike | None = None,
                        *, device: str | torch.device = "auto", vision: str = "torch",
                        onnx_dir: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
                        limits: Limits | None = None, per_row: bool = False, max_batch: int = 1,
                        batch_wait_ms: float = 5.0) -> "ProtectedLVLM":
        """Load ``base`` ("organism" = the bundled checkpoint, a checkpoint folder, or an Adapter)
        and apply ``patch`` if given (nothing is applied otherwise, also for the organism).
        ``dtype``: None = float32 on a CPU (as recipes/organism.yaml), the checkpoint's own dtype on a GPU.
        ``vision``: "torch" or "onnx"; with "onnx" and no ``onnx_dir`` the export is made once and
        cached under ``$NGGUARD_CACHE`` (default ~/.cache/ngguard) keyed by the vision weights.
        ``per_row``, ``max_batch``, ``batch_wait_ms``: as the constructor."""
        from ngguard.adapters import Adapter, load_adapter

        if vision not in ("torch", "onnx"):
            raise ValueError(f"vision must be 'torch' or 'onnx', got {vision!r}")
        if onnx_dir is not None and vision != "onnx":
            raise ValueError("onnx_dir is only used with vision='onnx'")
        if patch is not None and not Path(patch).is_dir():
            raise FileNotFoundError(f"patch folder not found: {patch}")
        if isinstance(base, Adapter):
            adapter = base
        else:
            device = _device(device)
            if dtype is None and torch.device(device).type == "cpu":
                dtype = torch.float32  # half precision on a CPU is slow and lossy (the organism is stored in fp16)
            adapter = load_adapter(base, device=device, dtype=dtype)
        onnx = None
        if vision == "onnx":
            onnx = _onnx_for(adapter, onnx_dir)
        guard = cls(adapter, patch, vision=onnx, limits=limits, per_row=per_row, max_batch=max_batch,
                    batch_wait_ms=batch_wait_ms)
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
            if self._rows is None:
                from ngguard.patch import patch_state_dict

                patch_state_dict(self.adapter.model, self._patch_dir, reverse=not value)
            self._protected = value

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
        """Whether the patch is applied per batch row (the model holds the base values)."""
        return self._rows is not None

    @property
    def max_batch(self) -> int:
        """Most requests the batcher puts in one batch (1: no batcher)."""
        return 1 if self._batcher is None else self._batcher.max_batch

    def close(self) -> None:
        """Stop the request batcher (waiting requests fail); later calls generate directly."""
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None

    @property
    def patch_info(self) -> dict | None:
        """{"id", "subjects", "layers", "method", "path"} of the loaded patch, or None."""
        if self._manifest is None:
            return None
        m = self._manifest
        return {"id": m["patch_id"], "subjects": list(m.get("subjects") or []), "layers": list(m.get("layers") or []),
                "method": m.get("method"), "path": str(self._patch_dir)}

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
    def _prepare(self, image: Any, text: Any, history: Any, max_new_tokens: Any) -> tuple[Image.Image, str, int]:
        img = load_image(image, self.limits)
        text = check_text(text, self.limits)
        hist = check_history(history, self.limits)
        if hist:
            logger.debug("history of {} entries validated; the single-turn prompt does not use it", len(hist))
        return img, text, _check_max_new_tokens(max_new_tokens, self.limits)

    def _generate(self, images: list[Image.Image], texts: list[str], max_new_tokens: int) -> list[str]:
        if self._onnx is None:
            return self.adapter.generate(images, texts, max_new_tokens=max_new_tokens)
        return self._onnx.generate(self.adapter, images, texts, max_new_tokens=max_new_tokens)

    def _generate_rows(self, images: list[Image.Image], texts: list[str], flags: list[bool],
                       max_new_tokens: int) -> list[str]:
        """Answers with row ``i`` protected iff ``flags[i]``: one batch in per-row mode, else one
        batch per state, each under the lock with the weights in that state."""
        if self._rows is not None:
            with self._rows.rows(flags):
                return self._generate(images, texts, max_new_tokens)
        out: list[str] = [""] * len(images)
        for state in dict.fromkeys(flags):
            idx = [i for i, f in enumerate(flags) if f == state]
            with self.state(state):
                answers = self._generate([images[i] for i in idx], [texts[i] for i in idx], max_new_tokens)
            for i, a in zip(idx, answers):
                out[i] = a
        return out

    def _run_batch(self, items: list[tuple[Image.Image, str, bool, int]]) -> list[str]:
        """The batcher's work: validated (image, text, protected, max_new_tokens) requests sharing
        max_new_tokens (the batcher's key)."""
        images, texts, flags, ns = (list(x) for x in zip(*items))
        return self._generate_rows(images, texts, flags, ns[0])

    def _answer(self, images: list[Image.Image], texts: list[str], flags: list[bool], n: int) -> list[str]:
        if self._batcher is None:
            return self._generate_rows(images, texts, flags, n)
        futures = [self._batcher.submit((im, tx, f, n), key=n) for im, tx, f in zip(images, texts, flags)]
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
        if len(images) > self.limits.max_batch:
            raise InputError(f"chat_batch: {len(images)} inputs (limit {self.limits.max_batch})")
        imgs, txts = [], []
        for i, (im, tx) in enumerate(zip(images, texts)):
            try:
                imgs.append(load_image(im, self.limits))
                txts.append(check_text(tx, self.limits))
            except InputError as e:
                raise InputError(f"input {i}: {e}") from None
        n = _check_max_new_tokens(max_new_tokens, self.limits)
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
        # merged: the lock with the weights in the asked state; per-row: the row flag, no lock
        rows = (lambda: self._rows.rows([protected])) if self._rows is not None else nullcontext
        with self.state(protected) if self._rows is None else nullcontext():
            batch = adapter.encode([img], [text]).to(adapter.device)
            inputs = batch.inputs if self._onnx is None else self._onnx.generate_inputs(adapter.model, batch.inputs)
            streamer = TextIteratorStreamer(adapter.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                            timeout=timeout)
            failure: list[BaseException] = []

            def run() -> None:
                try:
                    with torch.no_grad(), rows():
                        adapter.model.generate(**inputs, generation_config=greedy_config(adapter, n),
                                               streamer=streamer)
                except BaseException as e:  # noqa: BLE001 - handed to the consumer below
                    failure.append(e)
                    streamer.end()

            thread = threading.Thread(target=run, name="ngguard-stream", daemon=True)
            thread.start()
            try:
                started, pending = False, ""
                for piece in streamer:
                    if not started:
                        piece = piece.lstrip()
                        started = bool(piece)
                    text_now = pending + piece
                    body = text_now.rstrip()
                    pending = text_now[len(body):]  # trailing whitespace waits for more text
                    if body:
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
