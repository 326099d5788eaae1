"""The parts recipe.py stands on, used on their own: the checked-dataclass toolkit (``ngguard.schema``),
the hardened YAML loader (``ngguard.safe_yaml``) and the one table of methods
(``methods.registry.REGISTRY``, which ``recipe.METHODS`` and the recipe's sections derive from)."""
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


def test_methods_are_declared_once_in_the_registry_and_the_recipe_derives_from_it():
    """One entry per method (``methods.registry.REGISTRY``): the recipe's names, edit methods and sections
    come from it; a section is a Recipe field holding its settings class's defaults."""
    from ngguard.methods import REGISTRY
    from ngguard.methods.registry import SECTIONS, Method, _sections
    from ngguard.recipe import EDIT_METHODS, METHOD_SECTIONS, METHODS, Recipe

    assert METHODS == tuple(REGISTRY) and METHOD_SECTIONS is REGISTRY and set(EDIT_METHODS) < set(METHODS)
    assert list(EDIT_METHODS) == [n for n, m in REGISTRY.items() if m.apply is not None]
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe)}
    for name, m in REGISTRY.items():  # each section a Recipe field of the method's class, with its defaults
        assert (m.section, m.hparams) == (None, None) or defaults[m.section] == m.hparams()
    assert list(SECTIONS) == ["edit", "memit", "alphaedit", "privacy_probe", "refusal_steering"]
    names = [f.name for f in dataclasses.fields(Recipe)]  # in registry order, after localization
    assert names[names.index("localization") + 1:][:len(SECTIONS)] == list(SECTIONS)
    with pytest.raises(TypeError, match="'edit' already holds EditSpec"):  # one section, one class
        _sections({**REGISTRY, "x": Method("x", SECTIONS["memit"], "edit", apply="memit:apply_memit")})
    with pytest.raises(TypeError, match="'x': give apply"):  # an edit or a guard, not both, not neither
        Method("x", None, None)
    with pytest.raises(TypeError, match="'x': give both"):
        Method("x", SECTIONS["memit"], None, apply="memit:apply_memit")
    with pytest.raises(TypeError, match="expected 'module:function'"):
        Method("x", None, None, apply="apply_memit")


def test_importing_the_recipe_loads_no_method_implementation():
    """The registry names its functions; they are imported on the first call (recipes stay light)."""
    import subprocess
    import sys

    code = ("import sys, ngguard.recipe, ngguard.methods as m; "
            "print(sorted(k for k in sys.modules if k.startswith('ngguard.methods.')), 'torch' in sys.modules); "
            "f = m.REGISTRY['keyword_filter'].guard; print(f.__name__, 'ngguard.methods.keyword_filter' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["['ngguard.methods.registry'] False", "keyword_guard True"]
