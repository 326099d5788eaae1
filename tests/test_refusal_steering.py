"""refusal_steering (issue 27): a refusal direction added where privacy_probe's guard fires; no weight changes."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ngguard.adapters import adapter_for
from ngguard.evaluate import evaluate, rescore_with_guard
from ngguard.methods import REGISTRY
from ngguard.methods.refusal_steering import direction_prompts, refusal_direction
from ngguard.pipeline import run_recipe
from ngguard.recipe import PrivacyProbeHParams, RecipeError, RefusalSteeringHParams, recipe_from_dict
from test_privacy_probe import FAMILIES, REFUSAL, _world

PROBE = PrivacyProbeHParams(subject_layer=1, locator_layer=1, request_layer=2, image_layer=3,
                            train_sets=("overrefusal_train", "awareness_train"), neutral_sets=("utility_train",))


def _recipe(**steer):
    return SimpleNamespace(privacy_probe=PROBE, refusal_steering=RefusalSteeringHParams(**steer))


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_steering_through_the_registry_changes_no_weights_and_only_gated_answers(family, tmp_path):
    model, processor = FAMILIES[family]()
    adapter = adapter_for(model, processor)
    sets = _world(tmp_path)
    every = [q for v in sets.values() for q in v]
    entry = REGISTRY["refusal_steering"]
    assert not entry.edits_weights and entry.guard_needs_model and entry.steers
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    base = evaluate(adapter, every, batch_size=8, max_new_tokens=6)
    recipe = _recipe(layer=1, alpha=8.0)
    guard, info = entry.guard(sets["train"], REFUSAL, adapter=adapter, sets=sets, recipe=recipe)
    assert info["steering_layer"] == 1 and info["state_norm"] > 0 and info["private_subjects"] == ["passport", "receipt"]
    out = rescore_with_guard(base, guard, adapter=adapter, batch_size=8, max_new_tokens=6)
    after = adapter.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "steering must not change any weight"
    flags = guard.blocks_queries(every)
    assert any(flags) and not all(flags)
    got, was = [r["response"] for r in out["responses"]], [r["response"] for r in base["responses"]]
    assert all(g == w for g, w, f in zip(got, was, flags) if not f), "an ungated answer changed"
    assert any(g != w for g, w, f in zip(got, was, flags) if f), "steering at alpha 8 changed no gated answer"
    # the hook is gone afterwards, and the same settings give the same answers
    assert [r["response"] for r in evaluate(adapter, every, batch_size=8, max_new_tokens=6)["responses"]] == was
    again, _ = entry.guard(sets["train"], REFUSAL, adapter=adapter, sets=sets, recipe=recipe)
    assert torch.equal(again.vector, guard.vector)
    assert [r["response"] for r in rescore_with_guard(base, again, adapter=adapter, batch_size=8,
                                                      max_new_tokens=6)["responses"]] == got
    # alpha 0 adds nothing: the gated answers are generated again but stay the base model's
    zero, _ = entry.guard(sets["train"], REFUSAL, adapter=adapter, sets=sets, recipe=_recipe(layer=1, alpha=0.0))
    assert [r["response"] for r in rescore_with_guard(base, zero, adapter=adapter, batch_size=8,
                                                      max_new_tokens=6)["responses"]] == was


def test_direction_is_the_difference_of_means_of_training_prompts(tmp_path):
    model, processor = FAMILIES["llava"]()
    adapter = adapter_for(model, processor)
    sets = _world(tmp_path)
    refuse, benign = direction_prompts(sets, "harmful")
    assert all(q.answer is None and q.prompt not in {b.prompt for b in benign} for q in refuse)
    assert {q.image for q in refuse} <= {q.image for q in sets["train"]}  # training images only
    pairs_refuse, _ = direction_prompts(sets, "pairs")
    assert pairs_refuse == [q for q in sets["train"] if q.sensitive]
    d = refusal_direction(adapter, sets, "pairs", [0, 2])
    assert set(d) == {0, 2} and all(abs(u.norm().item() - 1) < 1e-5 for u, _ in d.values())
    assert not torch.allclose(d[0][0], d[2][0])
    with pytest.raises(ValueError, match="no training prompts"):
        direction_prompts({"train": [q for q in sets["train"] if q.sensitive]}, "harmful")


def test_bad_settings_are_refused_in_one_line(tmp_path):
    model, processor = FAMILIES["llava"]()
    adapter = adapter_for(model, processor)
    sets = _world(tmp_path)
    with pytest.raises(ValueError, match="refusal_steering.layer: 9 out of range"):
        REGISTRY["refusal_steering"].guard(sets["train"], REFUSAL, adapter=adapter, sets=sets, recipe=_recipe(layer=9))
    base = {"model": {"path": str(tmp_path)}, "method": "neural_gate", "data": {"queries": "q.jsonl"}}
    for bad, key in (({"direction": "sideways"}, "refusal_steering.direction"), ({"alpha": -1}, "refusal_steering.alpha"),
                     ({"layer": -2}, "refusal_steering.layer")):
        with pytest.raises(RecipeError, match=key) as e:
            recipe_from_dict({**base, "refusal_steering": bad}, check_files=False)
        assert "\n" not in str(e.value)
    steer_main = recipe_from_dict({**base, "method": "refusal_steering"}, check_files=False)
    with pytest.raises(RecipeError, match="steers generation and has no patch"):
        run_recipe(steer_main, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_steering_guard_needs_the_model_to_rescore():
    class Steer:
        refusal = REFUSAL

        def blocks_queries(self, queries):
            return [True for _ in queries]

        def steering(self):
            raise AssertionError("not reached")

    from ngguard.data import Query
    from ngguard.evaluate import score
    res = score([Query("a.png", "passport", "What is the number?", True, "1")], ["1"])
    with pytest.raises(ValueError, match="pass adapter="):
        rescore_with_guard(res, Steer())


def test_pipeline_runs_it_beside_another_method(tmp_path):
    """``report.compare_methods: [refusal_steering]`` in ``ngguard edit``: its figures sit beside the main
    method's, the questions its gate passes keep the base answers, no weight of the saved model changes."""
    from tiny_models import tiny_llava
    model, processor = tiny_llava(0, "text_first")
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    raw = {"name": "tiny", "seed": 0, "model": {"path": str(tmp_path / "base")}, "method": "keyword_filter",
           "data": {"world": {"subjects": ["Passport", "bus", "Credit Card", "shapes"], "n": 3, "seed": 0},
                    "heldout_subjects": ["Credit Card"], "multip2a": "off"},
           "privacy_probe": {"subject_layer": 1, "locator_layer": 1, "request_layer": 2, "image_layer": 1},
           "refusal_steering": {"layer": 1, "alpha": 4.0},
           "evaluation": {"max_new_tokens": 4, "batch_size": 16, "sets": ["train", "test", "heldout_subjects"]},
           "report": {"plots": False, "compare_methods": ["refusal_steering"]}}
    out = run_recipe(recipe_from_dict(raw), tmp_path / "run")
    import json
    r = json.loads((out / "report.json").read_text())
    steer = r["methods"]["refusal_steering"]
    assert steer["steering_layer"] == 1 and steer["layers"] == []
    refusal = r["recipe"]["edit"]["refusal"]
    changed = 0
    for split in ("train", "test", "heldout_subjects"):
        base, after = r["before"][split]["responses"], steer["after"][split]["responses"]
        assert [(x["image"], x["prompt"]) for x in after] == [(x["image"], x["prompt"]) for x in base]
        # an answer that differs from the base one was generated again under the hook: never the refusal text
        # pasted in (privacy_probe's way)
        diff = [a["response"] for a, b in zip(after, base) if a["response"] != b["response"]]
        assert refusal not in diff
        changed += len(diff)
    assert changed > 0, "steering at alpha 4 changed no answer"
