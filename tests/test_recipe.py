"""Recipes: loading, defaults, one-line errors naming file + dotted key, hashing, layer checks."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from ngguard.recipe import (
    DEFAULT_CONTEXTS,
    DEFAULT_REFUSAL,
    LayerSearch,
    Recipe,
    RecipeError,
    check_layers,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
    recipe_hash,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))

MINIMAL = "model: {path: organism}\nmethod: neural_gate\ndata: {world: {n: 4}}\n"


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(tmp_path: Path, text: str, **kw) -> str:
    p = write(tmp_path, text)
    with pytest.raises(RecipeError) as ei:
        load_recipe(p, **kw)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{p}: "), msg
    return msg[len(f"{p}: "):]


# ---- shipped recipes ---------------------------------------------------------------------------


def test_shipped_recipes_exist():
    names = {p.name for p in SHIPPED}
    assert {"llava-1.5-7b.yaml", "llava-1.5-7b-layers9-14.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipe_loads(path: Path):
    r = load_recipe(path, check_files=False)
    assert isinstance(r, Recipe) and r.name
    raw = yaml.safe_load(path.read_text())
    # portable: no absolute paths, no device ids
    for section, key in (("model", "path"), ("data", "queries"), ("data", "multip2a"), ("memit", "corpus"),
                         ("alphaedit", "corpus"), ("memit", "cache_dir"), ("alphaedit", "cache_dir")):
        value = (raw.get(section) or {}).get(key)
        if isinstance(value, str):
            assert not os.path.isabs(value) and not value.startswith("~"), f"{path.name}: {section}.{key}"
    assert (raw.get("model") or {}).get("device", "auto") in ("auto", "cpu", "cuda")
    # a shipped recipe may ask for device_map: auto, never for a map or memory per device id
    assert isinstance((raw.get("model") or {}).get("device_map", "auto"), str), path.name
    assert "max_memory" not in (raw.get("model") or {}), path.name
    # with file checks on, the only acceptable failure is a missing model folder / data file
    try:
        load_recipe(path)
    except RecipeError as e:
        assert "not found" in str(e) and any(k in str(e) for k in ("model.path", "data.queries", "data.multip2a"))
    # to_dict round-trips
    assert recipe_from_dict(r.to_dict(), check_files=False) == r


def test_llava_recipes_have_paper_settings():
    a = load_recipe(REPO / "recipes/llava-1.5-7b.yaml", check_files=False)
    b = load_recipe(REPO / "recipes/llava-1.5-7b-layers9-14.yaml", check_files=False)
    assert a.layers == (11,)
    assert b.layers == (9, 10, 11, 12, 13, 14)
    for r in (a, b):
        assert r.method == "neural_gate" and r.module == "down_proj"
        assert r.model.dtype == "bfloat16"
        assert (r.edit.lr, r.edit.eps, r.edit.steps, r.edit.alpha) == (1e-5, 1e-3, 10, 1.25)
        assert r.localization == Recipe.__dataclass_fields__["localization"].default
        assert r.data.queries is not None and r.data.queries.endswith(".jsonl")
    # relative paths resolve against the recipe's folder
    assert Path(a.model.path) == (REPO / "models/llava-1.5-7b-hf").resolve()


# ---- defaults and paths ------------------------------------------------------------------------


def test_minimal_recipe_gets_paper_defaults(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL, "my-run.yaml"))
    assert r.name == "my-run" and r.seed == 0
    assert r.model.is_organism and r.model.dtype == "float32" and r.model.device == "auto"
    assert r.layers == LayerSearch(scan=(3, 19), window=3)
    assert r.localization.contexts == DEFAULT_CONTEXTS and len(DEFAULT_CONTEXTS) == 5
    assert (r.localization.steps, r.localization.lr, r.localization.init) == (25, 0.5, 2.0)
    assert (r.localization.threshold, r.localization.top_k, r.localization.l1) == (0.3, None, 1e-3)
    assert (r.edit.alpha, r.edit.lr, r.edit.refusal) == (1.25, 1e-5, DEFAULT_REFUSAL)
    assert r.data.world.n == 4 and r.data.world.subjects is None and r.data.split == "paper"
    assert r.evaluation.sets[0] == "train" and r.report.plots is True and r.report.compare_methods == ()
    assert r.source == str(tmp_path / "my-run.yaml")


def test_relative_paths_resolve_against_recipe_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data/q.jsonl").write_text("")
    (tmp_path / "ckpt").mkdir()
    p = write(tmp_path / "sub", "model: {path: ../ckpt}\nmethod: dinm\ndata: {queries: ../data/q.jsonl}\n")
    monkeypatch.chdir(tmp_path / "sub")  # the cwd must not matter
    monkeypatch.chdir("/")
    r = load_recipe(p)
    assert r.model.path == str(tmp_path / "ckpt")
    assert r.data.queries == str(tmp_path / "data/q.jsonl")
    # absolute paths are allowed too
    p2 = write(tmp_path, f"model: {{path: {tmp_path / 'ckpt'}}}\nmethod: dinm\n"
                         f"data: {{queries: {tmp_path / 'data/q.jsonl'}}}\n", "abs.yaml")
    assert load_recipe(p2).data.queries == r.data.queries


def test_scientific_notation_without_dot_is_a_float(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL + "edit: {lr: 1e-5, eps: 2E-3, stop_loss: 0}\n"))
    assert r.edit.lr == 1e-5 and r.edit.eps == 2e-3 and r.edit.stop_loss == 0.0
    assert isinstance(r.edit.stop_loss, float)  # ints are accepted for floats


def test_layer_forms(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL + "layers: [14, 9, 11]\n"))
    assert r.layers == (9, 11, 14) and not r.searches_layers
    r = load_recipe(write(tmp_path, MINIMAL + "layers: {search: {scan: [1, 4], window: 1}}\n"))
    assert r.layers == LayerSearch(scan=(1, 4), window=1) and r.searches_layers
    assert recipe_from_dict(r.to_dict(), source=r.source) == r


def test_overrides(tmp_path):
    p = write(tmp_path, MINIMAL)
    r = load_recipe(p, overrides=["edit.lr=2e-5", "layers=[2]", "report.alpha_sweep=[1.0, 1.25]"])
    assert r.edit.lr == 2e-5 and r.layers == (2,) and r.report.alpha_sweep == (1.0, 1.25)
    with pytest.raises(RecipeError, match=r"edit\.lrr: unknown key \(did you mean 'lr'\?\)"):
        load_recipe(p, overrides=["edit.lrr=1"])
    with pytest.raises(RecipeError, match="expected dotted.key=value"):
        load_recipe(p, overrides=["edit.lr"])


# ---- one-line errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("edit: {lrr: 1.0e-4}\n", "edit.lrr: unknown key (did you mean 'lr'?)"),
        ("localisation: {steps: 3}\n", "localisation: unknown key (did you mean 'localization'?)"),
        ("edit: {lr: fast}\n", "edit.lr: expected float, got str 'fast'"),
        ("edit: {steps: 2.5}\n", "edit.steps: expected int, got float 2.5"),
        ("edit: {steps: true}\n", "edit.steps: expected int, got bool True"),
        ("report: {plots: 'yes'}\n", "report.plots: expected bool (true/false), got str 'yes'"),
        ("edit: {lr: 0}\n", "edit.lr: must be > 0, got 0.0"),
        ("localization: {lr: -0.5}\n", "localization.lr: must be > 0, got -0.5"),
        ("edit: {steps: 0}\n", "edit.steps: must be >= 1, got 0"),
        ("localization: {steps: 0}\n", "localization.steps: must be >= 1, got 0"),
        ("localization: {threshold: 1.0}\n", "localization.threshold: must be > 0 and < 1, got 1.0"),
        ("localization: {threshold: 0}\n", "localization.threshold: must be > 0 and < 1, got 0.0"),
        ("edit: {alpha: -1}\n", "edit.alpha: must be >= 0, got -1.0"),
        ("localization: {top_k: 0}\n", "localization.top_k: must be > 0 and <= 100, got 0.0"),
        ("localization: {top_k: 101}\n", "localization.top_k: must be > 0 and <= 100, got 101.0"),
        ("report: {alpha_sweep: [1.0, -2]}\n", "report.alpha_sweep[1]: must be >= 0, got -2.0"),
        ("evaluation: {sets: [test, tset]}\n", "evaluation.sets[1]: unknown value 'tset' (did you mean 'test'?)"),
        ("module: q_proj\n", "module: unknown value 'q_proj'"),
        ("report: {compare_methods: [nogate]}\n", "report.compare_methods[0]: unknown value 'nogate' (did you mean 'no_gate'?)"),
        ("model: {path: organism, device: 'cuda:0'}\n", "model.device: unknown value 'cuda:0'"),
        ("model: {path: organism, dtype: fp16}\n", "model.dtype: unknown value 'fp16'"),
        ("layers: 11\n", "layers: expected a list of layer indices like [11] or {search: "),
        ("layers: [3, x]\n", "layers[1]: expected int, got str 'x'"),
        ("layers: [3, 3]\n", "layers: duplicate entry 3"),
        ("layers: []\n", "layers: must not be an empty list"),
        ("layers: {scan: [1, 4]}\n", "layers.scan: unknown key"),
        ("layers: {search: {scan: [4, 1]}}\n", "layers.search.scan: lo must be <= hi, got [4, 1]"),
        ("layers: {search: {scan: 4}}\n", "layers.search.scan: expected [lo, hi] (two layer indices), got int 4"),
        ("layers: {search: {scan: [1, 4], windw: 2}}\n", "layers.search.windw: unknown key (did you mean 'window'?)"),
        ("edit: 3\n", "edit: expected a mapping (key: value), got int 3"),
        ("data: {world: {n: 4}, queries: q.jsonl}\n", None),  # duplicate 'data' key (see below)
    ],
)
def test_one_line_errors(tmp_path, extra, expected):
    if expected is None:
        msg = error_of(tmp_path, MINIMAL + extra)
        assert msg == "data: duplicate key (line 4)"
        return
    base = MINIMAL.replace("model: {path: organism}\n", "") if extra.startswith("model:") else MINIMAL
    msg = error_of(tmp_path, base + extra)
    assert msg.startswith(expected), msg


def test_unknown_method_and_missing_required(tmp_path):
    msg = error_of(tmp_path, "model: {path: organism}\nmethod: neural_gat\ndata: {world: {}}\n")
    assert msg.startswith("method: unknown value 'neural_gat' (did you mean 'neural_gate'?); choose from "
                          "neural_gate, no_gate, dinm"), msg
    assert error_of(tmp_path, "model: {path: organism}\ndata: {world: {}}\n") == "method: required field missing"
    assert error_of(tmp_path, "method: dinm\ndata: {world: {}}\n") == "model.path: required field missing"
    assert error_of(tmp_path, "model: {dtype: float32}\nmethod: dinm\ndata: {world: {}}\n") == \
        "model.path: required field missing"
    assert error_of(tmp_path, "model: {path: organism}\nmethod: dinm\n").startswith(
        "data: give exactly one of data.queries (a .jsonl) and data.world, got neither")


def test_missing_files(tmp_path):
    msg = error_of(tmp_path, "model: {path: organism}\nmethod: dinm\ndata: {queries: nope/q.jsonl}\n")
    assert msg == f"data.queries: file not found: {tmp_path / 'nope/q.jsonl'}"
    msg = error_of(tmp_path, "model: {path: ckpt}\nmethod: dinm\ndata: {world: {}}\n")
    assert msg.startswith(f"model.path: folder not found: {tmp_path / 'ckpt'}")
    msg = error_of(tmp_path, MINIMAL.replace("{n: 4}", "{n: 4}, multip2a: m.json"))
    assert msg.startswith("data.multip2a: expected auto, off or an existing path, not found")
    # check_files=False skips existence checks (still resolves)
    r = load_recipe(write(tmp_path, "model: {path: ckpt}\nmethod: dinm\ndata: {queries: q.jsonl}\n"),
                    check_files=False)
    assert r.data.queries == str(tmp_path / "q.jsonl")


def test_data_cross_checks(tmp_path):
    msg = error_of(tmp_path, "model: {path: organism}\nmethod: dinm\n"
                             "data: {world: {}, subjects: [Passport, Receipt], heldout_subjects: [Receipt]}\n")
    assert msg.startswith("data.heldout_subjects: 'Receipt' is also in data.subjects"), msg


def test_file_level_errors(tmp_path):
    assert error_of(tmp_path, "") .startswith("empty recipe")
    assert error_of(tmp_path, "- a\n- b\n").startswith("expected a mapping of sections at the top level")
    assert error_of(tmp_path, "model: {path: organism\n").startswith("invalid YAML at line")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


# ---- hash, dump, layers --------------------------------------------------------------------------


def test_hash_stable_under_key_order_and_sensitive_to_values(tmp_path):
    a = write(tmp_path, "name: x\nmethod: neural_gate\nmodel: {path: organism, dtype: float32}\n"
                        "data: {world: {n: 4}}\nedit: {lr: 1.0e-5, alpha: 1.25}\n", "a.yaml")
    b = write(tmp_path, "edit: {alpha: 1.25, lr: 0.00001}\ndata: {world: {n: 4}}\n"
                        "model: {dtype: float32, path: organism}\nmethod: neural_gate\nname: x\n", "b.yaml")
    ha, hb = recipe_hash(load_recipe(a)), recipe_hash(load_recipe(b))
    assert ha == hb and len(ha) == 16 and int(ha, 16) >= 0
    c = write(tmp_path, b.read_text().replace("alpha: 1.25", "alpha: 1.0"), "c.yaml")
    assert recipe_hash(load_recipe(c)) != ha
    # defaults written out explicitly hash the same as omitted ones
    d = write(tmp_path, a.read_text() + "seed: 0\nmodule: down_proj\n", "d.yaml")
    assert recipe_hash(load_recipe(d)) == ha


def test_dump_roundtrip_atomic(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL + "layers: {search: {scan: [1, 2], window: 0}}\n"))
    out = dump_recipe(r, tmp_path / "run" / "recipe.yaml")
    assert [p.name for p in out.parent.iterdir()] == ["recipe.yaml"]  # no temp file left
    r2 = load_recipe(out)
    assert dataclasses.replace(r2, name=r.name) == r
    assert recipe_hash(dataclasses.replace(r2, name=r.name)) == recipe_hash(r)


def test_recipes_are_frozen(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.edit.lr = 1.0  # type: ignore[misc]


def test_check_layers(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL + "layers: [3, 40]\n"))
    check_layers(r, 41)
    with pytest.raises(RecipeError) as ei:
        check_layers(r, 32)
    assert str(ei.value) == f"{r.source}: layers: layer 40 out of range for a model with 32 layers"
    s = load_recipe(write(tmp_path, MINIMAL))  # default search scan [3, 19]
    check_layers(s, 32)
    with pytest.raises(RecipeError, match=r"layers\.search\.scan: \[3, 19\] out of range for a model with 4 layers"):
        check_layers(s, 4)


def test_the_report_says_which_defaults_are_the_papers():
    """A changed edit setting the paper has is reported against the paper's default; one ngguard added
    (retention, passes, neural_gate_plus's gate) against ngguard's, not called the paper's."""
    from ngguard.methods.registry import EditSpec
    from ngguard.pipeline import recipe_deviations

    r = recipe_from_dict({**yaml.safe_load(MINIMAL), "edit": {"lr": 1e-3, "passes": 3, "retain": ["utility"],
                                                            "gate_top_k": 25}})
    dev = recipe_deviations(r)
    assert "edit.lr = 0.001 (paper default 1e-05)" in dev
    assert "edit.passes = 3 (not in the paper; ngguard default 1)" in dev
    assert "edit.gate_top_k = 25.0 (not in the paper; ngguard default 10.0)" in dev
    assert not any("paper default" in d for d in dev if d.split(" = ")[0].split(".")[1] in EditSpec.NOT_IN_PAPER)
    assert set(EditSpec.NOT_IN_PAPER) <= {f.name for f in dataclasses.fields(EditSpec)}
