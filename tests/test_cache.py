"""Exact reuse across runs (``ngguard.stage_cache``): the evaluation before the edit and the
localization are reused only when every input they read is the same, and recomputed otherwise."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from ngguard import pipeline
from ngguard.data import Query
from ngguard.recipe import recipe_from_dict
from ngguard.stage_cache import StageCache, model_fingerprint, queries_fingerprint
from test_pipeline import _raw, base  # noqa: F401  (the tiny model on disk, its recipe)
from tiny_models import tiny_llava


def _recipe(base, **over):
    raw = _raw(base, report={"plots": False})
    for key, value in over.items():  # "a.b": value
        *path, last = key.split(".")
        d = raw
        for p in path:
            d = d.setdefault(p, {})
        d[last] = value
    return recipe_from_dict(raw)


def _run(recipe, folder: Path, cache) -> dict:
    out = pipeline.run_recipe(recipe, folder, cache=cache)
    r = json.loads((out / "report.json").read_text())
    r["_patch"] = hashlib.sha256((out / "patch" / "patch.safetensors").read_bytes()).hexdigest()
    return r


def _before(r: dict) -> dict:
    return {name: {k: v for k, v in res.items() if k not in ("responses", "judge")} for name, res in r["before"].items()}


def test_a_second_run_reuses_before_and_localization_with_the_same_results(base, tmp_path):
    cache = StageCache(tmp_path / "cache")
    first = _run(_recipe(base), tmp_path / "a", cache)
    assert first["cache"]["reused"] == [] and any((tmp_path / "cache").rglob("value.json"))
    again = _run(_recipe(base), tmp_path / "b", StageCache(tmp_path / "cache"))
    assert sorted(again["cache"]["reused"]) == ["before", "localization"]
    plain = _run(_recipe(base), tmp_path / "c", False)
    assert plain["cache"] == {"enabled": False, "root": None, "reused": []}
    for r in (again, plain):  # the same numbers as computing everything
        assert _before(r) == _before(first)
        assert r["localization"] == first["localization"]
        assert r["_patch"] == first["_patch"]
    # the reused answers are judged again: the responses point at this run's images (its world, written
    # relative to the run folder b), not the first run's (an absolute path into a's temp folder)
    assert all(not os.path.isabs(row["image"]) and (tmp_path / "b" / row["image"]).is_file()
               for row in again["before"]["test"]["responses"])


@pytest.mark.parametrize("change, recomputed", [
    ({"localization.steps": 3}, {"localization"}),                       # localization's own section
    ({"edit.alpha": 2.0}, {"localization"}),                            # Eq. 3 reads the edit's alpha
    ({"evaluation.max_new_tokens": 5}, {"before"}),                     # the same samples: localization reused
    ({"edit.max_answer_words": 1}, {"before", "localization"}),         # shorter original answers: other samples
    ({"data.world.seed": 1}, {"before", "localization"}),               # another world
    ({"edit.lr": 2e-2}, set()),                                          # the edit only: both reused
])
def test_a_changed_input_recomputes_only_what_reads_it(base, tmp_path, change, recomputed):
    root = tmp_path / "cache"
    _run(_recipe(base), tmp_path / "a", StageCache(root))
    r = _run(_recipe(base, **change), tmp_path / "b", StageCache(root))
    assert set(r["cache"]["reused"]) == {"before", "localization"} - recomputed


def test_other_weights_recompute_everything(base, tmp_path):
    other = tmp_path / "other"
    model, processor = tiny_llava(0, "text_first")  # the base's model, one weight changed
    with torch.no_grad():
        model.model.language_model.layers[3].mlp.up_proj.weight[0, 0] += 1.0  # a layer above the localized one
    model.save_pretrained(other)
    processor.save_pretrained(other)
    root = tmp_path / "cache"
    _run(_recipe(base), tmp_path / "a", StageCache(root))
    r = _run(_recipe(other), tmp_path / "b", StageCache(root))
    assert r["cache"]["reused"] == []


def test_fingerprints_see_image_bytes_and_single_weights(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(img)
    qs = [Query(str(img), "Passport", "what is the number?", True)]
    fp = queries_fingerprint(qs)
    moved = tmp_path / "sub"
    moved.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(moved / "a.png")
    assert queries_fingerprint([Query(str(moved / "a.png"), "Passport", "what is the number?", True)]) == fp  # path: no
    Image.new("RGB", (8, 8), (1, 2, 4)).save(img)
    assert queries_fingerprint(qs) != fp                                                            # bytes: yes
    model, _ = tiny_llava(0)
    fp = model_fingerprint(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(model) != fp
