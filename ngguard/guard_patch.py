"""Guard patches: a registry method that edits no weights (``privacy_probe``, ``keyword_filter``) saved
as a patch folder, so that it can be served like a weight edit (``ProtectedLVLM``, ``ngguard serve``).

A guard patch folder holds::

    guard.safetensors   the guard's tensors (``privacy_probe``: each probe's mean / std / w / b, named
                        ``<field>.<tensor>``), with ONE metadata key ``ngguard_guard``: the canonical JSON
                        of the guard's settings (below), so the file's sha256 covers tensors AND settings
    patch.json          the patch manifest (``ngguard.patch``: format, patch id = first 12 hex of the
                        sha256 of guard.safetensors, base fingerprint, file checksums, method, subjects,
                        ``extra.refusal``), with ``tensors: {}`` and ``layers: []`` (no weight changes;
                        ``patched_fingerprint`` = the base's) and a ``guard`` section: the guard's class,
                        its settings (every scalar field), its probes' non-tensor fields (layers,
                        threshold, log) and each tensor's shape, dtype and sha256

The guard is written GENERICALLY from its dataclass fields: a ``LinearProbe`` field (or a list of
them) becomes a probe, a tensor field a tensor, any plain value (numbers, strings, lists, mappings) a
setting; the ``adapter`` field is the model it is loaded onto. A field added to ``ProbeGuard`` later
travels without a change here; a value of another type is refused when writing (one line). Reading
checks the manifest, the file checksum, each tensor's checksum, dtype, shape and finiteness, that the
settings in patch.json and in guard.safetensors agree, and (when loaded onto a model) that every probe
reads existing layers of the right width. The decision logic stays the guard's own
(``ProbeGuard.decide``, ``KeywordFilter.blocks``). Nothing is ever unpickled.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import torch
from loguru import logger
from safetensors.torch import save_file

from . import __version__
from .atomic import atomic_dir, sha256_file
from .evaluate import guard_flags
from .methods import keyword_filter, privacy_probe
from .patch import (_ST_DTYPE, FORMAT, FORMAT_VERSION, GUARD_FILE, MANIFEST, META_KEY, PatchError, _base_info,
                    _check_signature, _dump_json, _jsonable, _sha_tensor, base_fingerprint, check_guard_files, is_guard,
                    read_manifest)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _classes() -> dict[str, type]:
    """The guard classes a patch may name (a fixed list: a file never chooses what code to import).
    Looked up when called (a test may put a subclass in their module)."""
    return {"ProbeGuard": privacy_probe.ProbeGuard, "KeywordFilter": keyword_filter.KeywordFilter,
            "LinearProbe": privacy_probe.LinearProbe}


def _error(msg: str) -> Exception:
    return PatchError(msg)


def _plain(value: Any, where: str) -> Any:
    """A JSON value for a setting (tuples become lists); anything else is refused."""
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1 or type(value).__module__ == "numpy" and \
            getattr(value, "shape", None) == ():  # a number held as a tensor / numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise _error(f"{where}: {value} cannot be stored in a guard patch (not finite)")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise _error(f"{where}: cannot store a {type(value).__name__} in a guard patch (numbers, strings, lists, "
                 f"mappings, tensors and LinearProbe fields can be stored)")


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
    """``obj``'s dataclass fields as {"settings": ..., "probes": ...}, its tensors added to ``tensors``."""
    probe_cls = _classes()["LinearProbe"]
    settings, probes = {}, {}
    for f in dataclasses.fields(obj):
        if f.name == "adapter":  # the model the guard reads: given when loading
            continue
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if isinstance(value, probe_cls):
            probes[f.name] = _split(value, f"{name}.", tensors)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, probe_cls) for v in value):
            probes[f.name] = [_split(v, f"{name}.{i}.", tensors) for i, v in enumerate(value)]
        elif isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous().clone()
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise _error(f"{name}: non-finite values: refusing to write the guard patch")
            tensors[name] = t
        else:
            settings[f.name] = _plain(value, name)
    out = {"settings": settings}
    if probes:
        out["probes"] = probes
    return out


def guard_state(guard: Any) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the guard's description without tensors, its tensors by name) for any registered guard class."""
    cls = type(guard).__name__
    if _classes().get(cls) is not type(guard) or cls == "LinearProbe":
        raise _error(f"cannot write a guard patch for a {cls} (known guards: ProbeGuard, KeywordFilter)")
    tensors: dict[str, torch.Tensor] = {}
    return {"class": cls, **_split(guard, "", tensors)}, tensors


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def write_guard_patch(out_dir: str | os.PathLike, guard: Any, *, base_dir: str | os.PathLike, recipe_hash: str | None,
                      method: str, subjects, extra: Mapping | None = None, overwrite: bool = False) -> dict:
    """Write a guard patch folder for ``guard`` fitted on the checkpoint in ``base_dir`` (atomic; the
    same guard gives the same bytes). Returns the manifest."""

    desc, tensors = guard_state(guard)
    desc["method"] = method
    base_dir = Path(base_dir)
    logger.info("fingerprinting base {}", base_dir)
    fp = base_fingerprint(base_dir)
    extra = dict(extra or {})
    refusal = getattr(guard, "refusal", None)
    if extra.setdefault("refusal", refusal) != refusal:
        raise PatchError(f"extra.refusal {extra['refusal']!r} is not the guard's refusal {refusal!r}")
    with atomic_dir(out_dir, overwrite=overwrite, error=PatchError) as tmp:
        # sorted tensors and ONE metadata key: the same guard gives the same bytes
        save_file({n: tensors[n] for n in sorted(tensors)}, str(tmp / GUARD_FILE), metadata={META_KEY: _canonical(desc)})
        files = {GUARD_FILE: {"sha256": sha256_file(tmp / GUARD_FILE), "bytes": (tmp / GUARD_FILE).stat().st_size}}
        desc["tensors"] = {n: {"shape": list(t.shape), "dtype": _ST_DTYPE[t.dtype], "sha256": _sha_tensor(t)}
                           for n, t in sorted(tensors.items())}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "patch_id": files[GUARD_FILE]["sha256"][:12],
            "base": dict(_base_info(base_dir), fingerprint=fp),
            "patched_fingerprint": fp,  # no weight changes
            "tensors": {}, "files": files, "recipe_hash": recipe_hash, "layers": [], "method": method,
            "subjects": [str(s) for s in subjects], "gate_stats": {}, "extra": _jsonable(extra, "extra"),
            "guard": desc, "created_by": f"ngguard {__version__}",
        }
        _dump_json(tmp / MANIFEST, manifest)
        load_guard(tmp)  # read back: what we wrote is what the manifest says, and it builds the guard
    logger.info("guard patch {} ({}) written to {} ({} tensors)", manifest["patch_id"], method, out_dir, len(tensors))
    return manifest


# ---- reading ------------------------------------------------------------------------------------------


def _value(f: dataclasses.Field, value: Any) -> Any:
    """A stored setting as the field wants it: lists back to tuples for tuple fields."""
    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, list) else v
    return tup(value) if str(f.type).startswith("tuple") and isinstance(value, list) else value


def _build(cls: type, desc: dict, prefix: str, tensors: dict[str, torch.Tensor], adapter: Any, pid: str,
           used: set[str]) -> Any:
    """An instance of ``cls`` from its stored description (``_split``'s inverse); the names of the
    tensors it takes are added to ``used``."""
    probe_cls = _classes()["LinearProbe"]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    settings, probes = desc.get("settings"), desc.get("probes", {})
    if not isinstance(settings, dict) or not isinstance(probes, dict):
        raise _error(f"patch {pid}: guard entry {prefix or cls.__name__} is not a mapping of settings and probes")
    kw: dict[str, Any] = {}
    for name in [*settings, *probes]:
        if name not in fields or name == "adapter" or (name in settings and name in probes):
            raise _error(f"patch {pid}: {cls.__name__} has no field {prefix}{name} (a guard written by another "
                         f"ngguard version?)")
    for name, value in settings.items():
        default = fields[name].default  # a setting with a number / string / flag default keeps its type
        if isinstance(default, (bool, int, float, str)) and not (
                type(value) is type(default) or isinstance(default, float) and type(value) is int):
            raise _error(f"patch {pid}: {cls.__name__} setting {prefix}{name} must be a {type(default).__name__}, "
                         f"got {type(value).__name__} {value!r:.40}")
        kw[name] = _value(fields[name], value)
    for name, value in probes.items():
        if isinstance(value, list):
            kw[name] = tuple(_build(probe_cls, v, f"{prefix}{name}.{i}.", tensors, adapter, pid, used)
                             for i, v in enumerate(value))
        else:
            kw[name] = _build(probe_cls, value, f"{prefix}{name}.", tensors, adapter, pid, used)
    for name in fields:
        if f"{prefix}{name}" in tensors:
            kw[name] = tensors[f"{prefix}{name}"]
            used.add(f"{prefix}{name}")
    if "adapter" in fields:
        kw["adapter"] = adapter
    missing = [n for n, f in fields.items() if n not in kw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise _error(f"patch {pid}: the guard patch lacks {cls.__name__} field {prefix}{missing[0]} (written by "
                     f"another ngguard version?)")
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise _error(f"patch {pid}: cannot build the {cls.__name__} {prefix or ''}({str(e).splitlines()[0]})") from None


def _check_probe(probe: Any, name: str, adapter: Any, pid: str) -> None:
    """A probe fits the model it reads: existing layers, tensors as wide as their states."""
    layers = probe.layers
    if not isinstance(layers, tuple) or not layers or not all(isinstance(x, int) and not isinstance(x, bool)
                                                              for x in layers):
        raise _error(f"patch {pid}: probe {name}: layers must be a non-empty list of layer indices, got {layers!r}")
    if not isinstance(probe.threshold, (int, float)) or isinstance(probe.threshold, bool) or \
            not 0 <= probe.threshold <= 1:
        raise _error(f"patch {pid}: probe {name}: threshold must be a probability, got {probe.threshold!r}")
    if adapter is None:
        return
    n = adapter.num_layers
    bad = [x for x in layers if not 0 <= x < n]
    if bad:
        raise _error(f"patch {pid}: probe {name} reads layer {bad[0]}, the model has {n} layers (0..{n - 1}): "
                     f"a guard made for another model?")
    width = len(layers) * adapter.hidden_size
    for f in dataclasses.fields(probe):
        t = getattr(probe, f.name)
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] != width:
            raise _error(f"patch {pid}: probe {name}.{f.name} has {t.shape[0]} entries, the model's states "
                         f"{width}: a guard made for another model?")


def load_guard(patch_dir: str | os.PathLike, adapter: Any = None, *, key: bytes | None = None) -> tuple[dict, Any]:
    """(manifest, guard) of a checked guard patch folder; the guard reads ``adapter``'s model (a
    ``ProbeGuard``) or only the prompt (a ``KeywordFilter``). ``key``: the patch must carry a valid
    signature (``ngguard.patch.patch_key``). PatchError (one line) for anything wrong."""
    patch_dir = Path(patch_dir)
    m = read_manifest(patch_dir)
    if not is_guard(m):
        raise _error(f"patch {m['patch_id']} is a weight patch, not a guard patch")
    if key is not None:
        _check_signature(patch_dir, m, key)
    tensors = check_guard_files(patch_dir, m)
    cls = _classes()[m["guard"]["class"]]
    used: set[str] = set()
    guard = _build(cls, m["guard"], "", tensors, adapter, m["patch_id"], used)
    for f in dataclasses.fields(guard):
        value = getattr(guard, f.name)
        for i, p in enumerate(value if isinstance(value, tuple) else (value,)):
            if isinstance(p, _classes()["LinearProbe"]):
                _check_probe(p, f.name if not isinstance(value, tuple) else f"{f.name}.{i}", adapter, m["patch_id"])
    stray = sorted(set(tensors) - used)
    if stray:
        raise _error(f"patch {m['patch_id']}: guard tensor {stray[0]} belongs to no field of {cls.__name__}")
    return m, guard


def blocked(guard: Any, images: list, texts: list[str]) -> list[bool]:
    """Which (image, text) requests ``guard`` refuses (``ngguard.evaluate.guard_flags``: the guard's own
    decision; a probe guard reads the model's hidden states on the image and the prompt)."""
    return guard_flags(guard, [SimpleNamespace(image=im, prompt=t, subject=None) for im, t in zip(images, texts)])
