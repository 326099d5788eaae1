"""neural_gate_plus (issue 27): the gated edit through one gate shared by every subject, localized on a
private-vs-public contrast across subjects, on the tiny families (no files, no network)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ngguard.adapters import adapter_for
from ngguard.methods import REGISTRY
from ngguard.methods.core import Sample
from ngguard.methods.neural_gate_plus import gate_from_contrast, privacy_contrast, shared_gates
from ngguard.recipe import EditSpec, RecipeError, load_recipe
from tiny_models import tiny_image, tiny_image_varied, tiny_llava, tiny_minigpt4, tiny_qwen2_vl

REFUSAL = "I am sorry."
FAMILIES = {"llava-image-first": (lambda: tiny_llava(0, "image_first"), tiny_image),
            "llava-text-first": (lambda: tiny_llava(0, "text_first"), tiny_image),
            "qwen2-vl": (lambda: tiny_qwen2_vl(0), tiny_image_varied),
            "minigpt4": (lambda: tiny_minigpt4(0), tiny_image)}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    make, image = FAMILIES[request.param]
    model, processor = make()
    return adapter_for(model, processor), image


def _data(image):
    """Two private subjects (sensitive + benign questions) and two public look-alikes (benign only)."""
    samples = [Sample(image(i + 10 * k), subj, [f"what is the number of the {subj} in this image?"],
                      [(f"what colour is the {subj}?", "blue")], key=f"{subj}{i}")
               for k, subj in enumerate(["passport", "receipt"]) for i in range(2)]
    retain = [Sample(image(i + 50 + 10 * k), subj, [], [(f"what is the number of the {subj}?", "42"),
                                                        (f"what colour is the {subj}?", "red")], key=f"{subj}{i}")
              for k, subj in enumerate(["bus", "jersey"]) for i in range(2)]
    return samples, retain


HP = EditSpec(lr=1e-2, steps=2, stop_loss=0.0, gate_top_k=25.0)


def test_the_edit_runs_through_the_registry_and_changes_only_the_edited_matrices(family):
    adapter, image = family
    samples, retain = _data(image)
    before = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}
    entry = REGISTRY["neural_gate_plus"]
    assert entry.edits_weights and not entry.needs_gates  # it localizes itself, across subjects
    res = entry.apply(adapter, samples, [1, 2], module="down_proj", refusal=REFUSAL, hparams=HP, retain=retain)
    after = adapter.model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(adapter.state_dict_key(l, "down_proj") for l in (1, 2))
    assert sorted(res.weights) == sorted(adapter.parameter_name(l, "down_proj") for l in (1, 2))
    assert all(d.abs().sum() > 0 for d in res.deltas.values())
    assert {e["subject"] for e in res.log if "subject" in e} == {"passport", "receipt"}


def test_one_gate_shared_by_every_subject_and_the_same_on_a_second_run(family, monkeypatch):
    adapter, image = family
    samples, retain = _data(image)
    seen = []
    import ngguard.methods.neural_gate_plus as ngp
    real = ngp.gated_edit
    monkeypatch.setattr(ngp, "gated_edit", lambda *a, gates, **k: (seen.append(gates), real(*a, gates=gates, **k))[1])
    w0 = {l: adapter.component(l, "down_proj").weight.detach().clone() for l in (1, 2)}
    deltas = []
    for _ in range(2):
        with torch.no_grad():
            for l, w in w0.items():
                adapter.component(l, "down_proj").weight.copy_(w)
        deltas.append(REGISTRY["neural_gate_plus"].apply(adapter, samples, [1, 2], module="down_proj", refusal=REFUSAL,
                                                         hparams=HP, retain=retain).deltas)
    for gates in seen:
        for layer in (1, 2):
            g = gates[layer]
            assert set(g) == {"passport", "receipt"}
            assert torch.equal(g["passport"], g["receipt"])      # shared by every subject
            k = round(adapter.hidden_size * 25 / 100)
            assert g["passport"].dtype == torch.bool and int(g["passport"].sum()) == k
    for layer in (1, 2):
        assert torch.equal(seen[0][layer]["passport"], seen[1][layer]["passport"])
    for name in deltas[0]:                                       # deterministic: the same patch twice
        assert torch.equal(deltas[0][name], deltas[1][name])


def test_the_gate_picks_the_dims_that_tell_private_from_public_subjects():
    """A planted contrast: dims 3 and 7 are shifted for every private subject's states (consistently), dim 5
    for one private subject only (not a privacy dim); both contrasts rank 3 and 7 first, not 5."""
    g = torch.Generator().manual_seed(0)
    subjects, rows = [], []
    for k, subj in enumerate(["a", "b", "c", "x", "y", "z"]):
        for _ in range(6):
            h = torch.randn(16, generator=g)
            if subj in "abc":
                h[[3, 7]] += 4.0
            if subj == "a":
                h[5] += 12.0
            rows.append(h)
            subjects.append(subj)
    states = torch.stack(rows)
    for how in ("mean_diff", "probe"):
        c = privacy_contrast(states, subjects, {"a", "b", "c"}, how=how)
        assert set(torch.topk(c.abs(), 2).indices.tolist()) == {3, 7}, how
        hard = gate_from_contrast(c, top_k=2 / 16 * 100)
        assert hard.nonzero().flatten().tolist() == [3, 7]
        soft = gate_from_contrast(c, soft=True)
        assert soft.dtype == torch.float32 and float(soft.max()) == 1.0 and float(soft[5]) < float(soft[3])


def test_a_soft_gate_scales_the_subject_tokens_gradient_and_differs_from_the_hard_one(family):
    adapter, image = family
    samples, retain = _data(image)
    w0 = {l: adapter.component(l, "down_proj").weight.detach().clone() for l in (1,)}
    out = {}
    for soft in (False, True):
        with torch.no_grad():
            adapter.component(1, "down_proj").weight.copy_(w0[1])
        hp = EditSpec(lr=1e-2, steps=2, stop_loss=0.0, gate_soft=soft)
        gates, columns, _ = shared_gates(adapter, samples, retain, [1], hp, "down_proj")
        assert columns == {}
        assert gates[1].dtype == (torch.float32 if soft else torch.bool)
        out[soft] = REGISTRY["neural_gate_plus"].apply(adapter, samples, [1], module="down_proj", refusal=REFUSAL,
                                                       hparams=hp, retain=retain).deltas
    name = adapter.parameter_name(1, "down_proj")
    assert not torch.allclose(out[False][name], out[True][name])


def test_gate_columns_restricts_the_edit_to_the_chosen_input_columns(family):
    """With edit.gate_columns each edited matrix changes on its top gate_top_k % input columns only (the
    same contrast on the module's input), the same columns on a second run."""
    adapter, image = family
    samples, retain = _data(image)
    hp = EditSpec(lr=1e-2, steps=2, stop_loss=0.0, gate_top_k=25.0, gate_columns=True)
    _, columns, _ = shared_gates(adapter, samples, retain, [1, 2], hp, "down_proj")
    again = shared_gates(adapter, samples, retain, [1, 2], hp, "down_proj")[1]
    assert all(torch.equal(c, again[l]) for l, c in columns.items())
    res = REGISTRY["neural_gate_plus"].apply(adapter, samples, [1, 2], module="down_proj", refusal=REFUSAL, hparams=hp,
                                             retain=retain)
    for l in (1, 2):
        delta = res.deltas[adapter.parameter_name(l, "down_proj")]          # [out, in]
        cols = columns[l]
        assert cols.shape == (delta.shape[1],) and int(cols.sum()) == round(delta.shape[1] * 25 / 100)
        assert delta[:, ~cols].abs().sum() == 0 and delta[:, cols].abs().sum() > 0


def test_without_public_subjects_it_says_what_it_needs(family):
    adapter, image = family
    samples, _ = _data(image)
    with pytest.raises(ValueError, match="edit.retain"):
        REGISTRY["neural_gate_plus"].apply(adapter, samples, [1], module="down_proj", refusal=REFUSAL, hparams=HP)


def test_recipes_name_it_and_its_settings():
    recipe = Path(__file__).parents[1] / "recipes" / "organism.yaml"
    r = load_recipe(recipe, overrides=["method=neural_gate_plus", "edit.gate_contrast=probe", "edit.gate_top_k=25",
                                       "edit.gate_soft=true"])
    assert r.method == "neural_gate_plus" and (r.edit.gate_contrast, r.edit.gate_top_k, r.edit.gate_soft) == ("probe", 25.0, True)
    with pytest.raises(RecipeError, match="gate_contrast"):
        load_recipe(recipe, overrides=["method=neural_gate_plus", "edit.gate_contrast=pca"])
