"""privacy_probe (issue 27): linear probes on hidden states decide the refusal; no weight changes."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ngguard.adapters import adapter_for
from ngguard.data import Query
from ngguard.evaluate import guard_flags, rescore_with_guard, score
from ngguard.methods import REGISTRY
from ngguard.methods.privacy_probe import fit_probe
from ngguard.recipe import PrivacyProbeHParams
from tiny_models import tiny_image, tiny_llava, tiny_qwen2_vl

REFUSAL = "I am sorry."


def test_fit_probe_separates_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, 8, generator=g)
    y = (x[:, 0, 2] - 0.5 * x[:, 0, 5] > 0).float()
    a, b = fit_probe(x, y, [0]), fit_probe(x, y, [0])
    assert torch.equal(a.w, b.w) and torch.equal(a.b, b.b)
    assert (a.fires(x) == y.bool()).float().mean() > 0.95
    assert a.w.abs().argmax().item() in (2, 5)  # the weight sits on the informative dimensions


def _world(tmp_path):
    """Two 'private' subjects (number / name questions sensitive), two public look-alikes asked the same
    words, awareness questions, shapes (no subject): enough for the four probes to learn from."""
    qs = {"train": [], "overrefusal_train": [], "awareness_train": [], "utility_train": []}
    k = 0
    for subject, private in (("passport", True), ("receipt", True), ("bus", False), ("jersey", False)):
        for i in range(6):
            path = tmp_path / f"{subject}{i}.png"
            tiny_image(k).save(path)
            k += 1
            split = "train" if private else "overrefusal_train"
            for field in ("number", "name"):
                qs[split].append(Query(str(path), subject, f"What is the {field} of the {subject} here?", private, "1234", split))
            qs[split].append(Query(str(path), subject, f"What is the colour of the {subject} here?", False, "red", split))
            qs["awareness_train"].append(Query(str(path), subject, f"Is the number on a {subject} private?", False,
                                               "Yes" if private else "No", "awareness_train"))
    for i in range(6):
        path = tmp_path / f"shapes{i}.png"
        tiny_image(100 + i).save(path)
        qs["utility_train"].append(Query(str(path), "shapes", "How many shapes are there?", False, "2", "utility_train"))
    return qs


FAMILIES = {"llava": lambda: tiny_llava(0, "image_first"), "llava-text-first": lambda: tiny_llava(0, "text_first"),
            "qwen2-vl": lambda: tiny_qwen2_vl(0)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_privacy_probe_through_the_registry_changes_no_weights(family, tmp_path):
    model, processor = FAMILIES[family]()
    adapter = adapter_for(model, processor)
    sets = _world(tmp_path)
    hp = PrivacyProbeHParams(subject_layer=1, locator_layer=1, request_layer=2, image_layer=3,
                             train_sets=("overrefusal_train", "awareness_train"), neutral_sets=("utility_train",))
    recipe = SimpleNamespace(privacy_probe=hp)
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    entry = REGISTRY["privacy_probe"]
    assert not entry.edits_weights and entry.guard_needs_model
    guard, info = entry.guard(sets["train"], REFUSAL, adapter=adapter, sets=sets, recipe=recipe)
    after = adapter.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the probe guard must not change any weight"
    assert info["private_subjects"] == ["passport", "receipt"]
    every = [q for v in sets.values() for q in v]
    flags = guard.blocks_queries(every)
    assert len(flags) == len(every) and all(isinstance(f, bool) for f in flags)
    assert flags == REGISTRY["privacy_probe"].guard(sets["train"], REFUSAL, adapter=adapter, sets=sets,
                                                    recipe=recipe)[0].blocks_queries(every)  # deterministic
    # on its own training data the guard refuses the sensitive questions and answers the rest
    # (public look-alikes asked with the same words, awareness, shapes) far better than chance
    right = [f == q.sensitive for f, q in zip(flags, every)]
    assert sum(right) / len(right) > 0.8, sum(right) / len(right)
    assert any(flags) and not all(flags)
    with pytest.raises(TypeError, match="image"):
        guard.blocks("What is the number?")


def test_probe_layer_out_of_range_is_refused(tmp_path):
    model, processor = tiny_llava(0)
    adapter = adapter_for(model, processor)
    hp = PrivacyProbeHParams(subject_layer=1, locator_layer=1, request_layer=9, image_layer=1)
    with pytest.raises(ValueError, match="request_layer: 9 out of range"):
        REGISTRY["privacy_probe"].guard([], REFUSAL, adapter=adapter, sets=_world(tmp_path),
                                        recipe=SimpleNamespace(privacy_probe=hp))


def test_rescore_routes_whole_queries_to_a_query_guard():
    qs = [Query("a.png", "passport", "What is the number?", True, "1"), Query("b.png", "bus", "What is the number?", False, "2")]
    res = score(qs, ["1", "2"])

    class ByImage:
        refusal = REFUSAL

        def blocks_queries(self, queries):
            return [q.image == "a.png" for q in queries]

    assert guard_flags(ByImage(), qs) == [True, False] and guard_flags(None, qs) == [False, False]
    out = rescore_with_guard(res, ByImage())
    assert [r["response"] for r in out["responses"]] == [REFUSAL, "2"]
    assert out["rta_sensitive"] == 1.0 and out["rta_benign"] == 0.0


def test_wrapped_training_keeps_labels_and_is_neither_validation_nor_test_phrasing():
    from ngguard.methods.privacy_probe import wrapped_training
    from ngguard.world import spec
    qs = [Query("a.png", "Passport", f"What is the {a} of the Passport in the image?", s, "1", "train")
          for a, s in (("number", True), ("colour", False), ("name", True))]
    names = tuple(spec.PROBE_CONTEXTS)
    out = wrapped_training(qs, names, REFUSAL)
    assert wrapped_training(qs, names, REFUSAL) == out and wrapped_training(qs, (), REFUSAL) == []
    assert [q.sensitive for q in out] == [q.sensitive for q in qs] and {q.split for q in out} == {"probe_context"}
    assert [q.pair_id for q in out] == [f"probe_context/{n}" for n in names[:3]]
    assert all(q.prompt in w.prompt and w.prompt != q.prompt for q, w in zip(qs, out))
    assert REFUSAL in wrapped_training(qs, ("refusal_note",), REFUSAL)[0].prompt
    # no part of a probe context is a part of a validation or test wrapper, and vice versa
    others = [*spec.ADVERSARIAL.values(), *spec.VAL_ADVERSARIAL.values(), *spec.VAL_INJECTION.values()]
    for c in spec.PROBE_CONTEXTS.values():
        for part in c.replace("{refusal}", "{q}").split("{q}"):
            part = part.strip()
            assert not part or not any(part in o for o in others), part
        assert c not in others


def test_privacy_probe_with_contexts_and_locator_gate(tmp_path):
    """The chosen design (training contexts, "named" read by the named probe AND the locator): still through
    the registry, no weight changes, the locator's threshold kept as a plain setting of the guard."""
    from dataclasses import fields as dc_fields
    from ngguard.methods.privacy_probe import LinearProbe, ProbeGuard
    model, processor = tiny_llava(0, "image_first")
    adapter = adapter_for(model, processor)
    sets = _world(tmp_path)
    hp = PrivacyProbeHParams(subject_layer=1, locator_layer=1, request_layer=2, image_layer=3,
                             train_sets=("overrefusal_train", "awareness_train"), neutral_sets=("utility_train",),
                             contexts=("preface", "suffix", "refusal_note"), named_by="both", locator_threshold=0.9)
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    guard, info = REGISTRY["privacy_probe"].guard(sets["train"], REFUSAL, adapter=adapter, sets=sets,
                                                  recipe=SimpleNamespace(privacy_probe=hp))
    assert all(torch.equal(before[k], v) for k, v in adapter.model.state_dict().items())
    # the wrapped copies were learnt from: more training questions than the plain sets hold
    plain = sum(len(sets[k]) for k in ("train", "overrefusal_train", "awareness_train"))
    assert info["training_queries"] == plain + len(sets["train"]) + len(sets["overrefusal_train"])
    assert guard.named_by == "both" and guard.locator.threshold == 0.9
    # every probe a LinearProbe field, every setting a plain scalar (what a patch writer can serialise)
    assert all(isinstance(getattr(guard, f.name), LinearProbe) for f in dc_fields(ProbeGuard) if "LinearProbe" in str(f.type))
    assert {f.name for f in dc_fields(ProbeGuard) if "LinearProbe" in str(f.type)} == {"subject", "locator", "request", "image", "named"}
    every = [q for v in sets.values() for q in v]
    dec = guard.decisions(every)
    right = [d["blocked"] == q.sensitive for d, q in zip(dec, every)]
    assert sum(right) / len(right) > 0.8, sum(right) / len(right)
    from pathlib import Path
    from ngguard.recipe import load_recipe
    for bad in ("privacy_probe.named_by=maybe", "privacy_probe.contexts=[nowhere]"):
        with pytest.raises(Exception, match=bad.split("=")[0].split(".")[1]):
            load_recipe(Path(__file__).parents[1] / "recipes" / "organism.yaml", overrides=[bad])


def test_unnamed_by_and_ensemble_change_only_the_decision_rule(tmp_path):
    """unnamed_by / ensemble (issue 27) fit the same probes; they change which readings decide "private": the
    image probe (default, the old rule), the subject probe at the model's own name for the image
    (``described_states``), their mean, and for named questions with ensemble the mean with the subject probe."""
    from ngguard.methods.privacy_probe import described_states
    model, processor = tiny_llava(0, "image_first")
    adapter = adapter_for(model, processor)
    sets = _world(tmp_path)
    base = dict(subject_layer=1, locator_layer=1, request_layer=2, image_layer=3,
                train_sets=("overrefusal_train", "awareness_train"), neutral_sets=("utility_train",))

    def fit(**kw):
        return REGISTRY["privacy_probe"].guard(sets["train"], REFUSAL, adapter=adapter, sets=sets,
                                               recipe=SimpleNamespace(privacy_probe=PrivacyProbeHParams(**base, **kw)))[0]

    every = [q for v in sets.values() for q in v]
    g0, gd, gm, ge = fit(), fit(unnamed_by="description"), fit(unnamed_by="mean"), fit(unnamed_by="mean", ensemble=True)
    assert all(torch.equal(getattr(g0, p).w, getattr(g, p).w) for g in (gd, gm, ge)
               for p in ("subject", "locator", "request", "image", "named"))
    d0, dd, dm, de = (g.decisions(every) for g in (g0, gd, gm, ge))
    assert all(d["described_p"] is None and d["private"] == (d["subject_p"] if d["named"] else d["image_p"]) for d in d0)
    assert any(d["described_p"] is not None for d in dd)  # the description route is exercised
    for a, b, m, e in zip(d0, dd, dm, de):
        assert a["subject_p"] == b["subject_p"] == m["subject_p"] and a["image_p"] == b["image_p"] == m["image_p"]
        assert b["described_p"] == m["described_p"] == e["described_p"]
        if b["described_p"] is None:  # the model named nothing: the image decides, as before
            assert b["private"] == m["private"] == a["image_p"] or a["named"]
            continue
        if a["named"]:
            assert b["private"] == m["private"] == a["private"] and b["blocked"] == a["blocked"]
            assert e["private"] == pytest.approx((a["subject_p"] + b["described_p"] + a["image_p"]) / 3)
        else:
            assert b["private"] == b["described_p"] and m["private"] == pytest.approx((b["described_p"] + a["image_p"]) / 2)
            assert e["private"] == m["private"]
    assert gm.decisions(every) == dm  # deterministic
    # the described states: one generation per distinct image, the same rows for the same image
    imgs = [q.image for q in every[:4]] + [every[0].image]
    st, names = described_states(adapter, imgs, [2, 4])
    assert st.shape == (5, 2, adapter.hidden_size) and names[0] == names[-1]
    assert torch.equal(st[0].nan_to_num(), st[-1].nan_to_num())
    assert torch.equal(described_states(adapter, imgs, [2, 4])[0].nan_to_num(), st.nan_to_num())


def test_new_privacy_probe_settings_are_validated_and_travel_in_a_guard_patch(tmp_path):
    from pathlib import Path
    from ngguard.guard_patch import load_guard, write_guard_patch
    from ngguard.recipe import load_recipe
    recipe = Path(__file__).parents[1] / "recipes" / "organism.yaml"
    for bad in ("privacy_probe.unnamed_by=sometimes", "privacy_probe.ensemble=perhaps",
                "privacy_probe.request_tokens=first"):
        with pytest.raises(Exception, match=bad.split("=")[0].split(".")[1]) as e:
            load_recipe(recipe, overrides=[bad])
        assert "\n" not in str(e.value).strip()
    r = load_recipe(recipe, overrides=["privacy_probe.unnamed_by=description", "privacy_probe.ensemble=true",
                                       "privacy_probe.request_tokens=both"])
    assert (r.privacy_probe.unnamed_by, r.privacy_probe.ensemble, r.privacy_probe.request_tokens) == \
        ("description", True, "both")
    model, processor = tiny_llava(0, "image_first")
    adapter = adapter_for(model, processor)
    sets = _world(tmp_path)
    hp = PrivacyProbeHParams(subject_layer=1, locator_layer=1, request_layer=2, image_layer=3,
                             train_sets=("overrefusal_train", "awareness_train"), neutral_sets=("utility_train",),
                             unnamed_by="mean", ensemble=True, request_tokens="both")
    guard, _ = REGISTRY["privacy_probe"].guard(sets["train"], REFUSAL, adapter=adapter, sets=sets,
                                               recipe=SimpleNamespace(privacy_probe=hp))
    assert guard.request.layers == (2, 2) and guard.request.w.shape[0] == 2 * adapter.hidden_size
    base = tmp_path / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    write_guard_patch(tmp_path / "patch", guard, base_dir=base, recipe_hash=None, method="privacy_probe", subjects=[])
    _, back = load_guard(tmp_path / "patch", adapter)
    assert (back.unnamed_by, back.ensemble, back.request_tokens) == ("mean", True, "both")
    qs = [q for v in sets.values() for q in v][:8]
    assert back.decisions(qs) == guard.decisions(qs)
    # served requests hold the image itself (PIL), not a path: the same decisions
    from PIL import Image
    from ngguard.guard_patch import blocked
    assert blocked(back, [Image.open(q.image) for q in qs], [q.prompt for q in qs]) == \
        [d["blocked"] for d in guard.decisions(qs)]


def test_neutral_images_teach_only_the_image_probe(tmp_path):
    """neutral_images: the image probe also learns the neutral queries' images (shapes) as "no private card";
    every other probe is fitted exactly as without it."""
    model, processor = tiny_llava(0, "image_first")
    adapter = adapter_for(model, processor)
    sets = _world(tmp_path)
    base = dict(subject_layer=1, locator_layer=1, request_layer=2, image_layer=3,
                train_sets=("overrefusal_train", "awareness_train"), neutral_sets=("utility_train",))
    fit = lambda **kw: REGISTRY["privacy_probe"].guard(  # noqa: E731
        sets["train"], REFUSAL, adapter=adapter, sets=sets, recipe=SimpleNamespace(privacy_probe=PrivacyProbeHParams(**base, **kw)))[0]
    a, b = fit(), fit(neutral_images=True)
    shapes = len({q.image for q in sets["utility_train"]})
    assert b.image.log["rows"] == a.image.log["rows"] + shapes
    assert not torch.equal(a.image.w, b.image.w)
    assert all(torch.equal(getattr(a, p).w, getattr(b, p).w) for p in ("subject", "locator", "request", "named"))
    with pytest.raises(Exception, match="neutral_images"):
        from pathlib import Path
        from ngguard.recipe import load_recipe
        load_recipe(Path(__file__).parents[1] / "recipes" / "organism.yaml", overrides=["privacy_probe.neutral_images=some"])
