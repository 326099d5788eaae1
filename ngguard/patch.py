"""Compact patches: only the edited matrices, with a manifest and checksums.

A patch folder holds::

    patch.safetensors   the NEW values of the edited tensors (checkpoint names, the base's dtype)
    base.safetensors    the base values they replace (only with include_base=True; makes the
                        patch revertible without the base)
    patch.json          manifest: format version, patch id (first 12 hex of sha256 of
                        patch.safetensors), base fingerprint, base config class/architecture,
                        per-tensor sha256 of the new AND the base values, shapes, dtypes, recipe
                        hash, layers, method, subjects, gate stats, ngguard version. No timestamps:
                        the same inputs give the same bytes.

A GUARD patch (a method that edits no weights: ``ngguard.guard_patch``) holds guard.safetensors instead
of patch.safetensors and a ``guard`` section in patch.json (``tensors: {}``, ``layers: []``); the
same manifest reader, signature and base checks apply, and the weight operations (apply, revert,
swap, LoRA export) refuse it in one line.

Tensor names are CHECKPOINT names (as stored in the base's safetensors files), which can differ
from a loaded model's parameter names in transformers 5 (``compat.checkpoint_renames``, with the
family's ``Adapter.checkpoint_renames`` as the fallback); pass ``model=`` to ``write_patch`` to
translate, ``patch_state_dict`` translates back.

Checkpoint folders are written byte-exactly: weight files without a patched tensor are copied
with ``shutil.copyfile``; a shard with patched tensors is copied and the patched tensors' bytes are
overwritten in place (same dtype and shape, so same offsets: header, metadata and tensor order are
untouched). Every output folder is built in ``<parent>/.tmp-<name>-<random>`` and renamed into
place at the end; on any error the temp folder is removed. Only safetensors are ever read.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from typing import Any, Iterable, Iterator, Mapping

import torch
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CONFIG_MAPPING

from . import __version__
from .adapters import adapter_class
from .atomic import Manifest, atomic_dir, atomic_write_text, sha256_file
from .compat import checkpoint_renames
from .limits import DEFAULT_LIMITS, InputError, TooLarge, read_regular_file, short_repr
from .recipe import MODULES

__all__ = [
    "PatchError",
    "FORMAT",
    "FORMAT_VERSION",
    "base_fingerprint",
    "write_patch",
    "apply_patch",
    "revert_patch",
    "verify_patch",
    "read_manifest",
    "patch_state_dict",
    "load_patch_tensors",
    "checkpoint_to_model_names",
    "sign_patch",
    "patch_key",
    "check_tensor_names",
    "check_base",
    "KEY_ENV",
]

FORMAT = "ngguard-patch"
FORMAT_VERSION = 1
PATCH_FILE = "patch.safetensors"
BASE_FILE = "base.safetensors"
MANIFEST = "patch.json"
SIGNATURE = "patch.sig"
KEY_ENV = "NGGUARD_PATCH_KEY"
MIN_KEY_BYTES = 16
_MAX_MANIFEST_BYTES = 16 << 20
# "...layers.<N>.<...>.<module>.weight": the decoder-layer weights a patch may hold
_LAYER_WEIGHT = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:[A-Za-z0-9_]+\.)*([A-Za-z_][A-Za-z0-9_]*)\.weight")
INDEX = "model.safetensors.index.json"
_CHUNK = 16 << 20
# weight formats other than safetensors: never read; not copied into outputs (they would hold
# unpatched weights, and most are pickles)
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                "U8": torch.uint8, "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _TORCH_DTYPE[_name] = getattr(torch, _attr)
_ST_DTYPE = {v: k for k, v in _TORCH_DTYPE.items()}


class PatchError(ValueError):
    """A patch problem, as one line."""


# ---- safetensors files, read without loading ----------------------------------------------------


@dataclass(frozen=True)
class _Loc:
    """Where one tensor's raw bytes lie: ``file[start:end]``."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _header(path: Path) -> tuple[dict[str, _Loc], dict | None]:
    """Tensor locations and ``__metadata__`` of a safetensors file (reads only the header)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw_n = fh.read(8)
            if len(raw_n) != 8:
                raise ValueError("file shorter than 8 bytes")
            n = int.from_bytes(raw_n, "little")
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} is impossible")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise PatchError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    if not isinstance(header, dict):
        raise PatchError(f"{path}: unreadable safetensors file (header is not a mapping)")
    meta = header.pop("__metadata__", None)
    base = 8 + n
    locs = {}
    for name, info in header.items():
        try:
            dtype, shape, (a, b) = info["dtype"], tuple(int(x) for x in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise PatchError(f"{path}: unreadable safetensors file (bad entry for {name!r})") from None
        numel = 1
        for d in shape:
            numel *= d
        if not (0 <= a <= b and base + b <= size) or (dtype in _DTYPE_SIZE and b - a != numel * _DTYPE_SIZE[dtype]):
            raise PatchError(f"{path}: unreadable safetensors file (bad offsets for {name!r})")
        locs[name] = _Loc(name, path, dtype, shape, base + a, base + b)
    return locs, meta


def _weight_files(model_dir: Path) -> list[Path]:
    if not model_dir.is_dir():
        raise PatchError(f"{model_dir}: not a folder")
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise PatchError(f"{index}: unreadable index (expected a 'weight_map' mapping)") from None
        files = [model_dir / n for n in names]
        for f in files:
            if not f.is_file():
                raise PatchError(f"{model_dir}: shard {f.name} listed in {INDEX} is missing")
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise PatchError(f"{model_dir}: no *.safetensors weights (only safetensors checkpoints are supported)")
    return files


def _locate(model_dir: Path) -> dict[str, _Loc]:
    """All tensors of a checkpoint folder (sharded or not), by checkpoint name."""
    out: dict[str, _Loc] = {}
    for f in _weight_files(model_dir):
        locs, _ = _header(f)
        for name, loc in locs.items():
            if name in out:
                raise PatchError(f"{model_dir}: tensor {name} appears in both {out[name].file.name} and {f.name}")
            out[name] = loc
    return out


def _byte_range(fh, start: int, n: int, name) -> "Iterator[bytes]":
    """The ``n`` bytes of ``fh`` from ``start``, in chunks; PatchError if the file ends early."""
    fh.seek(start)
    while n > 0:
        buf = fh.read(min(_CHUNK, n))
        if not buf:
            raise PatchError(f"{name}: file ends early")
        yield buf
        n -= len(buf)


def _sha_range(fh, start: int, n: int) -> str:
    h = hashlib.sha256()
    for buf in _byte_range(fh, start, n, fh.name):
        h.update(buf)
    return h.hexdigest()


def _digests(locs: Iterable[_Loc]) -> dict[str, str]:
    """sha256 of each tensor's raw bytes, streamed (one file open at a time, bounded memory)."""
    by_file: dict[Path, list[_Loc]] = {}
    for loc in locs:
        by_file.setdefault(loc.file, []).append(loc)
    out = {}
    for f, group in sorted(by_file.items()):
        with open(f, "rb") as fh:
            for loc in sorted(group, key=lambda x: x.start):
                out[loc.name] = _sha_range(fh, loc.start, loc.nbytes)
    return out


def _fingerprint(entries: Iterable[tuple[str, str, tuple[int, ...], str]]) -> str:
    h = hashlib.sha256()
    for name, dtype, shape, sha in sorted(entries):
        h.update(json.dumps([name, dtype, list(shape), sha], separators=(",", ":")).encode() + b"\n")
    return h.hexdigest()


def _fp_of(locs: Mapping[str, _Loc], digests: Mapping[str, str]) -> str:
    return _fingerprint((n, l.dtype, l.shape, digests[n]) for n, l in locs.items())


def base_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over the sorted (tensor name, dtype, shape, sha256 of raw bytes) of every tensor in
    the folder's safetensors weights (the shards listed in ``model.safetensors.index.json`` if
    present, else every ``*.safetensors``). Streamed: a 7B checkpoint is never held in memory.
    Independent of how the tensors are split into shards."""
    model_dir = Path(model_dir)
    locs = _locate(model_dir)
    total = sum(l.nbytes for l in locs.values())
    logger.debug("fingerprinting {} tensors ({:.2f} GB) in {}", len(locs), total / 1e9, model_dir)
    return _fp_of(locs, _digests(locs.values()))


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _sha_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(t)).hexdigest()


# ---- atomic folders ----------------------------------------------------------------------------


def _check_out(out_dir: Path, overwrite: bool, *others: Path) -> None:
    """Early checks of an output folder (before any expensive work)."""
    if (out_dir.exists() or out_dir.is_symlink()) and not overwrite:
        raise PatchError(f"{out_dir.absolute()} already exists (pass overwrite=True / --overwrite to replace it)")
    o = out_dir.resolve()
    for other in others:
        r = Path(other).resolve()
        if o == r or r in o.parents or o in r.parents:
            raise PatchError(f"output folder {out_dir} must not be, contain or lie inside {other}")


def _copy_range(src: Path, src_start: int, dst_fh, dst_start: int, n: int) -> None:
    with open(src, "rb") as fh:
        dst_fh.seek(dst_start)
        for buf in _byte_range(fh, src_start, n, src):
            dst_fh.write(buf)


def _write_checkpoint(src_dir: Path, out_dir: Path, targets: Mapping[str, _Loc], sources: Mapping[str, _Loc],
                      expected: Mapping[str, str], overwrite: bool) -> list[str]:
    """Copy ``src_dir`` to ``out_dir`` (atomically), replacing the bytes of tensor ``name`` (at
    ``targets[name]`` in src) by the bytes at ``sources[name]``; then check each replaced region
    against ``expected[name]`` (sha256). Returns the rewritten weight files' names."""
    weight_files = set(_weight_files(src_dir))
    touched: dict[Path, list[str]] = {}
    for name, loc in targets.items():
        touched.setdefault(loc.file, []).append(name)
    rewritten = []
    with atomic_dir(out_dir, overwrite=overwrite, error=PatchError) as tmp:
        for src in sorted(src_dir.rglob("*")):
            rel = src.relative_to(src_dir)
            if any(part.startswith(".") for part in rel.parts):
                continue  # .cache/, .git*, ...: download metadata, not the model
            dst = tmp / rel
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            if src in weight_files and src in touched:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                with open(dst, "r+b") as fh:
                    for name in sorted(touched[src], key=lambda n: targets[n].start):
                        t, s = targets[name], sources[name]
                        _copy_range(s.file, s.start, fh, t.start, t.nbytes)
                    fh.flush()
                    for name in touched[src]:
                        if _sha_range(fh, targets[name].start, targets[name].nbytes) != expected[name]:
                            raise PatchError(f"{dst}: tensor {name} does not read back as written")
                rewritten.append(str(rel))
            elif (src.suffix in _OTHER_WEIGHTS or src.name.endswith(".bin.index.json")) and src not in weight_files:
                logger.warning("not copying {} (non-safetensors weights would not carry the patch)", rel)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
        for f in weight_files:
            if (tmp / f.relative_to(src_dir)).stat().st_size != f.stat().st_size:
                raise PatchError(f"{f.name}: size changed while copying")
    return rewritten


# ---- manifest ----------------------------------------------------------------------------------


def _jsonable(obj: Any, where: str) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, where) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.item() if obj.numel() == 1 and obj.dim() == 0 else obj.tolist(), where)
    if hasattr(obj, "item") and hasattr(obj, "dtype") and getattr(obj, "shape", None) == ():  # numpy scalar
        return _jsonable(obj.item(), where)
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy array
        return _jsonable(obj.tolist(), where)
    if isinstance(obj, float) and obj != obj:
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise PatchError(f"{where}: cannot store {type(obj).__name__} in patch.json (use numbers, strings, lists, dicts)")


def _base_info(base_dir: Path) -> dict:
    try:
        cfg = json.loads((base_dir / "config.json").read_text())
    except (OSError, ValueError):
        logger.warning("{}: no readable config.json; the manifest will not name the architecture", base_dir)
        return {"config_class": None, "model_type": None, "architectures": None}
    model_type = cfg.get("model_type")
    config_class = None
    try:
        config_class = CONFIG_MAPPING[model_type].__name__
    except Exception:  # noqa: BLE001 (unknown / custom model types)
        pass
    return {"config_class": config_class, "model_type": model_type, "architectures": cfg.get("architectures")}


def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _short(value: Any, width: int = 40) -> str:
    return short_repr(value, width)


def _check_schema(m: dict, path: Path) -> None:
    """Types of every manifest field the code reads (a wrong type is refused here, as one line,
    instead of failing somewhere later)."""
    def bad(key: str, want: str, value: Any) -> PatchError:
        return PatchError(f"{path}: manifest field {key}: expected {want}, got {type(value).__name__} {_short(value)}")

    hex64 = re.compile(r"[0-9a-f]{64}")
    if not isinstance(m["patch_id"], str) or not re.fullmatch(r"[0-9a-f]{12}", m["patch_id"]):
        raise bad("patch_id", "12 hex digits", m["patch_id"])
    if not isinstance(m["base"], dict) or not isinstance(m["base"].get("fingerprint"), str):
        raise bad("base", "a mapping with a 'fingerprint' string", m["base"])
    if not isinstance(m["patched_fingerprint"], str):
        raise bad("patched_fingerprint", "a string", m["patched_fingerprint"])
    if not isinstance(m["tensors"], dict):
        raise bad("tensors", "a mapping name -> {shape, dtype, sha256, base_sha256}", m["tensors"])
    for name, info in m["tensors"].items():
        where = f"tensors[{_short(name)}]"
        if not isinstance(info, dict):
            raise bad(where, "a mapping", info)
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40
                                                  for d in shape) or len(shape) > 8:
            raise bad(f"{where}.shape", "a list of sizes", shape)
        if info.get("dtype") not in _DTYPE_SIZE:
            raise bad(f"{where}.dtype", f"one of {', '.join(_DTYPE_SIZE)}", info.get("dtype"))
        for k in ("sha256", "base_sha256"):
            if not isinstance(info.get(k), str) or not hex64.fullmatch(info[k]):
                raise bad(f"{where}.{k}", "64 hex digits", info.get(k))
    if not isinstance(m["files"], dict):
        raise bad("files", "a mapping file name -> {sha256, bytes}", m["files"])
    for fname, info in m["files"].items():
        if fname not in (PATCH_FILE, BASE_FILE):
            raise bad("files", f"only {PATCH_FILE} and {BASE_FILE}", fname)
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) or \
                not isinstance(info.get("bytes"), int) or isinstance(info.get("bytes"), bool):
            raise bad(f"files[{fname}]", "a mapping {sha256: str, bytes: int}", info)
    layers = m.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(x, int) and not isinstance(x, bool)
                                                             and 0 <= x < 100_000 for x in layers):
        raise bad("layers", "a non-empty list of layer indices", layers)
    for key, typ, want in (("method", (str, type(None)), "a string"), ("subjects", list, "a list of strings"),
                           ("extra", dict, "a mapping"), ("recipe_hash", (str, type(None)), "a string")):
        if key in m and not isinstance(m[key], typ):
            raise bad(key, want, m[key])
    if "subjects" in m and not all(isinstance(x, str) for x in m["subjects"]):
        raise bad("subjects", "a list of strings", m["subjects"])
    module = (m.get("extra") or {}).get("module")
    if module is not None and (not isinstance(module, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", module)):
        raise bad("extra.module", "a module name like down_proj", module)


# ---- guard patches (a method that edits no weights; written and loaded by ngguard.guard_patch) -----------
GUARD_FILE = "guard.safetensors"
META_KEY = "ngguard_guard"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_guard(manifest: Mapping) -> bool:
    """Whether a patch manifest describes a guard (no weight changes) rather than a weight edit."""
    return isinstance(manifest, Mapping) and "guard" in manifest


def check_guard_manifest(m: dict, path: Path) -> None:
    """Field types of a guard manifest (``patch.read_manifest`` calls this for manifests with ``guard``)."""
    def bad(key: str, want: str, value: Any) -> Exception:
        return PatchError(f"{path}: manifest field {key}: expected {want}, got {type(value).__name__} {_short(value)}")

    if not isinstance(m["patch_id"], str) or not re.fullmatch(r"[0-9a-f]{12}", m["patch_id"]):
        raise bad("patch_id", "12 hex digits", m["patch_id"])
    if not isinstance(m["base"], dict) or not isinstance(m["base"].get("fingerprint"), str):
        raise bad("base", "a mapping with a 'fingerprint' string", m["base"])
    if m["tensors"] != {} or m.get("layers") != []:
        raise PatchError(f"{path}: patch {m['patch_id']} holds weight changes and a guard: a patch is either a weight "
                     f"edit or a guard (serve the guard on the unedited base)")
    if m["patched_fingerprint"] != m["base"]["fingerprint"]:
        raise bad("patched_fingerprint", "the base's fingerprint (a guard changes no weights)", m["patched_fingerprint"])
    files = m["files"]
    if not isinstance(files, dict) or set(files) != {GUARD_FILE} or not isinstance(files[GUARD_FILE], dict) or \
            not isinstance(files[GUARD_FILE].get("sha256"), str) or not isinstance(files[GUARD_FILE].get("bytes"), int):
        raise bad("files", f"{{{GUARD_FILE}: {{sha256, bytes}}}}", files)
    g = m["guard"]
    if not isinstance(g, dict) or g.get("class") not in ("ProbeGuard", "KeywordFilter"):
        raise bad("guard.class", "ProbeGuard or KeywordFilter", g.get("class") if isinstance(g, dict) else g)
    if not isinstance(g.get("settings"), dict) or not isinstance(g.get("probes", {}), dict):
        raise bad("guard", "a mapping with settings (and probes)", g)
    if not isinstance(g.get("tensors"), dict):
        raise bad("guard.tensors", "a mapping name -> {shape, dtype, sha256}", g.get("tensors"))
    for name, info in g["tensors"].items():
        where = f"guard.tensors[{_short(name)}]"
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list) or len(info["shape"]) > 4 or \
                not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in info["shape"]):
            raise bad(f"{where}.shape", "a list of sizes", info.get("shape") if isinstance(info, dict) else info)
        if info.get("dtype") not in _DTYPE_SIZE:
            raise bad(f"{where}.dtype", f"one of {', '.join(_DTYPE_SIZE)}", info.get("dtype"))
        if not isinstance(info.get("sha256"), str) or not _HEX64.fullmatch(info["sha256"]):
            raise bad(f"{where}.sha256", "64 hex digits", info.get("sha256"))
    if m.get("method") != g.get("method"):
        raise bad("method", f"the guard's method {g.get('method')!r}", m.get("method"))
    refusal = g["settings"].get("refusal")
    if not isinstance(refusal, str) or not refusal.strip() or (m.get("extra") or {}).get("refusal") != refusal:
        raise bad("extra.refusal", f"the guard's refusal {_short(refusal)}", (m.get("extra") or {}).get("refusal"))


def check_guard_files(patch_dir: Path, m: dict) -> dict[str, torch.Tensor]:
    """Check ``guard.safetensors`` against the manifest (file checksum = patch id, the settings it
    carries, each tensor's dtype, shape, checksum, finite values); return its tensors (CPU)."""
    pid, label = m["patch_id"], f"{GUARD_FILE} corrupted"
    path = Path(patch_dir) / GUARD_FILE
    if not path.is_file():
        raise PatchError(f"patch {pid}: {GUARD_FILE} is missing from {patch_dir}")
    sha = sha256_file(path)
    if sha != m["files"][GUARD_FILE]["sha256"] or sha[:12] != pid:
        raise PatchError(f"patch {pid}: checksum mismatch for {GUARD_FILE}: {label}")
    locs, meta = _header(path)  # checks the header's offsets
    want = m["guard"]["tensors"]
    if set(locs) != set(want):
        raise PatchError(f"patch {pid}: {GUARD_FILE} and patch.json disagree on tensor {sorted(set(locs) ^ set(want))[0]}: "
                     f"{label}")
    try:
        stored = json.loads((meta or {}).get(META_KEY, ""))
    except ValueError:
        stored = None
    if stored != {k: v for k, v in m["guard"].items() if k != "tensors"}:
        raise PatchError(f"patch {pid}: the guard settings in patch.json differ from those in {GUARD_FILE}: patch.json "
                     f"edited or corrupted")
    out = {}
    with safe_open(str(path), framework="pt") as fh:
        for name in sorted(locs):
            t = fh.get_tensor(name)
            info = want[name]
            if locs[name].dtype != info["dtype"] or list(t.shape) != info["shape"]:
                raise PatchError(f"patch {pid}: tensor {name} is {locs[name].dtype}{list(t.shape)}, patch.json says "
                             f"{info['dtype']}{info['shape']}: {label}")
            if _sha_tensor(t) != info["sha256"]:
                raise PatchError(f"checksum mismatch for guard tensor {name}: {label}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise PatchError(f"patch {pid}: guard tensor {name} holds NaN or infinite values: refused")
            out[name] = t.clone()  # own, aligned memory: the same float sums as the fitted guard
    return out


def _check_patch_manifest(m: dict, path: Path) -> None:
    if is_guard(m):  # a guard patch (``ngguard.guard_patch``): no weight tensors, a guard section
        return check_guard_manifest(m, path)
    _check_schema(m, path)
    if not m["tensors"]:
        raise PatchError(f"{path}: manifest lists no tensors")


PATCH_MANIFEST = Manifest(MANIFEST, "patch", FORMAT, FORMAT_VERSION,
                          required=("patch_id", "base", "patched_fingerprint", "tensors", "files"),
                          error=PatchError, max_bytes=_MAX_MANIFEST_BYTES, check=_check_patch_manifest)
read_manifest = PATCH_MANIFEST.read  # load and sanity-check patch.json (no checksums; see verify_patch)


def check_tensor_names(m: dict, expected: Iterable[str] | None = None) -> None:
    """Every tensor of the patch is the weight of the manifest's module in one of the manifest's
    layers: ``...layers.<L>.<...>.<module>.weight`` with L in ``layers`` and module =
    ``extra.module`` (or, for manifests without it, one of the recipe modules down/up/gate_proj).
    With ``expected`` (the checkpoint names the model's adapter gives for those layers and module),
    the names must be among them exactly. Raises PatchError naming the first stray tensor."""
    module = (m.get("extra") or {}).get("module")
    allowed = ({module} if module else set(MODULES)) & set(MODULES)  # an edit only ever changes an MLP matrix
    layers = set(m["layers"])
    expected = None if expected is None else set(expected)
    for name in sorted(m["tensors"]):
        match = _LAYER_WEIGHT.fullmatch(name) if isinstance(name, str) and len(name) < 1000 else None
        ok = match is not None and int(match.group(1)) in layers and match.group(2) in allowed
        if ok and expected is not None:
            ok = name in expected
        if not ok:
            raise PatchError(f"patch {m['patch_id']}: tensor {_short(name, 200)} is not the {'/'.join(sorted(allowed)) or module} "
                             f"weight of layer(s) {sorted(layers)} the manifest names: refused")


def _check_file(patch_dir: Path, m: dict, fname: str, sha_key: str, label: str) -> dict[str, _Loc]:
    """Check one of the patch's safetensors files against the manifest; return its locations."""
    path = patch_dir / fname
    if not path.is_file():
        raise PatchError(f"patch {m['patch_id']}: {fname} is missing from {patch_dir}")
    locs, _ = _header(path)
    want = m["tensors"]
    if set(locs) != set(want):
        odd = sorted(set(locs) ^ set(want))[0]
        raise PatchError(f"patch {m['patch_id']}: {fname} and {MANIFEST} disagree on tensor {odd}: {label} corrupted")
    for name, loc in locs.items():
        if loc.dtype != want[name]["dtype"] or list(loc.shape) != list(want[name]["shape"]):
            raise PatchError(f"patch {m['patch_id']}: tensor {name} in {fname} is {loc.dtype}{list(loc.shape)}, "
                             f"manifest says {want[name]['dtype']}{want[name]['shape']}: {label} corrupted")
    digests = _digests(locs.values())
    for name in sorted(locs):
        if digests[name] != want[name][sha_key]:
            what = "tensor" if fname == PATCH_FILE else "base tensor"
            raise PatchError(f"checksum mismatch for {what} {name}: {label} corrupted")
    sha = sha256_file(path)
    if sha != m["files"].get(fname, {}).get("sha256"):
        raise PatchError(f"patch {m['patch_id']}: checksum mismatch for {fname}: {label} corrupted")
    if fname == PATCH_FILE and sha[:12] != m["patch_id"]:
        raise PatchError(f"patch {m['patch_id']}: {fname} has id {sha[:12]}: {label} corrupted")
    _check_finite(path, locs, m["patch_id"])
    return locs


def _check_finite(path: Path, locs: Mapping[str, _Loc], patch_id: str) -> None:
    """Every floating-point value in the file is finite (one tensor in memory at a time)."""
    with safe_open(str(path), framework="pt") as fh:
        for name in sorted(locs):
            t = fh.get_tensor(name)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise PatchError(f"patch {patch_id}: tensor {name} in {path.name} holds NaN or infinite values: refused")


def _check_patch(patch_dir: Path, *, need_base: bool = False,
                 key: bytes | None = None) -> tuple[dict, dict[str, _Loc], dict[str, _Loc] | None]:
    m = read_manifest(patch_dir)
    if key is not None:
        _check_signature(patch_dir, m, key)
    if "guard" in m:  # a guard patch: its own file, no weight tensors
        check_guard_files(patch_dir, m)
        if need_base:
            raise PatchError(f"patch {m['patch_id']} is a guard ({m['method']}): it changes no weights, there is "
                             f"nothing to revert")
        return m, {}, None
    check_tensor_names(m)
    new = _check_file(patch_dir, m, PATCH_FILE, "sha256", "patch file")
    old = None
    if BASE_FILE in m["files"]:
        old = _check_file(patch_dir, m, BASE_FILE, "base_sha256", f"{BASE_FILE}")
    elif need_base:
        raise PatchError(f"patch {m['patch_id']} holds no base values (written with include_base=False): "
                         f"re-apply it to the original base instead of reverting")
    return m, new, old


def _check_against(m: dict, locs: Mapping[str, _Loc], folder: Path) -> None:
    """Every patched tensor exists in ``folder`` with the manifest's shape and dtype."""
    for name, info in sorted(m["tensors"].items()):
        loc = locs.get(name)
        if loc is None:
            raise PatchError(f"patch {m['patch_id']}: tensor {name} is not in {folder}")
        if loc.dtype != info["dtype"] or list(loc.shape) != list(info["shape"]):
            raise PatchError(f"patch {m['patch_id']}: tensor {name} is {info['dtype']}{list(info['shape'])} in "
                             f"the patch but {loc.dtype}{list(loc.shape)} in {folder}")


# ---- signatures (optional): HMAC-SHA256 of patch.json with an operator's key ----------------------


def patch_key(key_file: str | os.PathLike | None = None) -> bytes | None:
    """The operator's patch key: the bytes of ``key_file`` (trailing newline dropped), else the
    ``NGGUARD_PATCH_KEY`` environment variable, else None (signatures not checked). At least
    16 bytes."""
    if key_file is not None:
        try:  # a regular file: a FIFO or /dev/zero would hang or fill the memory
            key = read_regular_file(key_file, DEFAULT_LIMITS.max_key_bytes, what="key file").rstrip(b"\r\n")
        except OSError as e:
            raise PatchError(f"{key_file}: cannot read the key file ({e.strerror or e})") from None
        except InputError as e:
            raise PatchError(str(e)) from None
        where = str(key_file)
    elif os.environ.get(KEY_ENV):
        key, where = os.environ[KEY_ENV].encode("utf-8"), KEY_ENV
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise PatchError(f"{where}: the patch key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
    return key


def _mac(patch_dir: Path, key: bytes) -> str:
    return hmac.new(key, (patch_dir / MANIFEST).read_bytes(), hashlib.sha256).hexdigest()


def sign_patch(patch_dir: str | os.PathLike, key: bytes) -> str:
    """Write ``patch.sig`` (HMAC-SHA256 of ``patch.json``, which holds the sha256 of every file and
    tensor) after checking the patch. Atomic. Returns the signature."""
    patch_dir = Path(patch_dir)
    m, _, _ = _check_patch(patch_dir)
    mac = _mac(patch_dir, key)
    atomic_write_text(patch_dir / SIGNATURE, json.dumps({"alg": "hmac-sha256", "patch_id": m["patch_id"],
                                                         "mac": mac}) + "\n")
    return mac


def _check_signature(patch_dir: Path, m: dict, key: bytes) -> None:
    path = patch_dir / SIGNATURE
    try:  # a regular file of at most 4 KB: a FIFO would hang the read, a link to /dev/zero never end
        raw = read_regular_file(path, 4096, what="patch signature")
    except FileNotFoundError:
        raise PatchError(f"patch {m['patch_id']}: not signed ({SIGNATURE} missing) but a patch key is set: "
                         f"refused") from None
    except TooLarge:
        raw = b""  # no signature of ours: a bad one
    except InputError as e:  # a FIFO, a device, a folder, unreadable
        raise PatchError(f"patch {m['patch_id']}: {e}") from None
    try:
        sig = json.loads(raw)
    except ValueError:
        sig = None
    mac = sig.get("mac") if isinstance(sig, dict) else None
    if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(patch_dir, key)):
        raise PatchError(f"patch {m['patch_id']}: bad signature (signed with another key, or patch.json changed): "
                         f"refused")


# ---- name translation (checkpoint <-> model) -----------------------------------------------------


def checkpoint_to_model_names(model: torch.nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Map checkpoint tensor names to the loaded model's state-dict names, the way
    ``from_pretrained`` renames them (transformers' weight-conversion rules). Names the model
    does not have are left out; one-to-many conversions (fused experts, ...) are not supported."""
    state = model.state_dict()
    names = list(names)
    out = {n: n for n in names if n in state}
    todo = [n for n in names if n not in state]
    if not todo:
        return out
    family = adapter_class(model)  # the family's renaming, when transformers cannot say
    out.update(checkpoint_renames(model, todo, state, family.checkpoint_renames if family is not None else ()))
    return out


# ---- public API --------------------------------------------------------------------------------


def write_patch(out_dir: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *, base_dir: str | os.PathLike,
                recipe_hash: str, layers: Iterable[int], method: str, gate_stats: Mapping,
                subjects: Iterable[str], extra: Mapping | None = None, include_base: bool = True,
                model: torch.nn.Module | None = None, overwrite: bool = False) -> dict:
    """Write a patch folder holding ``tensors`` (edited values) for the checkpoint in ``base_dir``.

    ``tensors`` are keyed by checkpoint names, or by ``model``'s parameter names when ``model`` is
    given (translated with ``checkpoint_to_model_names``). Values are cast to the base's dtype.
    ``include_base``: also store the replaced base values (revertible without the base).
    Returns the manifest (``manifest["patch_id"]``)."""
    base_dir = Path(base_dir)
    out_dir = Path(out_dir)
    _check_out(out_dir, overwrite, base_dir)
    if not tensors:
        raise PatchError("write_patch: no tensors given")
    locs = _locate(base_dir)
    rename: dict[str, str] = {}
    missing = [n for n in tensors if n not in locs]
    if missing and model is not None:
        to_model = checkpoint_to_model_names(model, locs)
        inverse = {v: k for k, v in to_model.items()}
        rename = {n: inverse[n] for n in missing if n in inverse}
    new: dict[str, torch.Tensor] = {}
    for given, t in tensors.items():
        name = rename.get(given, given)
        loc = locs.get(name)
        if loc is None:
            hint = "" if model is not None else " (pass model= to translate parameter names to checkpoint names)"
            raise PatchError(f"tensor {given} is not in the base checkpoint {base_dir}{hint}")
        if not isinstance(t, torch.Tensor):
            raise PatchError(f"tensor {given}: expected a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != loc.shape:
            raise PatchError(f"tensor {given}: shape {list(t.shape)} does not match the base's {list(loc.shape)}")
        if loc.dtype not in _TORCH_DTYPE:
            raise PatchError(f"tensor {given}: base dtype {loc.dtype} is not supported")
        if name in new:
            raise PatchError(f"tensor {name} given twice (as {given} and another name)")
        t = t.detach().to("cpu")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise PatchError(f"tensor {given} has non-finite values (NaN/inf): refusing to write the patch")
        if _ST_DTYPE.get(t.dtype) != loc.dtype:
            logger.debug("casting {} from {} to the base dtype {}", name, t.dtype, loc.dtype)
        new[name] = t.to(_TORCH_DTYPE[loc.dtype]).contiguous().clone()

    check_tensor_names({"patch_id": "(new)", "layers": sorted(int(x) for x in layers), "extra": dict(extra or {}),
                        "tensors": new})
    logger.info("fingerprinting base {}", base_dir)
    digests = _digests(locs.values())
    base_fp = _fp_of(locs, digests)
    new_sha = {n: _sha_tensor(t) for n, t in new.items()}
    for n in sorted(new):
        if new_sha[n] == digests[n]:
            logger.warning("tensor {} is identical to the base: the patch does not change it", n)
    patched = dict(digests, **new_sha)
    patched_fp = _fp_of(locs, patched)

    with atomic_dir(out_dir, overwrite=overwrite, error=PatchError) as tmp:
        # same tensors -> same bytes: sorted insertion order, and ONE metadata key (safetensors
        # writes metadata in hash-map order, which varies between calls)
        save_file({n: new[n] for n in sorted(new)}, str(tmp / PATCH_FILE), metadata={"format": "pt"})
        files = {PATCH_FILE: {"sha256": sha256_file(tmp / PATCH_FILE), "bytes": (tmp / PATCH_FILE).stat().st_size}}
        if include_base:
            base_vals = {}
            for n in sorted(new):
                with safe_open(str(locs[n].file), framework="pt") as fh:  # one tensor at a time
                    base_vals[n] = fh.get_tensor(n)
            save_file(base_vals, str(tmp / BASE_FILE), metadata={"format": "pt"})
            del base_vals
            files[BASE_FILE] = {"sha256": sha256_file(tmp / BASE_FILE), "bytes": (tmp / BASE_FILE).stat().st_size}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "patch_id": files[PATCH_FILE]["sha256"][:12],
            "base": dict(_base_info(base_dir), fingerprint=base_fp),
            "patched_fingerprint": patched_fp,
            "tensors": {n: {"shape": list(locs[n].shape), "dtype": locs[n].dtype, "sha256": new_sha[n],
                            "base_sha256": digests[n]} for n in sorted(new)},
            "files": files,
            "recipe_hash": recipe_hash,
            "layers": sorted(int(x) for x in layers),
            "method": method,
            "subjects": [str(s) for s in subjects],
            "gate_stats": _jsonable(gate_stats, "gate_stats"),
            "extra": _jsonable(extra or {}, "extra"),
            "created_by": f"ngguard {__version__}",
        }
        try:
            _dump_json(tmp / MANIFEST, manifest)
        except ValueError as e:
            raise PatchError(f"patch.json: {e}") from None
        _check_patch(tmp)  # read back: what we wrote is what the manifest says
    size = sum(f["bytes"] for f in files.values())
    logger.info("patch {} written to {} ({} tensors, {:.1f} MB)", manifest["patch_id"], out_dir, len(new), size / 1e6)
    return manifest


def _weights_only(m: dict, what: str) -> None:
    """Refuse a guard patch where weights are to be written (one line)."""
    if "guard" in m:
        raise PatchError(f"patch {m['patch_id']} is a guard ({m['method']}), not a weight edit: {what}; serve it on "
                         f"the unedited base (ngguard serve --model BASE --patch DIR, ProtectedLVLM)")


def verify_patch(patch_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None, *,
                 key: bytes | None = None) -> dict:
    """Check a patch folder: manifest (field types; every tensor is the manifest's module in one
    of its layers), file and per-tensor checksums (new and base values), finite values, the
    signature when ``key`` is given (``patch_key``) and, with ``base_dir``, that the base holds
    every tensor with the right shape/dtype and has the fingerprint the patch was made for.
    Returns a report; raises PatchError on any failure."""
    patch_dir = Path(patch_dir)
    m, _, old = _check_patch(patch_dir, key=key)
    report = {
        "ok": True,
        "patch_id": m["patch_id"],
        "format_version": m["format_version"],
        "tensors": sorted(m["tensors"]),
        "bytes": sum(f["bytes"] for f in m["files"].values()),
        "revertible": old is not None,
        "base_fingerprint": m["base"]["fingerprint"],
        "base_model": m["base"].get("config_class") or m["base"].get("model_type"),
        "method": m.get("method"),
        "layers": m.get("layers"),
        "subjects": m.get("subjects"),
        "recipe_hash": m.get("recipe_hash"),
        "base_checked": False,
        "signature": "valid" if key is not None else ("not checked (no key)" if (patch_dir / SIGNATURE).exists()
                                                       else "none"),
        "kind": "guard" if "guard" in m else "weights",
    }
    if "guard" in m:  # what the guard holds (``ngguard.guard_patch.load_guard`` builds it: ``patch verify`` does)
        report["guard"] = {"class": m["guard"]["class"], "tensors": sorted(m["guard"]["tensors"]),
                           "probes": sorted(m["guard"].get("probes", {}))}
    if base_dir is not None:
        check_base(m, base_dir)
        report["base_checked"] = True
    return report


def check_base(m: dict, base_dir: str | os.PathLike) -> None:
    """The one check that the patch of manifest ``m`` fits the base checkpoint folder ``base_dir``,
    shared by every entry point (``patch verify --base``, ``patch apply``, ``ProtectedLVLM`` and so
    ``ngguard serve``): every patched tensor is in the folder with the manifest's shape and dtype (a
    float32 patch with recomputed checksums does not fit a float16 base), and the folder's fingerprint
    is the base's the patch was made for (not the patched model, not another base). PatchError otherwise."""
    base_dir = Path(base_dir)
    locs = _locate(base_dir)
    _check_against(m, locs, base_dir)
    logger.info("fingerprinting base {}", base_dir)
    _check_fp(m, _fp_of(locs, _digests(locs.values())), base_dir)


def _check_fp(m: dict, fp: str, base_dir: Path) -> None:
    if fp == m["base"]["fingerprint"]:
        return
    if fp == m["patched_fingerprint"]:
        raise PatchError(f"patch {m['patch_id']}: {base_dir} already holds this patch (it is the patched model, "
                         f"not the base)")
    raise PatchError(f"patch {m['patch_id']} was made for base {m['base']['fingerprint'][:12]}, "
                     f"this base is {fp[:12]}")


def apply_patch(base_dir: str | os.PathLike, patch_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                overwrite: bool = False, key: bytes | None = None) -> dict:
    """Write ``out_dir``: a full HF checkpoint folder = the base (every non-weight file copied as
    is) whose weight files are byte-identical except the patched tensors. Refuses (PatchError) a
    corrupted patch, a patch made for another base, or tensors the base lacks. Atomic."""
    base_dir, patch_dir, out_dir = Path(base_dir), Path(patch_dir), Path(out_dir)
    _check_out(out_dir, overwrite, base_dir, patch_dir)
    m, new_locs, _ = _check_patch(patch_dir, key=key)
    _weights_only(m, "there is no checkpoint to write")
    check_base(m, base_dir)
    locs = _locate(base_dir)
    targets = {n: locs[n] for n in m["tensors"]}
    expected = {n: info["sha256"] for n, info in m["tensors"].items()}
    rewritten = _write_checkpoint(base_dir, out_dir, targets, new_locs, expected, overwrite)
    logger.info("patch {} applied: {} ({} tensors in {})", m["patch_id"], out_dir, len(targets), ", ".join(rewritten))
    return {"patch_id": m["patch_id"], "out_dir": str(out_dir), "tensors": sorted(targets),
            "rewritten_files": rewritten, "fingerprint": m["patched_fingerprint"]}


def revert_patch(patched_dir: str | os.PathLike, patch_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 overwrite: bool = False, key: bytes | None = None) -> dict:
    """Write ``out_dir`` = ``patched_dir`` with the base values put back (from the patch's
    ``base.safetensors``). Checks first that ``patched_dir`` is exactly base + this patch (patched
    tensors hold the new values, every other tensor the base's). When ``patched_dir`` came from
    ``apply_patch``, the result's weight files are byte-identical to the original base's."""
    patched_dir, patch_dir, out_dir = Path(patched_dir), Path(patch_dir), Path(out_dir)
    _check_out(out_dir, overwrite, patched_dir, patch_dir)
    m, _, old_locs = _check_patch(patch_dir, need_base=True, key=key)
    locs = _locate(patched_dir)
    _check_against(m, locs, patched_dir)
    digests = _digests(locs.values())
    for name, info in sorted(m["tensors"].items()):
        if digests[name] == info["sha256"]:
            continue
        if digests[name] == info["base_sha256"]:
            raise PatchError(f"patch {m['patch_id']}: {patched_dir} holds the base values of {name}: "
                             f"it is not patched (nothing to revert)")
        raise PatchError(f"patch {m['patch_id']}: tensor {name} in {patched_dir} holds neither the patched "
                         f"nor the base values")
    fp = _fp_of(locs, digests)
    if fp != m["patched_fingerprint"]:
        raise PatchError(f"patch {m['patch_id']}: {patched_dir} is not base {m['base']['fingerprint'][:12]} + this "
                         f"patch (other tensors differ: fingerprint {fp[:12]}, expected "
                         f"{m['patched_fingerprint'][:12]})")
    targets = {n: locs[n] for n in m["tensors"]}
    expected = {n: info["base_sha256"] for n, info in m["tensors"].items()}
    rewritten = _write_checkpoint(patched_dir, out_dir, targets, old_locs, expected, overwrite)
    logger.info("patch {} reverted: {}", m["patch_id"], out_dir)
    return {"patch_id": m["patch_id"], "out_dir": str(out_dir), "tensors": sorted(targets),
            "rewritten_files": rewritten, "fingerprint": m["base"]["fingerprint"]}


def load_patch_tensors(patch_dir: str | os.PathLike, *, key: bytes | None = None,
                       expected: Iterable[str] | None = None) -> tuple[dict, dict[str, torch.Tensor],
                                                                        dict[str, torch.Tensor] | None]:
    """(manifest, new values, base values or None) of a checked patch folder, keyed by checkpoint
    names, in the patch's dtype on the CPU. Checksums are verified first (PatchError otherwise);
    ``key`` and ``expected``: as ``patch_state_dict`` (signature, allowed tensor names)."""
    m, new_locs, old_locs = _check_patch(Path(patch_dir), key=key)
    _weights_only(m, "it holds no weight tensors")
    if expected is not None:
        check_tensor_names(m, expected)

    def read(locs: Mapping[str, _Loc] | None) -> dict[str, torch.Tensor] | None:
        if locs is None:
            return None
        with safe_open(str(next(iter(locs.values())).file), framework="pt") as fh:
            return {name: fh.get_tensor(name) for name in sorted(locs)}

    return m, read(new_locs), read(old_locs)


@torch.no_grad()
def patch_state_dict(model: torch.nn.Module, patch_dir: str | os.PathLike, *, reverse: bool = False,
                     key: bytes | None = None, expected: Iterable[str] | None = None) -> list[str]:
    """Swap the patched tensors of a loaded model in place: base -> patched, or patched -> base
    with ``reverse=True`` (needs the patch's base values). Checks names, shapes and (when the
    model's dtype equals the patch's or is a wider float) that the model holds the expected "before" values, so a
    double toggle or a different base is refused. Values are cast to each parameter's dtype and
    device. ``key``: check the patch's signature; ``expected``: the only checkpoint names the patch
    may hold (``check_tensor_names``). Returns the model parameter names changed."""
    patch_dir = Path(patch_dir)
    m, new_locs, old_locs = _check_patch(patch_dir, need_base=reverse, key=key)
    _weights_only(m, "it holds no weights to swap")
    if expected is not None:
        check_tensor_names(m, expected)
    src = old_locs if reverse else new_locs
    to_model = checkpoint_to_model_names(model, m["tensors"])
    state = model.state_dict(keep_vars=True)
    params = {}
    for name, info in sorted(m["tensors"].items()):
        key = to_model.get(name)
        if key is None:
            raise PatchError(f"patch {m['patch_id']}: tensor {name} has no counterpart in this "
                             f"{type(model).__name__}")
        p = state[key]
        if p.device.type == "meta":
            raise PatchError(f"patch {m['patch_id']}: {key} is offloaded (accelerate device map): the patch writes "
                             f"the real weights; place that layer on a device")
        if list(p.shape) != list(info["shape"]):
            raise PatchError(f"patch {m['patch_id']}: {key} is {list(p.shape)} in the model, "
                             f"{info['shape']} in the patch")
        want = _TORCH_DTYPE.get(info["dtype"])
        # the model may hold the checkpoint's values in a wider dtype (an fp16 checkpoint loaded as fp32):
        # cast back to the patch's dtype (exact) and compare; a narrower model dtype cannot be checked
        if want is not None and (p.dtype == want or p.dtype.is_floating_point and want.is_floating_point
                                 and p.dtype.itemsize > want.itemsize):
            before, after = (info["sha256"], info["base_sha256"]) if reverse else (info["base_sha256"], info["sha256"])
            have = _sha_tensor(p.detach().to(want))
            if have == after:
                state_name = "base" if reverse else "patched"
                raise PatchError(f"patch {m['patch_id']}: the model already holds the {state_name} values of {key}")
            if have != before:
                raise PatchError(f"patch {m['patch_id']}: the model's {key} holds neither the base nor the patched "
                                 f"values (a different base?)")
        params[name] = (key, p)
    changed = []
    with safe_open(str(src[next(iter(src))].file), framework="pt") as fh:
        for name, (key, p) in params.items():
            p.copy_(fh.get_tensor(name).to(device=p.device, dtype=p.dtype))
            changed.append(key)
    logger.info("patch {} {} on the loaded model ({} tensors)", m["patch_id"], "removed" if reverse else "applied",
                len(changed))
    return changed
