"""The parts recipe.py stands on, used on their own: the checked-dataclass toolkit (``ngguard.schema``),
the hardened YAML loader (``ngguard.safe_yaml``) and the one table of methods
(``recipe.METHOD_SECTIONS``, which ``methods.REGISTRY`` must match)."""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass

import pytest

from ngguard import schema
from ngguard.safe_yaml import parse_yaml


@dataclass(frozen=True)
class _Inner:
    rate: float = schema.checked(0.5, schema.number(gt=0, le=1))


@dataclass(frozen=True)
class _Outer:
    name: str = schema.checked(MISSING, schema.text())
    kind: str = schema.checked("a", schema.choice(("a", "b")))
    inner: _Inner = schema.checked(_Inner(), schema.nested(_Inner))


class _MyError(ValueError):
    pass


def _build(raw):
    return schema.build(_Outer, raw, schema.Ctx("cfg.yaml", None, False, error=_MyError), "")


def test_build_checks_types_ranges_and_names_the_key():
    assert _build({"name": "x", "inner": {"rate": 1}}) == _Outer("x", "a", _Inner(1.0))
    cases = [({"name": "x", "inner": {"rate": 2}}, "cfg.yaml: inner.rate: must be > 0 and <= 1, got 2.0"),
             ({"name": "x", "knd": "a"}, "cfg.yaml: knd: unknown key (did you mean 'kind'?)"),
             ({"name": "x", "kind": "c"}, "cfg.yaml: kind: unknown value 'c'; choose from a, b"),
             ({"kind": "a"}, "cfg.yaml: name: required field missing"),
             ({"name": 3}, "cfg.yaml: name: expected str, got int 3")]
    for raw, msg in cases:
        with pytest.raises(_MyError) as e:  # the context's error class, one line
            _build(raw)
        assert str(e.value) == msg


def test_parse_yaml_is_hardened():
    assert parse_yaml("lr: 1e-5\n", "f.yaml") == {"lr": 1e-5}  # a float, not the string YAML 1.1 reads
    with pytest.raises(ValueError, match=r"^f.yaml: a: duplicate key \(line 2\)$"):
        parse_yaml("a: 1\na: 2\n", "f.yaml")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    with pytest.raises(_MyError, match="YAML too large"):
        parse_yaml(bomb, "f.yaml", error=_MyError)
    with pytest.raises(ValueError, match=r"^f.yaml: invalid YAML at line 2, column 1: "):
        parse_yaml("a: [1, 2\n", "f.yaml")


def test_methods_are_declared_once_and_the_registry_must_match():
    from ngguard.methods import REGISTRY, check_registry
    from ngguard.recipe import EDIT_METHODS, METHOD_SECTIONS, METHODS, Recipe

    assert METHODS == tuple(METHOD_SECTIONS) and set(EDIT_METHODS) < set(METHODS)
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe)}
    for name, m in METHOD_SECTIONS.items():  # each section a Recipe field of the method's class
        assert REGISTRY[name].hparams is m.hparams
        assert (m.section, m.hparams) == (None, None) or isinstance(defaults[m.section], m.hparams)
    check_registry(REGISTRY, METHOD_SECTIONS)
    extra = {**REGISTRY, "new_method": REGISTRY["memit"]}
    with pytest.raises(TypeError, match="'new_method'"):
        check_registry(extra, METHOD_SECTIONS)
    with pytest.raises(TypeError, match="'memit'"):
        check_registry({k: v for k, v in REGISTRY.items() if k != "memit"}, METHOD_SECTIONS)
    flipped = {**METHOD_SECTIONS, "keyword_filter": dataclasses.replace(METHOD_SECTIONS["keyword_filter"],
                                                                       edits_weights=True)}
    with pytest.raises(TypeError, match="'keyword_filter'"):
        check_registry(REGISTRY, flipped)
