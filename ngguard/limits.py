"""Every input limit of ngguard, in one place, and the checks that enforce them.

``Limits`` is shared by the serving wrapper (``ProtectedLVLM``), ``ngguard eval`` (``evaluate``
checks each query's image header and prompt before any generation) and recipe validation
(``ngguard.recipe``: world size, steps, batch sizes, lengths). Checks run before any work and fail
with ``InputError`` (a ``ValueError``: the CLI prints it as one line, exit status 2).

    limits = Limits()                      # the defaults below
    img = load_image("card.png", limits)   # an RGB PIL image, or InputError
    text = check_text(question, limits)    # stripped question, or InputError

Images: only these formats are opened: PNG, JPEG, WEBP, BMP, GIF (never EPS/PostScript, which
PIL hands to Ghostscript, nor SVG, which PIL cannot read); the file size, the pixel count and the
aspect ratio are checked from the header, before the pixels are decoded.

Files: every file ngguard reads whole (images, queries, recipes, responses, labels, judge specs,
patch keys and signatures) goes through ``read_regular_file``: it must be a regular file (symlinks
are followed; a folder, a device such as ``/dev/zero``, a FIFO or a socket is refused without being
opened), no larger than the caller's limit (checked from ``stat`` before reading, and the read stops
there even if the file grows), and it is opened non-blocking, so a FIFO swapped in after the check
cannot hang the read either.
"""
from __future__ import annotations

import io
import os
import reprlib
import stat
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["InputError", "TooLarge", "Limits", "DEFAULT_LIMITS", "IMAGE_FORMATS", "load_image", "check_image_file",
           "check_text", "check_history", "check_count", "short_repr", "read_regular_file", "read_text_file",
           "file_kind", "model_context", "TokenBudget"]

MB = 1024 * 1024
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


class InputError(ValueError):
    """A bad image, text, history, option or recipe number, as one line."""


class TooLarge(InputError):
    """An input over a size limit (image bytes or pixels, text characters or tokens, history
    entries): HTTP 413 in the JSON API, where other input errors are 400."""


@dataclass(frozen=True)
class Limits:
    """Input limits (all positive integers).

    Serving and eval: ``max_pixels`` (width x height of a decoded image), ``max_aspect_ratio``
    (long side / short side), ``max_bytes`` (size of an encoded image), ``max_text_chars`` (length
    of a question), ``max_prompt_tokens`` (its tokens, as the model's tokenizer counts them: 2000
    emoji are 2000 characters but ~8000 byte-level tokens; with a model, also no more than its
    context leaves: ``TokenBudget``), ``max_new_tokens``, ``max_batch``
    (inputs per generation batch), ``max_history_messages``.

    Recipes: ``max_world_images`` (data.world.n, images per subject), ``max_steps``
    (localization.steps, edit.steps), ``max_recipe_batch`` (localization/evaluation batch sizes),
    ``max_list_items`` (subjects, contexts, alpha sweeps, layers), ``max_seed`` (torch seeds are
    64-bit), ``max_recipe_bytes`` (the YAML file), ``max_yaml_nodes`` / ``max_yaml_depth`` (after
    aliases are expanded: a 1 KB alias bomb expands to billions of nodes).

    Files read whole (``read_regular_file``): ``max_data_bytes`` (query files, ``ngguard eval`` results
    given to ``judge score``, labels files), ``max_key_bytes`` (a ``--key-file``); recipes and judge
    spec files take ``max_recipe_bytes``, images ``max_bytes``."""

    max_pixels: int = 4096 * 4096
    max_aspect_ratio: int = 20
    max_bytes: int = 20 * MB
    max_text_chars: int = 2000
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512
    max_batch: int = 64
    max_history_messages: int = 200
    max_world_images: int = 10_000
    max_steps: int = 10_000
    max_recipe_batch: int = 1024
    max_list_items: int = 1000
    max_seed: int = 2**32 - 1
    max_recipe_bytes: int = 1 * MB
    max_yaml_nodes: int = 100_000
    max_yaml_depth: int = 32
    max_data_bytes: int = 256 * MB
    max_key_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{f.name} must be a positive integer, got {short_repr(value)}")


DEFAULT_LIMITS = Limits()


def short_repr(value: Any, width: int = 60) -> str:
    """``repr`` cut to ``width`` characters, without ever building the repr of a huge container
    (a YAML alias bomb's repr would take gigabytes)."""
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 3, width, width
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 6
    text = " ".join(r.repr(value).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def check_count(value: Any, what: str, high: int, low: int = 1) -> int:
    """An int in ``low..high`` (bools refused), else InputError naming ``what`` and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= int(value) <= high:
        raise InputError(f"{what} must be an integer in {low}..{high}, got {short_repr(value)}")
    return int(value)


# ---- tokens: what the model's context leaves ---------------------------------------------------------


def model_context(model: Any) -> int | None:
    """The most positions ``model``'s language model takes (``max_position_embeddings`` of its text
    config, else of its config), or None when the config does not say."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    configs = []
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            configs.append(get_text(decoder=True))
        except (TypeError, ValueError):
            pass
    for c in configs + [config]:
        n = getattr(c, "max_position_embeddings", None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


@dataclass(frozen=True)
class TokenBudget:
    """How the model's context is shared: ``context`` positions (None: unknown, no bound), of which
    ``overhead`` go to the prompt around the user's text (template, image tokens). The user's text
    may have ``limits.max_prompt_tokens`` tokens and no more than the context leaves after the
    overhead and the answer (``max_new_tokens``); an answer at most what is left after one text token.
    ``TokenBudget.of(adapter, limits)``: the budget of a loaded model (the wrapper and ``ngguard eval``)."""

    limits: Limits
    context: int | None = None
    overhead: int = 0

    @classmethod
    def of(cls, adapter: Any, limits: Limits | None = None) -> "TokenBudget":
        limits = limits or DEFAULT_LIMITS
        context = model_context(getattr(adapter, "model", None))
        try:
            overhead = getattr(adapter, "prompt_overhead", None) if context is not None else None
        except (ValueError, RuntimeError, TypeError):  # a family whose dummy prompt cannot be encoded
            overhead = None
        if not isinstance(overhead, int):
            return cls(limits)
        return cls(limits, context, overhead)

    @property
    def max_new_tokens(self) -> int:
        """The longest answer: ``limits.max_new_tokens``, and what the context leaves after the overhead
        and a one-token text (at least 1)."""
        if self.context is None:
            return self.limits.max_new_tokens
        return max(1, min(self.limits.max_new_tokens, self.context - self.overhead - 1))

    def prompt_tokens(self, max_new_tokens: int = 1) -> int:
        """The most tokens a user's text may have when the answer may take ``max_new_tokens``."""
        if self.context is None:
            return self.limits.max_prompt_tokens
        return max(0, min(self.limits.max_prompt_tokens, self.context - self.overhead - max_new_tokens))

    def check_prompt(self, n: int, max_new_tokens: int = 1, what: str = "text") -> None:
        """TooLarge (one line) when a text of ``n`` tokens is over ``prompt_tokens(max_new_tokens)``."""
        limit = self.prompt_tokens(max_new_tokens)
        if n <= limit:
            return
        why = ""
        if self.context is not None and limit < self.limits.max_prompt_tokens:
            why = (f": the model's context is {self.context} positions, {self.overhead} of them for the prompt "
                   f"template and image, {max_new_tokens} for the answer")
        raise TooLarge(f"{what} is too long: {n} tokens (limit {limit}{why})")

    def check_max_new_tokens(self, value: Any) -> int:
        return check_count(value, "max_new_tokens", self.max_new_tokens)


# ---- images ---------------------------------------------------------------------------------------


def _size_text(n: int) -> str:
    return f"{n / MB:.1f} MB" if n >= MB else f"{n} bytes"


def _check_size(width: int, height: int, limits: Limits, what: str) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f"{what} has zero size ({width}x{height})")
    if width * height > limits.max_pixels:
        raise TooLarge(f"{what} is too large: {width}x{height} = {width * height} pixels "
                         f"(limit {limits.max_pixels} pixels)")
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise InputError(f"{what} is too elongated: {width}x{height} (aspect ratio limit "
                         f"{limits.max_aspect_ratio}:1)")


def _open(data: bytes, limits: Limits, what: str, *, decode: bool) -> Image.Image:
    """Open encoded bytes: header checks always, pixels only with ``decode``."""
    if not data:
        raise InputError(f"{what} is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise TooLarge(f"{what} is too large: {_size_text(len(data))} (limit {_size_text(limits.max_bytes)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = im.size  # from the header, before decoding the pixels
            _check_size(width, height, limits, what)
            if decode:
                im.load()
                return _rgb(im, what)
            return im
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooLarge(f"{what} is too large (decompression bomb guard; limit {limits.max_pixels} pixels)") from None
    except UnidentifiedImageError:
        raise InputError(f"{what} is not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except MemoryError:
        raise TooLarge(f"{what} is too large to decode") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError) as e:
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        raise InputError(f"{what} is corrupt or truncated ({reason})") from None


def _rgb(im: Image.Image, what: str) -> Image.Image:
    try:
        return im if im.mode == "RGB" else im.convert("RGB")
    except (OSError, ValueError) as e:
        raise InputError(f"{what} cannot be converted to RGB ({' '.join(str(e).split())})") from None


def _read_file(image: str | os.PathLike, limits: Limits) -> tuple[bytes, str]:
    """The bytes of an image file (a regular file within the byte limit) and its label."""
    if isinstance(image, str) and not image.strip():
        raise InputError("image path is empty")
    path = Path(image)
    try:
        data = read_regular_file(path, limits.max_bytes, what="image file")
    except FileNotFoundError:
        raise InputError(f"image file not found: {path}") from None
    return data, f"image file {path.name}"


def check_image_file(image: str | os.PathLike, limits: Limits | None = None) -> tuple[int, int]:
    """Cheap check of an image file (type, bytes, format, size from the header; no decoding):
    (width, height), or InputError."""
    limits = limits or DEFAULT_LIMITS
    data, what = _read_file(image, limits)
    return _open(data, limits, what, decode=False).size


def load_image(image: Any, limits: Limits | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image, a path (str / Path), encoded bytes or an HxW[xC] uint8
    array. Raises ``InputError`` for anything else, an unreadable/corrupt file, a zero-size image,
    or one over the limits."""
    limits = limits or DEFAULT_LIMITS
    if isinstance(image, Image.Image):
        _check_size(image.width, image.height, limits, "image")
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as e:
            raise InputError(f"image is corrupt or truncated ({' '.join(str(e).split())})") from None
        return _rgb(image, "image")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _open(bytes(image), limits, "image data", decode=True)
    if isinstance(image, (str, os.PathLike)):
        data, what = _read_file(image, limits)
        return _open(data, limits, what, decode=True)
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


# ---- files ----------------------------------------------------------------------------------------

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, for messages: "a regular file", "a folder", "a FIFO (named pipe)", ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def read_regular_file(path: str | os.PathLike, max_bytes: int, *, what: str = "file") -> bytes:
    """The bytes of ``path``, which must be a regular file (symlinks followed) of at most ``max_bytes``.

    Checked before reading: a folder, device, FIFO or socket raises ``InputError`` without being
    opened (opening a FIFO blocks until a writer comes; ``/dev/zero`` never ends); a file over
    ``max_bytes`` raises ``TooLarge``. The file is then opened non-blocking and checked again on the
    open descriptor (a FIFO swapped in between cannot hang), and at most ``max_bytes + 1`` bytes are
    read (a file that grew is refused too). ``what`` names the file in messages ("recipe", "image
    file", ...). A missing file raises ``FileNotFoundError`` (callers word it); other errors ``InputError``."""
    path = Path(path)
    if "\x00" in str(path):
        raise InputError(f"{what} path contains a NUL character")

    def check(st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{what} {path} is not a file but {file_kind(st.st_mode)} (only regular files are read)")
        if st.st_size > max_bytes:
            raise TooLarge(f"{what} {path.name} is too large: {_size_text(st.st_size)} (limit {_size_text(max_bytes)})")

    try:
        check(os.stat(path))  # follows symlinks: a dangling one is "not found"
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb", closefd=True) as fh:
            check(os.fstat(fd))
            data = fh.read(max_bytes + 1)
    except (FileNotFoundError, InputError):
        raise
    except (OSError, ValueError) as e:  # ValueError: a path the OS cannot take (embedded NUL, ...)
        raise InputError(f"{what} {path} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if len(data) > max_bytes:
        raise TooLarge(f"{what} {path.name} is too large (limit {_size_text(max_bytes)})")
    return data


def read_text_file(path: str | os.PathLike, max_bytes: int, *, what: str = "file", encoding: str = "utf-8") -> str:
    """``read_regular_file`` decoded (``encoding``, e.g. "utf-8-sig" to drop a BOM); text that is not
    valid in it raises ``InputError`` naming the byte."""
    data = read_regular_file(path, max_bytes, what=what)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not {encoding.split('-sig')[0].upper()} text ({e.reason} at byte {e.start})") from None


# ---- text -----------------------------------------------------------------------------------------


def check_text(text: Any, limits: Limits | None = None, what: str = "text") -> str:
    """The question with outer whitespace removed; ``InputError`` if not a string, empty, too long,
    or holding a NUL or a lone surrogate (not encodable as UTF-8)."""
    limits = limits or DEFAULT_LIMITS
    if not isinstance(text, str):
        raise InputError(f"{what} must be a string, got {type(text).__name__}")
    if len(text) > 4 * limits.max_text_chars:  # before strip(): a megabyte of spaces is not free either
        raise TooLarge(f"{what} is too long: {len(text)} characters (limit {limits.max_text_chars})")
    text = text.strip()
    if not text:
        raise InputError(f"{what} is empty")
    if len(text) > limits.max_text_chars:
        raise TooLarge(f"{what} is too long: {len(text)} characters (limit {limits.max_text_chars})")
    if "\x00" in text:
        raise InputError(f"{what} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} contains a lone surrogate at character {e.start} (not valid Unicode text)") from None
    return text


_ROLES = ("user", "assistant", "system")


def check_history(history: Any, limits: Limits | None = None) -> list:
    """Validate a chat history: None, or a list of (user, assistant) pairs (str or None each), or of
    {"role": "user"|"assistant"|"system", "content": ...} messages (content: str, a list of parts
    or a dict, as Gradio sends). Returns it as a list; ``InputError`` on a wrong shape."""
    limits = limits or DEFAULT_LIMITS
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise InputError(f"history must be a list of (user, assistant) pairs or of role/content messages, "
                         f"got {type(history).__name__}")
    if len(history) > limits.max_history_messages:
        raise TooLarge(f"history is too long: {len(history)} entries (limit {limits.max_history_messages})")
    for i, item in enumerate(history):
        if isinstance(item, dict):
            role = item.get("role")
            if role not in _ROLES:
                raise InputError(f"history[{i}]: role must be one of {', '.join(_ROLES)}, got {short_repr(role)}")
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
