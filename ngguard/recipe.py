"""Recipes: one YAML file describes one run. Loaded into frozen, validated dataclasses.

A recipe names components (``module: down_proj``, ``layers: [11]``), never module paths or device
ids. Every field has the paper's default (see shared/NEURAL_GATE.md) except ``model.path`` and
``method``. Any problem raises ``RecipeError`` with ONE line naming the file and the dotted key::

    recipes/x.yaml: edit.lr: expected float, got str 'fast'

Paths: ``model.path``, ``data.queries`` and ``data.multip2a`` are resolved relative to the folder of
the recipe file and stored as absolute paths (so ``to_dict()`` can be dumped into a run folder and
loaded from anywhere). ``model.path: organism`` is special: the bundled model.

Built on ``ngguard.schema`` (fields that carry their checker, ``build``) and ``ngguard.safe_yaml``
(the hardened parser). The methods a recipe may name and their settings classes (one section each):
``ngguard.methods.registry`` (``METHODS``, ``EDIT_METHODS`` and the sections are derived from it).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from loguru import logger

from ngguard.atomic import atomic_write_text
from ngguard.data import MULTIP2A_FILES
from ngguard.device_maps import AUTO_MAPS, device_value, parse_component
from ngguard.judges.spec import make_judge, parse_judge_spec
from ngguard.limits import DEFAULT_LIMITS as _L
from ngguard.limits import InputError, read_text_file
from ngguard.methods.registry import (AUGMENT_SETS, DEFAULT_CONTEXTS, DEFAULT_REFUSAL, REGISTRY, RETAIN_SETS, SECTIONS,
                                      AlphaEditHParams, EditSpec, LocateEditHParams, MemitHParams, Method,
                                      PrivacyProbeHParams, RefusalSteeringHParams)
from ngguard.safe_yaml import parse_yaml
from ngguard.schema import Ctx as _Ctx
from ngguard.schema import boolean as _bool
from ngguard.schema import build as _build
from ngguard.schema import checked as _f
from ngguard.schema import choice as _choice
from ngguard.schema import integer as _int
from ngguard.schema import list_of as _list
from ngguard.schema import nested as _nested
from ngguard.schema import number as _float
from ngguard.schema import optional as _optional
from ngguard.schema import show as _show
from ngguard.schema import suggest as _suggest
from ngguard.schema import text as _str
from ngguard.world.spec import PRIVACY_SUBJECTS, PUBLIC_SUBJECTS

__all__ = [
    "RecipeError",
    "ModelSpec",
    "WorldSpec",
    "DataSpec",
    "LayerSearch",
    "LocalizationSpec",
    "EditSpec",
    "EvaluationSpec",
    "ReportSpec",
    "JudgeSpec",
    "LocateEditHParams",
    "MemitHParams",
    "AlphaEditHParams",
    "PrivacyProbeHParams",
    "RefusalSteeringHParams",
    "Recipe",
    "load_recipe",
    "recipe_from_dict",
    "dump_recipe",
    "recipe_hash",
    "check_layers",
    "check_placement",
    "edited_layers",
    "FrozenMap",
    "safe_name",
    "ORGANISM",
    "METHODS",
    "EDIT_METHODS",
    "METHOD_SECTIONS",
    "MethodSection",
    "RETAIN_SETS",
    "AUGMENT_SETS",
    "MODULES",
    "EVAL_SETS",
    "DEFAULT_CONTEXTS",
    "DEFAULT_REFUSAL",
]

ORGANISM = "organism"
MODULES = ("down_proj", "up_proj", "gate_proj")
DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
SPLITS = ("paper", "field")
TEST_SETS = ("train", "test", "heldout_subjects", "overrefusal", "overrefusal_unseen", "implicit", "awareness",
             "general", "adversarial", "harmful", "multip2a", "utility")
# the validation-role sets (ngguard.world.render.VALIDATION_SPLITS): for choosing settings, never reported as results
VALIDATION_SETS = ("val", "val_pairs", "val_awareness", "val_implicit", "val_adversarial", "val_utility")
EVAL_SETS = TEST_SETS + VALIDATION_SETS
_NO_FILE = "<recipe>"


class RecipeError(ValueError):
    """A recipe problem, as one line: ``<file>: <dotted.key>: <what is wrong>``."""


# ---- value checkers: ngguard.schema (short local names keep the field declarations below short) ---
# A checker takes (value, ctx, key) and returns the normalised value or raises via ctx.fail.


# ---- the sections -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FrozenMap:
    """A small mapping kept hashable inside the frozen recipe (``value``: the plain dict back)."""

    items: tuple = ()

    @property
    def value(self) -> dict:
        return dict(self.items)


_SIZE = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B|B)", re.IGNORECASE)


def _device_map(v, ctx: _Ctx, key: str):
    """auto | balanced | balanced_low_0 | sequential, or {component: device} (see ngguard.devices)."""
    if isinstance(v, str):
        return _choice(AUTO_MAPS, " or a map by component {layers.0-15: 0, default: cpu}")(v, ctx, key)
    if not isinstance(v, Mapping) or not v:
        raise ctx.fail(key, f"expected one of {', '.join(AUTO_MAPS)} or a non-empty map by component, got {_show(v)}")
    for k, dev in v.items():
        try:
            parse_component(k)
            device_value(dev)
        except ValueError as e:
            raise ctx.fail(f"{key}.{k}", str(e)) from None
    return FrozenMap(tuple(v.items()))


def _max_memory(v, ctx: _Ctx, key: str) -> FrozenMap:
    """{device: size}: device = GPU index, cuda:N, cpu or mps; size = bytes or "20GiB" / "500MB"."""
    if not isinstance(v, Mapping) or not v:
        raise ctx.fail(key, f"expected a map {{device: size}} like {{0: 20GiB, cpu: 60GiB}}, got {_show(v)}")
    for k, size in v.items():
        dev_ok = (isinstance(k, int) and not isinstance(k, bool) and k >= 0) or (
            isinstance(k, str) and re.fullmatch(r"cpu|mps|cuda:\d+", k))
        if not dev_ok:
            raise ctx.fail(f"{key}.{k}", "expected a GPU index, cuda:N, cpu or mps")
        if not ((isinstance(size, int) and not isinstance(size, bool) and size > 0)
                or (isinstance(size, str) and _SIZE.fullmatch(size.strip()))):
            raise ctx.fail(f"{key}.{k}", f"expected a size in bytes or like 20GiB, got {_show(size)}")
    return FrozenMap(tuple(v.items()))


@dataclass(frozen=True)
class ModelSpec:
    """``path``: "organism" (the bundled model) or an absolute folder path (resolved at load).
    ``device_map`` (+ ``max_memory``, ``offload_folder``): spread the model over several devices
    through accelerate (``ngguard.adapters.load_adapter``); ``device`` must then stay auto."""

    path: str = _f(MISSING, _str())
    dtype: str = _f("float32", _choice(DTYPES))
    device: str = _f("auto", _choice(DEVICES, " (device ids never go in a recipe: pick the GPU "
                                               "with CUDA_VISIBLE_DEVICES)"))
    trust_remote_code: bool = _f(False, _bool)
    device_map: str | FrozenMap | None = _f(None, _optional(_device_map))
    max_memory: FrozenMap | None = _f(None, _optional(_max_memory))
    offload_folder: str | None = _f(None, _optional(_str()))

    @property
    def is_organism(self) -> bool:
        return self.path == ORGANISM

    def placement(self) -> dict:
        """``load_adapter`` keyword arguments: device or device_map (+ max_memory, offload_folder)."""
        if self.device_map is None:
            return {"device": self.device}
        dm = self.device_map.value if isinstance(self.device_map, FrozenMap) else self.device_map
        return {"device_map": dm, "max_memory": None if self.max_memory is None else self.max_memory.value,
                "offload_folder": self.offload_folder}


@dataclass(frozen=True)
class WorldSpec:
    """Render the synthetic world (``ngguard.world``). ``subjects: None`` = all of them."""

    subjects: tuple[str, ...] | None = _f(None, _optional(_list(_str(), nonempty=True)))
    n: int = _f(30, _int(ge=1, le=_L.max_world_images))
    seed: int = _f(0, _int(ge=0, le=_L.max_seed))


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _name(v, ctx: "_Ctx", key: str) -> str:
    """A run name is one folder name under runs/: letters, digits, '.', '_', '-' (no '/', no '..')."""
    v = _str()(v, ctx, key)
    if not _NAME.fullmatch(v):
        raise ctx.fail(key, f"must be a plain folder name (letters, digits, '.', '_', '-'; at most 100 characters, "
                            f"starting with a letter or digit), got {_show(v)}")
    return v


def safe_name(text: str) -> str:
    """``text`` made into a valid run name (used for the default name: the recipe file's stem)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip("._-")[:100]
    return name or "recipe"


def _multip2a(v, ctx: "_Ctx", key: str) -> str:
    """auto | off | a path. YAML reads a bare ``off`` as false: accept it as "off"."""
    if v is False:
        return "off"
    return _str()(v, ctx, key)


@dataclass(frozen=True)
class DataSpec:
    """Exactly one of ``queries`` (absolute path of a .jsonl, resolved at load) and ``world``.
    ``subjects: None`` = every subject found in the data. ``multip2a``: auto | off | absolute path."""

    queries: str | None = _f(None, _optional(_str()))
    world: WorldSpec | None = _f(None, _optional(_nested(WorldSpec)))
    subjects: tuple[str, ...] | None = _f(None, _optional(_list(_str(), nonempty=True)))
    split: str = _f("paper", _choice(SPLITS))
    heldout_subjects: tuple[str, ...] = _f((), _list(_str()))
    multip2a: str = _f("auto", _multip2a)
    # seen subjects (edited private ones, seen look-alikes) kept out of everything the edit sees: the
    # leave-one-subject-out proxy of the unseen groups, read on the validation sets (val_pairs, ...)
    val_holdout: tuple[str, ...] = _f((), _list(_str()))


@dataclass(frozen=True)
class LayerSearch:
    """Scan layers ``scan[0]..scan[1]`` (inclusive) for the largest share of strongly active
    neurons (centre o), then try single layers in [o - window, o + window]."""

    scan: tuple[int, int] = _f((3, 19))
    window: int = _f(3, _int(ge=0, le=_L.max_list_items))


@dataclass(frozen=True)
class LocalizationSpec:
    steps: int = _f(25, _int(ge=1, le=_L.max_steps))
    lr: float = _f(0.5, _float(gt=0))
    eps: float = _f(1.0e-3, _float(gt=0))
    l1: float = _f(1.0e-3, _float(ge=0))
    init: float = _f(2.0, _float())
    stop_loss: float = _f(0.05, _float(ge=0))
    contexts: tuple[str, ...] = _f(DEFAULT_CONTEXTS, _list(_str(max_len=_L.max_text_chars), max_items=64))
    threshold: float = _f(0.3, _float(gt=0, lt=1))
    top_k: float | None = _f(None, _optional(_float(gt=0, le=100)))
    batch_size: int = _f(32, _int(ge=1, le=_L.max_recipe_batch))




# ---- the methods, as recipes see them: ngguard.methods.registry ----------------------------------

# the names a recipe accepts (``method``, ``report.compare_methods``), in registry order
METHODS = tuple(REGISTRY)
# methods that change weights
EDIT_METHODS = tuple(name for name, m in REGISTRY.items() if m.edits_weights)
# each method's settings class and recipe section (``.hparams``, ``.section``, ``.edits_weights``): the registry
METHOD_SECTIONS = REGISTRY
MethodSection = Method  # the old name of an entry as recipes saw it


@dataclass(frozen=True)
class EvaluationSpec:
    sets: tuple[str, ...] = _f(TEST_SETS, _list(_choice(EVAL_SETS)))
    max_new_tokens: int = _f(24, _int(ge=1, le=_L.max_new_tokens))
    batch_size: int = _f(16, _int(ge=1, le=_L.max_recipe_batch))


@dataclass(frozen=True)
class ReportSpec:
    """``compare_methods``: other methods also run (from the same start) and reported side by side,
    e.g. [no_gate] for the paper's gate ablation. ``alpha_sweep``: alphas re-run for a sweep."""

    plots: bool = _f(True, _bool)
    compare_methods: tuple[str, ...] = _f((), _list(_choice(METHODS)))
    alpha_sweep: tuple[float, ...] | None = _f(None, _optional(_list(_float(ge=0), nonempty=True, max_items=16)))


@dataclass(frozen=True)
class JudgeSpec:
    """The refusal judge of the evaluation: ``rules`` (default), ``learned`` (or ``{learned: FILE}``),
    ``{classifier: PATH, labels: {...}}``
    or ``{generative: PATH, template: FILE}`` (see ``ngguard.judges.spec.parse_judge_spec``). Kept as the
    canonical JSON of the plain value (paths resolved) so the recipe stays hashable and frozen;
    ``value`` gives the plain value back. ``ngguard.judges.make_judge`` accepts the spec itself."""

    canonical: str = '"rules"'

    @property
    def value(self) -> Any:
        return json.loads(self.canonical)

    @property
    def judge(self):
        """The judge, built once per spec by ``make_judge`` (a model judge loads and fingerprints its
        weights once, however many evaluations of a run use it)."""
        return make_judge(self)


def _judge(v, ctx: _Ctx, key: str) -> JudgeSpec:
    """Validate ``judge:`` and resolve its paths against the recipe folder (a spec file is read
    here and inlined)."""
    if isinstance(v, JudgeSpec):
        return v
    if isinstance(v, str) and v.endswith((".yaml", ".yml", ".json")):
        v = str(_resolve(v, ctx.root))
    try:
        spec = parse_judge_spec(v, key)
    except ValueError as e:
        raise ctx.fail("", str(e)) from None
    except FileNotFoundError as e:
        raise ctx.fail(key, str(e)) from None
    kind = spec.pop("kind")
    if kind == "rules":
        plain: Any = "rules" if not spec else {"rules": spec}
    elif kind == "learned" and "path" not in spec:
        plain = "learned"
    elif kind == "learned":
        p = _resolve(spec["path"], ctx.root)
        if ctx.check_files and not p.is_file():
            raise ctx.fail(f"{key}.learned", f"file not found: {p}")
        plain = {"learned": str(p)}
    else:
        path = spec.pop("path")
        p = _resolve(path, ctx.root)
        if ctx.check_files and not p.is_dir():
            raise ctx.fail(f"{key}.{kind}", f"folder not found: {p}")
        plain = {kind: str(p), **spec}
        tpl = spec.get("template")
        if tpl is not None and (os.sep in tpl or tpl.endswith((".yaml", ".yml"))):
            tp = _resolve(tpl, ctx.root)
            if ctx.check_files and not tp.is_file():
                raise ctx.fail(f"{key}.template", f"file not found: {tp}")
            plain["template"] = str(tp)
    try:
        return JudgeSpec(json.dumps(plain, sort_keys=True, ensure_ascii=False))
    except TypeError:
        raise ctx.fail(key, "values must be plain YAML (strings, numbers, mappings, lists)") from None


def _layers(v, ctx: _Ctx, key: str):
    shape = "expected a list of layer indices like [11] or {search: {scan: [lo, hi], window: r}}"
    if isinstance(v, (list, tuple)):
        out = _list(_int(ge=0, le=_L.max_list_items), nonempty=True)(v, ctx, key)
        return tuple(sorted(out))
    if isinstance(v, Mapping):
        if set(v) != {"search"}:
            extra = next((k for k in v if k != "search"), None)
            if extra is not None:
                raise ctx.fail(f"{key}.{extra}", f"unknown key{_suggest(extra, ['search'])}; {shape}")
            raise ctx.fail(key, shape)
        s = v["search"]
        if not isinstance(s, Mapping):
            raise ctx.fail(f"{key}.search", f"expected a mapping {{scan: [lo, hi], window: r}}, "
                                            f"got {_show(s)}")
        for k in s:
            if k not in ("scan", "window"):
                raise ctx.fail(f"{key}.search.{k}", f"unknown key{_suggest(k, ['scan', 'window'])}")
        if "scan" not in s:
            raise ctx.fail(f"{key}.search.scan", "required field missing")
        scan = s["scan"]
        if not (isinstance(scan, (list, tuple)) and len(scan) == 2):
            raise ctx.fail(f"{key}.search.scan", f"expected [lo, hi] (two layer indices), got {_show(scan)}")
        lo, hi = (_int(ge=0, le=_L.max_list_items)(x, ctx, f"{key}.search.scan[{i}]") for i, x in enumerate(scan))
        if lo > hi:
            raise ctx.fail(f"{key}.search.scan", f"lo must be <= hi, got [{lo}, {hi}]")
        window = _int(ge=0, le=_L.max_list_items)(s.get("window", 3), ctx, f"{key}.search.window")
        return LayerSearch(scan=(lo, hi), window=window)
    raise ctx.fail(key, f"{shape}, got {_show(v)}")


def _with_method_sections(cls):
    """Inserts one field per recipe section of the methods (``ngguard.methods.registry.SECTIONS``, in
    registry order) after ``localization``: ``<section>: <its settings class>`` with the class's defaults.
    A new method's section thus needs no line here (its registry entry names it)."""
    own = dict(cls.__dict__["__annotations__"])
    clash = next((s for s in SECTIONS if s in own), None)
    if clash is not None:  # a programming error, caught on import
        raise TypeError(f"registry section {clash!r} is already a Recipe field")
    annotations = {}
    for key, hint in own.items():
        annotations[key] = hint
        if key == "localization":
            for section, settings in SECTIONS.items():
                annotations[section] = settings
                setattr(cls, section, _f(settings(), _nested(settings)))
    cls.__annotations__ = annotations
    return cls


@dataclass(frozen=True)
@_with_method_sections
class Recipe:
    model: ModelSpec = _f(MISSING, _nested(ModelSpec))
    # an edit (EDIT_METHODS), or a guard that edits no weights (keyword_filter, privacy_probe): its patch is
    # then a guard patch (ngguard.guard_patch), served in front of the unedited model
    method: str = _f(MISSING, _choice(METHODS))
    data: DataSpec = _f(MISSING, _nested(DataSpec))
    name: str = _f("recipe", _name)
    seed: int = _f(0, _int(ge=0, le=_L.max_seed))
    # repeat the whole run (world images, data order, localization init) for each seed and report
    # mean and 95% interval; None = just ``seed``. Artifacts (model, patch) come from the first.
    seeds: tuple[int, ...] | None = _f(None, _optional(_list(_int(ge=0, le=_L.max_seed), nonempty=True)))
    layers: tuple[int, ...] | LayerSearch = _f(LayerSearch(), _layers)
    module: str = _f("down_proj", _choice(MODULES))
    localization: LocalizationSpec = _f(LocalizationSpec(), _nested(LocalizationSpec))
    # here, one section per settings class of the methods (``_with_method_sections``: registry.SECTIONS):
    # edit (EditSpec: neural_gate, no_gate, dinm), memit, alphaedit, privacy_probe, refusal_steering
    evaluation: EvaluationSpec = _f(EvaluationSpec(), _nested(EvaluationSpec))
    report: ReportSpec = _f(ReportSpec(), _nested(ReportSpec))
    judge: JudgeSpec = _f(JudgeSpec(), _judge)
    # where the recipe came from (not part of the recipe: not in to_dict, not hashed, not compared)
    source: str | None = field(default=None, compare=False, repr=False, metadata={"internal": True})

    @property
    def run_seeds(self) -> tuple[int, ...]:
        return self.seeds or (self.seed,)

    @property
    def searches_layers(self) -> bool:
        return isinstance(self.layers, LayerSearch)

    @property
    def run_methods(self) -> list[str]:
        """``method`` first, then each of ``report.compare_methods`` once: what a run fits and evaluates."""
        return list(dict.fromkeys([self.method, *self.report.compare_methods]))

    @property
    def edit_method(self) -> str | None:
        """The weight edit the recipe runs: ``method`` when it edits weights, else the first such method
        of ``report.compare_methods`` (a guard as the method, the paper's edit beside it); None: no edit."""
        return next((m for m in (self.method, *self.report.compare_methods) if m in EDIT_METHODS), None)

    def to_dict(self) -> dict:
        """Plain data (lists, not tuples) that ``recipe_from_dict`` accepts back unchanged."""
        return _plain(self)


def _plain(obj: Any) -> Any:
    if isinstance(obj, FrozenMap):
        return {k: _plain(v) for k, v in obj.items}
    if isinstance(obj, LayerSearch):
        return {"search": {"scan": list(obj.scan), "window": obj.window}}
    if isinstance(obj, JudgeSpec):
        return obj.value
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj) if not f.metadata.get("internal")}
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    return obj


# ---- YAML: ngguard.safe_yaml ------------------------------------------------------------------


def _parse_yaml(text: str, file: str) -> Any:
    return parse_yaml(text, file, error=RecipeError)



# ---- loading ----------------------------------------------------------------------------------


def _apply_overrides(raw: dict, overrides: Iterable[str], file: str) -> dict:
    raw = copy.deepcopy(raw)
    for ov in overrides:
        if "=" not in ov:
            raise RecipeError(f"{file}: override {ov!r}: expected dotted.key=value")
        key, text = ov.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise RecipeError(f"{file}: override {ov!r}: bad key {key!r}")
        value = _parse_yaml(text, f"{file}: override {key}") if text.strip() else None
        node = raw
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(f"{file}: {'.'.join(parts[:i + 1])}: override {key} needs a mapping here, "
                                  f"got {_show(nxt)}")
            node = nxt
        node[parts[-1]] = value
    return raw


def _resolve(path: str, root: Path | None) -> Path:
    p = Path(os.path.expanduser(path))
    if not p.is_absolute():
        p = (root or Path.cwd()) / p
    return Path(os.path.normpath(p.absolute()))


def _finish(recipe: Recipe, ctx: _Ctx) -> Recipe:
    """Cross-field checks and path resolution."""
    data, model = recipe.data, recipe.model
    if (data.queries is None) == (data.world is None):
        what = "both" if data.queries is not None else "neither"
        raise ctx.fail("data", f"give exactly one of data.queries (a .jsonl) and data.world, got {what}")
    if data.subjects and data.heldout_subjects:
        both = sorted(set(data.subjects) & set(data.heldout_subjects))
        if both:
            raise ctx.fail("data.heldout_subjects", f"{both[0]!r} is also in data.subjects "
                                                    f"(held-out subjects are never edited)")
    edits = [m for m in recipe.report.compare_methods if m in EDIT_METHODS]
    if recipe.method not in EDIT_METHODS and isinstance(recipe.layers, LayerSearch) and edits:
        raise ctx.fail("layers", f"a layer search needs the main method to edit weights ({recipe.method} does not): "
                                 f"give fixed layers for report.compare_methods' {edits[0]}")
    if data.val_holdout:
        bad = [s for s in data.val_holdout if s not in PRIVACY_SUBJECTS + PUBLIC_SUBJECTS]
        if bad:
            raise ctx.fail("data.val_holdout", f"{bad[0]!r} is not a seen world subject (one of "
                                               f"{', '.join(PRIVACY_SUBJECTS + PUBLIC_SUBJECTS)})")
    changes: dict[str, Any] = {}
    _check_device_map(recipe, ctx)
    mchanges: dict[str, Any] = {}
    if not model.is_organism:
        p = _resolve(model.path, ctx.root)
        if ctx.check_files and not p.is_dir():
            raise ctx.fail("model.path", f"folder not found: {p} (point it at your local download, "
                                         f"or use 'organism' for the bundled model)")
        mchanges["path"] = str(p)
    if model.offload_folder is not None:
        mchanges["offload_folder"] = str(_resolve(model.offload_folder, ctx.root))
    if mchanges:
        changes["model"] = dataclasses.replace(model, **mchanges)
    dchanges: dict[str, Any] = {}
    if data.queries is not None:
        p = _resolve(data.queries, ctx.root)
        if ctx.check_files and not p.is_file():
            raise ctx.fail("data.queries", f"file not found: {p}")
        dchanges["queries"] = str(p)
    if data.multip2a not in ("auto", "off"):
        p = _resolve(data.multip2a, ctx.root)
        if ctx.check_files and not p.exists():
            raise ctx.fail("data.multip2a", f"expected auto, off or an existing path, not found: {p}")
        if ctx.check_files:  # checked now, not when the run reaches it: a folder holding both files
            missing = [f for f in MULTIP2A_FILES.values() if not (p / f).is_file()]  # regular files (links followed)
            if not p.is_dir() or missing:
                raise ctx.fail("data.multip2a", f"expected a Multi-P2A folder holding {' and '.join(MULTIP2A_FILES.values())}"
                                                f", got {p} ({'not a folder' if not p.is_dir() else 'no ' + missing[0]})")
        dchanges["multip2a"] = str(p)
    if dchanges:
        changes["data"] = dataclasses.replace(data, **dchanges)
    locate_edit = [section for section, cls in SECTIONS.items() if issubclass(cls, LocateEditHParams)]
    for name in locate_edit:  # their corpus and cache folder: paths relative to the recipe
        hp = getattr(recipe, name)
        paths = {}
        for key in ("corpus", "cache_dir"):
            value = getattr(hp, key)
            if value is None or (key == "corpus" and value == "world"):
                continue
            p = _resolve(value, ctx.root)
            if key == "corpus" and ctx.check_files and name in (recipe.method, *recipe.report.compare_methods) \
                    and not p.is_file():
                raise ctx.fail(f"{name}.corpus", f"file not found: {p} (a .txt or .jsonl text corpus, or 'world' "
                                                 f"for the organism's built-in one)")
            paths[key] = str(p)
        if paths:
            changes[name] = dataclasses.replace(hp, **paths)
    return dataclasses.replace(recipe, **changes) if changes else recipe


def edited_layers(recipe: Recipe, num_layers: int | None = None) -> list[int]:
    """The layers an edit may write: ``layers``, or every layer of the search's scan (its candidates
    are edited on trial), cut to ``num_layers`` when known."""
    if isinstance(recipe.layers, LayerSearch) and recipe.method not in EDIT_METHODS:
        out = []  # a guard edits nothing (and searches no layers)
    elif isinstance(recipe.layers, LayerSearch):
        lo, hi = recipe.layers.scan
        out = list(range(lo, hi + 1))
    else:
        out = list(recipe.layers)
    return [l for l in out if num_layers is None or l < num_layers]


def _check_device_map(recipe: Recipe, ctx: _Ctx) -> None:
    """Static checks of an explicit map: device stays auto, disk needs an offload folder, and no
    edited layer is offloaded (to disk, or to the CPU next to GPUs)."""
    model = recipe.model
    if model.device_map is None:
        for k in ("max_memory", "offload_folder"):
            if getattr(model, k) is not None:
                raise ctx.fail(f"model.{k}", "only used with model.device_map")
        return
    if model.device != "auto":
        raise ctx.fail("model.device", f"must be auto with model.device_map (the map places the model), got "
                                       f"{model.device!r}")
    if not isinstance(model.device_map, FrozenMap):
        return  # auto & co: checked on the loaded model (check_placement)
    dm = model.device_map.value
    if "disk" in dm.values() and model.offload_folder is None:
        raise ctx.fail("model.offload_folder", "required: model.device_map sends part of the model to disk")
    gpus = any(not (isinstance(d, str) and d in ("cpu", "disk")) for d in dm.values())
    offloaded = ("disk", "cpu") if gpus else ("disk",)
    # (key, layer range, device), the last key naming a layer winning (as in the map); ranges are
    # tested for membership, never expanded (layers.0-99999999 is one range, not 10^8 entries)
    ranges = [(k, rng, dev) for k, dev in dm.items() for name, rng in [parse_component(k)] if name == "layers"]
    for layer in edited_layers(recipe):
        where, dev = next(((k, d) for k, rng, d in reversed(ranges) if layer in rng), ("default", dm.get("default")))
        if dev in offloaded:
            kind = "disk" if dev == "disk" else "CPU (offloaded next to the GPUs)"
            raise ctx.fail(f"model.device_map.{where}", f"edited layer {layer} is offloaded to the {kind}: an edit writes "
                                                        f"the real weights; place layer {layer} on a device")


def check_placement(recipe: Recipe, adapter) -> None:
    """After loading: no edited layer's ``recipe.module`` may be offloaded (e.g. by an auto map
    under ``max_memory``). Raises RecipeError (one line)."""
    from ngguard.devices import edited_offload  # here, not on top: devices imports torch (recipes load without it)

    found = edited_offload(adapter, edited_layers(recipe, adapter.num_layers), recipe.module)
    if found is not None:
        layer, kind = found
        raise RecipeError(f"{recipe.source or _NO_FILE}: model.device_map: edited layer {layer} ({recipe.module}) was "
                          f"offloaded to the {kind}: an edit writes the real weights; give it room (max_memory) or "
                          f"map it to a device")


def recipe_from_dict(raw: Mapping, *, source: str | os.PathLike | None = None,
                     root: str | os.PathLike | None = None, check_files: bool = True) -> Recipe:
    """Validate plain data (as parsed from YAML). Relative paths resolve against ``root``
    (default: the folder of ``source``, else the current folder)."""
    file = str(source) if source is not None else _NO_FILE
    if root is None and source is not None:
        root = Path(source).absolute().parent
    ctx = _Ctx(file, Path(root) if root is not None else None, check_files, error=RecipeError)
    if not isinstance(raw, Mapping):
        raise ctx.fail("", f"expected a mapping of sections at the top level, got {_show(raw)}")
    recipe = _build(Recipe, raw, ctx, "")
    recipe = _finish(recipe, ctx)
    return dataclasses.replace(recipe, source=None if source is None else str(Path(source).absolute()))


def load_recipe(path: str | os.PathLike, *, overrides: Iterable[str] = (), check_files: bool = True) -> Recipe:
    """Load and validate a YAML recipe. ``overrides``: ``"edit.lr=2e-5"``-style strings (values
    parsed as YAML) applied before validation. ``check_files=False`` skips the existence checks of
    ``model.path``, ``data.queries`` and ``data.multip2a`` (for inspecting recipes on another
    machine). ``name`` defaults to the file's stem."""
    path = Path(path)
    file = str(path)
    try:  # a regular file within max_recipe_bytes: never a FIFO or /dev/zero
        text = read_text_file(path, _L.max_recipe_bytes, what="recipe")
    except FileNotFoundError:
        raise RecipeError(f"{file}: recipe file not found") from None
    except InputError as e:
        raise RecipeError(str(e)) from None
    raw = _parse_yaml(text, file)
    if raw is None:
        raise RecipeError(f"{file}: empty recipe (needs at least model.path, method and data)")
    if not isinstance(raw, dict):
        raise RecipeError(f"{file}: expected a mapping of sections at the top level, got {_show(raw)}")
    overrides = list(overrides)
    if overrides:
        raw = _apply_overrides(raw, overrides, file)
    raw.setdefault("name", safe_name(path.stem))
    recipe = recipe_from_dict(raw, source=path, check_files=check_files)
    logger.debug("recipe {} loaded ({}, hash {})", file, recipe.method, recipe_hash(recipe))
    return recipe


def dump_recipe(recipe: Recipe, path: str | os.PathLike) -> Path:
    """Write ``recipe.to_dict()`` as YAML, atomically (``atomic.atomic_write_text``)."""
    return atomic_write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True))


def recipe_hash(recipe: Recipe) -> str:
    """First 16 hex of sha256 over the canonical JSON of ``to_dict()`` (sorted keys, no spaces).
    Independent of key order in the file and of ``source``; paths enter as resolved."""
    canon = json.dumps(recipe.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def check_layers(recipe: Recipe, num_layers: int) -> None:
    """Check the recipe's layers against a loaded model with ``num_layers`` decoder layers
    (call before any work). Raises RecipeError (one line)."""
    file = recipe.source or _NO_FILE
    if isinstance(recipe.layers, LayerSearch) and recipe.method not in EDIT_METHODS:
        return  # a guard searches no layers
    if isinstance(recipe.layers, LayerSearch):
        lo, hi = recipe.layers.scan
        if hi >= num_layers:
            raise RecipeError(f"{file}: layers.search.scan: [{lo}, {hi}] out of range for a model with "
                              f"{num_layers} layers (valid: 0..{num_layers - 1})")
        return
    for layer in recipe.layers:
        if not 0 <= layer < num_layers:
            raise RecipeError(f"{file}: layers: layer {layer} out of range for a model with {num_layers} layers")
