"""Checked dataclasses: the value-checking toolkit behind ``ngguard.recipe``.

A field carries its checker (``checked(default, check)``); ``build(cls, raw, ctx, prefix)`` validates a
mapping against the dataclass: unknown keys (with a "did you mean"), types, ranges, required fields,
nested sections. A checker takes ``(value, ctx, key)`` and returns the normalised value or raises
``ctx.fail(key, msg)``: ONE line naming the file and the dotted key::

    recipes/x.yaml: edit.lr: expected float, got str 'fast'
"""
from __future__ import annotations

import difflib
from dataclasses import MISSING, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ngguard.limits import DEFAULT_LIMITS as _L
from ngguard.limits import short_repr

__all__ = ["Ctx", "show", "suggest", "number", "integer", "boolean", "text", "choice", "list_of", "optional", "nested",
           "checked", "build"]


class Ctx:
    """Where a value is checked: the file (named first in every error), the folder relative paths
    resolve against, whether files named by the value must exist, and the error class raised."""

    def __init__(self, file: str, root: Path | None, check_files: bool, error: type[Exception] = ValueError) -> None:
        self.file = file
        self.root = root
        self.check_files = check_files
        self.error = error

    def fail(self, key: str, msg: str) -> Exception:
        """The one-line error ``<file>: <dotted.key>: <msg>`` (to raise)."""
        return self.error(f"{self.file}: {key}: {msg}" if key else f"{self.file}: {msg}")


def show(value: Any) -> str:
    """``str 'fast'``: type name + short repr, always one line (never the repr of a whole huge value)."""
    return f"{type(value).__name__} {short_repr(value)}"


def suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def number(*, gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None) -> Callable:
    def check(v, ctx: Ctx, key: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ctx.fail(key, f"expected float, got {show(v)}")
        v = float(v)
        if v != v or v in (float("inf"), float("-inf")):
            raise ctx.fail(key, f"must be a finite number, got {v}")
        _range(v, ctx, key, gt, ge, lt, le)
        return v

    return check


def integer(*, ge: int | None = None, gt: int | None = None, le: int | None = _L.max_steps) -> Callable:
    def check(v, ctx: Ctx, key: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ctx.fail(key, f"expected int, got {show(v)}")
        _range(v, ctx, key, gt, ge, None, le)
        return int(v)

    return check


def _range(v, ctx, key, gt, ge, lt, le) -> None:
    lo = f"> {gt}" if gt is not None else (f">= {ge}" if ge is not None else None)
    hi = f"< {lt}" if lt is not None else (f"<= {le}" if le is not None else None)
    low_ok = (gt is None or v > gt) and (ge is None or v >= ge)
    high_ok = (lt is None or v < lt) and (le is None or v <= le)
    if not (low_ok and high_ok):  # name the bound that is broken (both for a float range)
        want = " and ".join(x for x in (lo, hi) if x) if isinstance(v, float) else (lo if not low_ok else hi)
        raise ctx.fail(key, f"must be {want}, got {v}")


def boolean(v, ctx: Ctx, key: str) -> bool:
    if not isinstance(v, bool):
        raise ctx.fail(key, f"expected bool (true/false), got {show(v)}")
    return v


def text(*, nonempty: bool = True, max_len: int = 4096) -> Callable:
    def check(v, ctx: Ctx, key: str) -> str:
        if not isinstance(v, str):
            raise ctx.fail(key, f"expected str, got {show(v)}")
        if nonempty and not v.strip():
            raise ctx.fail(key, "must not be empty")
        if len(v) > max_len:
            raise ctx.fail(key, f"too long: {len(v)} characters (limit {max_len})")
        return v

    return check


def choice(options: Sequence[str], hint: str = "") -> Callable:
    def check(v, ctx: Ctx, key: str) -> str:
        if not isinstance(v, str):
            raise ctx.fail(key, f"expected one of {', '.join(options)}, got {show(v)}")
        if v not in options:
            raise ctx.fail(key, f"unknown value {v!r}{suggest(v, options)}; choose from "
                                f"{', '.join(options)}{hint}")
        return v

    return check


def list_of(item: Callable, *, nonempty: bool = False, unique: bool = True,
          max_items: int = _L.max_list_items) -> Callable:
    def check(v, ctx: Ctx, key: str) -> tuple:
        if not isinstance(v, (list, tuple)):
            raise ctx.fail(key, f"expected a list, got {show(v)}")
        if nonempty and not v:
            raise ctx.fail(key, "must not be an empty list")
        if len(v) > max_items:
            raise ctx.fail(key, f"too many entries: {len(v)} (limit {max_items})")
        out = tuple(item(x, ctx, f"{key}[{i}]") for i, x in enumerate(v))
        if unique and len(set(out)) != len(out):
            dup = next(x for x in out if out.count(x) > 1)
            raise ctx.fail(key, f"duplicate entry {dup!r}")
        return out

    return check


def optional(inner: Callable) -> Callable:
    def check(v, ctx: Ctx, key: str):
        return None if v is None else inner(v, ctx, key)

    return check


def nested(cls) -> Callable:
    def check(v, ctx: Ctx, key: str):
        return build(cls, v, ctx, key)

    check.section = True  # a missing section is built from {} (so its own required keys are named)
    return check


def checked(default: Any = MISSING, check: Callable | None = None, **meta) -> Any:
    """A dataclass field carrying its checker."""
    meta = {"check": check, **meta}
    return field(default=default, metadata=meta)


def build(cls, raw: Any, ctx: Ctx, prefix: str):
    """Validate a mapping against dataclass ``cls`` (unknown keys, types, ranges, required)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ctx.fail(prefix, f"expected a mapping (key: value), got {show(raw)}")
    names = [f.name for f in fields(cls) if not f.metadata.get("internal")]
    for k in raw:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ctx.fail(where, f"unknown key{suggest(k, names)}")
    values = {}
    for f in fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in raw:
            check = f.metadata.get("check")
            values[f.name] = check(raw[f.name], ctx, key) if check else raw[f.name]
        elif f.default is MISSING and f.default_factory is MISSING:
            check = f.metadata.get("check")
            if getattr(check, "section", False):
                values[f.name] = check({}, ctx, key)
            else:
                raise ctx.fail(key, "required field missing")
    return cls(**values)
