"""Judge specs and the factory: ``make_judge(spec)`` builds a judge from a recipe's / the CLI's
``judge`` value: ``"rules"`` (default, ``ngguard.judges.rules``), ``"learned"`` / ``{"learned": WEIGHTS}`` (the
hashed n-gram classifier, bundled weights by default, ``ngguard.judges.learned``), ``{"classifier": PATH, ...}`` or
``{"generative": PATH, ...}`` (``ngguard.judges.models``: HF checkpoints, loaded only when asked
for). Imports flow one way: this module imports the judges, no judge imports it, and nothing here
knows the recipe (a recipe's ``JudgeSpec`` is recognised by its ``canonical`` JSON text)."""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

from ngguard.judges import models  # torch-free at import: it loads torch / transformers when a model judge is built
from ngguard.judges.learned import LearnedJudge
from ngguard.judges.rules import RefusalJudge
from ngguard.limits import DEFAULT_LIMITS, read_text_file
from ngguard.safe_yaml import parse_yaml

JUDGE_KINDS = ("rules", "learned", "classifier", "generative")


def parse_judge_spec(value: Any, where: str = "judge") -> dict:
    """Normalise a judge spec into a dict with ``kind`` (one line ValueError on anything else).

    Accepted: ``"rules"``; ``"learned"`` (bundled weights) / ``"learned:FILE"`` / ``{"learned": FILE}``;
    ``"classifier:PATH"`` / ``"generative:PATH"`` (CLI shorthand); a path to
    a ``.yaml``/``.yml``/``.json`` file holding one of the mappings below; ``{"rules": {...}}``
    (optional ``prefixes``/``keywords``/``sentence_rules``); ``{"classifier": PATH, "labels": {...},
    "input": "response"|"pair", "batch_size": N, "device": ..., "max_length": N}``; ``{"generative": PATH,
    "template": FILE, "batch_size": N, "device": ...}``."""
    if value is None or value == "rules":
        return {"kind": "rules"}
    if value == "learned":
        return {"kind": "learned"}
    if isinstance(value, str):
        kind, sep, rest = value.partition(":")
        if sep and kind in ("learned", "classifier", "generative") and rest.strip():
            return parse_judge_spec({kind: rest.strip()}, where)
        if value.endswith((".yaml", ".yml", ".json")):
            return parse_judge_spec(_read_spec_file(value, where), value)
        raise ValueError(f"{where}: unknown judge {value!r}; use rules, learned, classifier:PATH, generative:PATH "
                         f"or a judge spec file (.yaml/.json)")
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected rules or a mapping like {{classifier: PATH}}, got {type(value).__name__}")
    kinds = [k for k in JUDGE_KINDS if k in value]
    if len(kinds) != 1:
        raise ValueError(f"{where}: give exactly one of {', '.join(JUDGE_KINDS)} (got "
                         f"{', '.join(map(str, value)) or 'an empty mapping'})")
    kind = kinds[0]
    allowed = {"rules": {"rules"}, "learned": {"learned"}, "classifier": {"classifier", "labels", "input", "batch_size", "device", "max_length"},
               "generative": {"generative", "template", "batch_size", "device"}}[kind]
    extra = [k for k in value if k not in allowed]
    if extra:
        raise ValueError(f"{where}.{extra[0]}: unknown key for a {kind} judge (allowed: {', '.join(sorted(allowed))})")
    out = {"kind": kind, **{k: v for k, v in value.items() if k != kind}}
    if kind == "rules":
        opts = value["rules"] or {}
        if not isinstance(opts, Mapping):
            raise ValueError(f"{where}.rules: expected a mapping (prefixes, keywords, sentence_rules), "
                             f"got {type(opts).__name__}")
        bad = [k for k in opts if k not in ("prefixes", "keywords", "sentence_rules")]
        if bad:
            raise ValueError(f"{where}.rules.{bad[0]}: unknown key (allowed: keywords, prefixes, sentence_rules)")
        return {"kind": "rules", **opts}
    path = value[kind]
    if kind == "learned" and path in (None, "", "bundled"):
        return {"kind": "learned"}
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        what = "weights file (.safetensors)" if kind == "learned" else "model folder"
        raise ValueError(f"{where}.{kind}: expected the path of a {what}, got {path!r}")
    out["path"] = str(path)
    for key in ("batch_size", "max_length"):
        if key in out and (isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1):
            raise ValueError(f"{where}.{key}: expected a positive integer, got {out[key]!r}")
    if kind == "generative" and not isinstance(out.get("template"), str):
        raise ValueError(f"{where}.template: a generative judge needs a template file (see judges/*.yaml)")
    if kind == "classifier":
        if "labels" in out and not isinstance(out["labels"], Mapping):
            raise ValueError(f"{where}.labels: expected a mapping {{checkpoint label: refusal|partial|compliance}}")
        if out.get("input", "response") not in ("response", "pair"):
            raise ValueError(f"{where}.input: expected response or pair, got {out['input']!r}")
    return out


def _read_spec_file(path: str, where: str) -> Any:
    p = os.path.expanduser(path)
    try:  # a regular file of recipe size (never a FIFO or /dev/zero)
        text = read_text_file(p, DEFAULT_LIMITS.max_recipe_bytes, what="judge spec file")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: judge spec file not found") from None
    # the recipes' hardened loader: safe, no duplicate keys, bounded size/depth/aliases; one line naming the file
    raw = parse_yaml(text, f"{path}: judge spec file")
    if isinstance(raw, Mapping) and "judge" in raw and len(raw) == 1:
        raw = raw["judge"]
    if isinstance(raw, Mapping):  # relative paths inside the file are relative to the file
        base = os.path.dirname(os.path.abspath(p))
        raw = dict(raw)
        for key in ("learned", "classifier", "generative", "template"):
            if isinstance(raw.get(key), str) and not os.path.isabs(os.path.expanduser(raw[key])):
                raw[key] = os.path.join(base, raw[key])
    return raw


def make_judge(spec: Any = "rules", *, device: str | None = None):
    """Build a judge from a spec (see ``parse_judge_spec``); an already built judge is returned
    as is. A recipe's ``JudgeSpec`` (anything with a ``canonical`` JSON text) is built once per
    (spec, device) and reused, so a model judge loads and fingerprints its weights once however many
    evaluations of a run use it. Model judges import torch/transformers only when built here."""
    if hasattr(spec, "labels") and hasattr(spec, "info"):
        return spec
    canonical = getattr(spec, "canonical", None)
    if isinstance(canonical, str):
        return _build_cached(canonical, device)
    return _build(parse_judge_spec(spec), device)


@functools.lru_cache(maxsize=8)
def _build_cached(canonical: str, device: str | None):
    return _build(parse_judge_spec(json.loads(canonical)), device)


def _build(spec: dict, device: str | None):
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "rules":
        try:
            return RefusalJudge(**spec)
        except TypeError as e:
            raise ValueError(f"judge.rules: {e}") from None
    if kind == "learned":
        return LearnedJudge.load(spec.get("path"))
    if device is not None and "device" not in spec:
        spec["device"] = device
    if kind == "classifier":
        return models.ClassifierJudge.from_spec(spec)
    return models.GenerativeJudge.from_spec(spec)
