"""MEMIT and AlphaEdit (ngguard/methods/): the closed forms, the target values, the key statistics and
their cache, the recipe sections and the pipeline's dispatch, on tiny random LLaVA models."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ngguard.adapters import adapter_for
from ngguard.methods.core import Sample
from ngguard.methods import REGISTRY, method_deviations
from ngguard.methods import covariance as cov_mod
from ngguard.methods.alphaedit import AlphaEditHParams, alphaedit_update, apply_alphaedit
from ngguard.methods.compute_ks import requests_of, subject_states
from ngguard.methods.compute_vs import compute_vs
from ngguard.world.corpus import load_corpus, world_corpus
from ngguard.methods.covariance import covariances, null_space_projectors
from ngguard.methods.memit import MemitHParams, apply_memit, memit_update
from ngguard.recipe import RecipeError, load_recipe, recipe_from_dict
from ngguard.world import spec
from tiny_models import tiny_image, tiny_llava

REFUSAL = "I am sorry."
REPO = Path(__file__).resolve().parents[1]


def _samples():
    return [Sample(tiny_image(i), subject, [f"what is the number of the {subject} in this image?",
                                            f"read the owner's name from the {subject}."],
                   [(f"what colour is the {subject}?", "blue")], key=f"{subject}{i}")
            for i in range(2) for subject in ("passport", "receipt")]


def _hp(cls, tmp_path, **kw):
    """Small, fast settings; no weight decay (a random tiny model's hidden states have norm ~0.1, where
    the reference code's ||delta|| / ||h||^2 term would dominate the loss)."""
    base = dict(v_steps=6, v_lr=0.5, v_weight_decay=0.0, clamp_norm_factor=4.0, contexts=("I am an AI.",),
                cov_samples=40, cov_max_tokens=64, batch_size=16, cache_dir=str(tmp_path / "stats"))
    return cls(**(base | kw))


def _targets(hp, layer: int):
    """The target values z and the original outputs h at ``layer`` on a fresh seed-0 model."""
    adapter = adapter_for(*tiny_llava(0))
    samples = _samples()
    requests = requests_of(samples)
    _, h = subject_states(adapter, samples, requests, key_layer=None, out_layer=layer, refusal=REFUSAL)
    z, _ = compute_vs(adapter, samples, requests, layer, h, refusal=REFUSAL, contexts=hp.contexts, steps=hp.v_steps,
                      lr=hp.v_lr, weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor,
                      kl_factor=hp.kl_factor, stop_loss=hp.stop_loss, batch_size=hp.batch_size)
    return z, h


# ---- the closed forms --------------------------------------------------------------------------------


def test_memit_closed_form_maps_keys_to_residuals():
    g = torch.Generator().manual_seed(0)
    d, dk, n = 8, 32, 5
    keys = torch.randn(dk, n, generator=g, dtype=torch.float64)
    resid = torch.randn(d, n, generator=g, dtype=torch.float64)
    a = torch.randn(dk, 3 * dk, generator=g, dtype=torch.float64)
    cov = a @ a.T / (3 * dk)
    assert torch.allclose(memit_update(keys, resid, cov, 1e-8) @ keys, resid, atol=1e-5)
    # the covariance term holds the update back: a large lambda barely moves the keys
    assert (memit_update(keys, resid, cov, 1e4) @ keys).norm() < 0.05 * resid.norm()


def test_alphaedit_update_leaves_preserved_keys_and_moves_edited_ones(tmp_path):
    g = torch.Generator().manual_seed(1)
    d, dk = 8, 32
    preserved = torch.randn(dk, 10, generator=g, dtype=torch.float64)       # rank 10: a 22-dim null space
    cov = (preserved @ preserved.T / 10).float()
    p = null_space_projectors({0: cov}, "down_proj", threshold=1e-4, cache_dir=tmp_path)[0].double()
    assert round(float(torch.trace(p))) == dk - 10
    keys = torch.randn(dk, 4, generator=g, dtype=torch.float64)
    resid = torch.randn(d, 4, generator=g, dtype=torch.float64)
    dw = alphaedit_update(keys, resid, p, 1e-8)
    assert (dw @ preserved).abs().max() < 1e-4 * resid.abs().max()
    assert torch.allclose(dw @ keys, resid, atol=1e-4)
    # the identity term holds the update back, but never at the preserved keys' expense
    held = alphaedit_update(keys, resid, p, 1e3)
    assert (held @ keys).norm() < 0.05 * resid.norm() and (held @ preserved).abs().max() < 1e-8


# ---- the methods on a tiny model ---------------------------------------------------------------------


@pytest.mark.parametrize("layers", [[2], [1, 2]])
def test_memit_edited_model_maps_keys_to_target_values(tmp_path, layers):
    """With a negligible covariance term, the last edited layer outputs the target values z at every
    request's subject token (single layer: exactly; several: the last layer's update closes the gap)."""
    hp = _hp(MemitHParams, tmp_path, mom2_update_weight=1e-7)
    z, h = _targets(hp, max(layers))
    assert ((z - h).norm(dim=-1) > 1e-3).all()                      # the targets moved
    adapter = adapter_for(*tiny_llava(0))
    samples = _samples()
    apply_memit(adapter, samples, layers, refusal=REFUSAL, hparams=hp)
    _, out = subject_states(adapter, samples, requests_of(samples), key_layer=None, out_layer=max(layers),
                            refusal=REFUSAL)
    assert ((out - z).norm(dim=-1) / (z - h).norm(dim=-1)).max() < 1e-2
    # the paper's lambda (15000) keeps the edit small against a corpus covariance of this scale
    damped = adapter_for(*tiny_llava(0))
    apply_memit(damped, samples, layers, refusal=REFUSAL, hparams=dataclasses.replace(hp, mom2_update_weight=15000.0))
    _, out2 = subject_states(damped, samples, requests_of(samples), key_layer=None, out_layer=max(layers),
                             refusal=REFUSAL)
    assert (out2 - z).norm() > 0.5 * (h - z).norm()


def test_alphaedit_keeps_corpus_keys_and_moves_edited_keys(tmp_path):
    layer = 2
    hp = _hp(AlphaEditHParams, tmp_path, cov_samples=1, l2=1e-10)  # one text: fewer tokens than key dims
    adapter = adapter_for(*tiny_llava(0))
    samples = _samples()
    cov = covariances(adapter, [layer], "down_proj", corpus="world", n_samples=1, max_tokens=hp.cov_max_tokens,
                      image_size=samples[0].image.size, cache_dir=hp.cache_dir)[layer].double()
    ev = torch.linalg.eigvalsh(cov)
    hp = dataclasses.replace(hp, null_threshold=float(ev.max()) * 1e-6)
    assert 0 < int((ev < hp.null_threshold).sum()) < len(ev)
    w0 = adapter.component(layer, "down_proj").weight.detach().double().clone()
    z, h = _targets(hp, layer)
    apply_alphaedit(adapter, samples, [layer], refusal=REFUSAL, hparams=hp)
    dw = adapter.component(layer, "down_proj").weight.detach().double() - w0
    # preserved: E||dW k0||^2 = tr(dW C dW^T) against the outputs' E||W k0||^2
    assert torch.trace(dw @ cov @ dw.T) < 1e-8 * torch.trace(w0 @ cov @ w0.T)
    # edited: the subject states reach their targets
    _, out = subject_states(adapter, samples, requests_of(samples), key_layer=None, out_layer=layer, refusal=REFUSAL)
    assert ((out - z).norm(dim=-1) / (z - h).norm(dim=-1)).max() < 1e-2


def test_target_value_shortcuts_are_exact(tmp_path):
    hp = _hp(MemitHParams, tmp_path)
    adapter = adapter_for(*tiny_llava(0, template="text_first"))
    samples = _samples()
    requests = requests_of(samples)
    _, h = subject_states(adapter, samples, requests, key_layer=None, out_layer=2, refusal=REFUSAL)
    kw = dict(refusal=REFUSAL, contexts=hp.contexts, steps=4, lr=0.5, weight_decay=1e-4, clamp_norm_factor=4.0,
              batch_size=7)
    fast, log = compute_vs(adapter, samples, requests, 2, h, **kw)
    slow, _ = compute_vs(adapter, samples, requests, 2, h, shortcuts=False, **kw)
    assert (fast - h).abs().sum() > 0 and torch.allclose(fast, slow, atol=1e-5)
    assert len(log) == len(requests) and {e["key"] for e in log} == {s.key for s in samples}
    assert all(e["loss_last"] <= e["loss_first"] for e in log)
    # chunking does not change the result (requests are independent)
    other, _ = compute_vs(adapter, samples, requests, 2, h, **(kw | {"batch_size": 100}))
    assert torch.allclose(fast, other, atol=1e-5)


@pytest.mark.parametrize("name, layers", [("memit", [1, 2]), ("alphaedit", [2])])
def test_methods_change_only_the_edited_matrices(tmp_path, name, layers):
    adapter = adapter_for(*tiny_llava(0))
    before = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}
    cls, apply = REGISTRY[name].hparams, REGISTRY[name].apply
    res = apply(adapter, _samples(), layers, module="down_proj", refusal=REFUSAL, hparams=_hp(cls, tmp_path))
    after = adapter.model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(adapter.state_dict_key(l, "down_proj") for l in layers)
    assert sorted(res.weights) == sorted(res.deltas) == sorted(adapter.parameter_name(l, "down_proj") for l in layers)
    for l in layers:
        name_l = adapter.parameter_name(l, "down_proj")
        assert torch.equal(res.weights[name_l], after[adapter.state_dict_key(l, "down_proj")])
        assert torch.allclose(res.deltas[name_l], (after[adapter.state_dict_key(l, "down_proj")]
                                                  - before[adapter.state_dict_key(l, "down_proj")]).float())
    assert all(not p.requires_grad for p in adapter.model.parameters())
    json.dumps(res.log)  # plain data for report.json
    with pytest.raises(ValueError, match="down_proj"):
        apply(adapter, _samples(), layers, module="up_proj", refusal=REFUSAL, hparams=_hp(cls, tmp_path))


# ---- the key statistics --------------------------------------------------------------------------------


def test_covariance_cache_is_keyed_by_model_layer_and_corpus(tmp_path, monkeypatch):
    computed: list[list[int]] = []
    real = cov_mod._accumulate
    monkeypatch.setattr(cov_mod, "_accumulate", lambda a, layers, *x, **k: computed.append(list(layers)) or real(a, layers, *x, **k))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" = Heading = \nThe cat sat on the mat.\n\nA second line of general text.\nA third one.\n")
    kw = dict(corpus=str(corpus), n_samples=10, max_tokens=32, image_size=(32, 32), cache_dir=tmp_path / "stats")
    adapter = adapter_for(*tiny_llava(0))

    def run(layers=(1,), a=adapter, **over):
        n = len(computed)
        out = covariances(a, list(layers), "down_proj", **(kw | over))
        return out, computed[n:]

    c1, new = run()
    assert new == [[1]] and c1[1].shape == (64, 64) and torch.allclose(c1[1], c1[1].T)
    c2, new = run()
    assert new == [] and torch.equal(c1[1], c2[1])                       # same inputs: from the cache
    _, new = run((1, 2))
    assert new == [[2]]                                                  # another layer: only that one
    _, new = run(n_samples=2)
    assert new == [[1]]                                                  # fewer texts: another corpus hash
    corpus.write_text("Something else entirely.\n")
    _, new = run()
    assert new == [[1]]                                                  # the file changed
    corpus.write_text(" = Heading = \nThe cat sat on the mat.\n\nA second line of general text.\nA third one.\n")
    _, new = run()
    assert new == []                                                     # back to the first corpus
    with torch.no_grad():
        adapter.component(3, "down_proj").weight.add_(1.0)               # above layer 1: cannot change its keys
    _, new = run()
    assert new == []
    with torch.no_grad():
        adapter.component(0, "up_proj").weight.mul_(1.5)                 # below: the model changed
    c3, new = run()
    assert new == [[1]] and not torch.allclose(c3[1], c1[1])
    _, new = run(a=adapter_for(*tiny_llava(1)))
    assert new == [[1]]                                                  # another model
    assert len(list((tmp_path / "stats").glob("cov-*.safetensors"))) == 6

    proj = lambda t: null_space_projectors({1: c1[1]}, "down_proj", threshold=t, cache_dir=tmp_path / "stats")[1]
    p1 = proj(1e-9)
    assert torch.equal(p1, proj(1e-9)) and len(list((tmp_path / "stats").glob("proj-*"))) == 1
    p2 = proj(float(torch.linalg.eigvalsh(c1[1].double()).max()) * 2)
    assert len(list((tmp_path / "stats").glob("proj-*"))) == 2
    assert torch.allclose(p2, torch.eye(64), atol=1e-5)                  # everything below the threshold: P = I


def test_corpora():
    texts = world_corpus()
    assert len(texts) > 500 and len(set(texts)) == len(texts)
    # general text only: no sensitive question of the world
    sensitive = {p for s in spec.PRIVACY_SUBJECTS for p, _, sens in spec.attribute_phrases(s) if sens}
    subjects = [spec.DISPLAY.get(s, s) for s in spec.PRIVACY_SUBJECTS]
    assert not any(f"the {p} of the {s}" in t for t in texts for p in sensitive for s in subjects)
    assert any(f"of the {s}" in t for t in texts for s in subjects)  # benign questions about the subjects
    assert set(spec.HARMFUL_REQUESTS[:spec.TRAIN_HARMFUL]) <= set(texts)
    assert load_corpus("world", 7) == texts[:7]


def test_corpus_files(tmp_path):
    j = tmp_path / "c.jsonl"
    j.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert load_corpus(str(j), 5) == ["one", "two"]
    j.write_text('{"txt": "one"}\n')
    with pytest.raises(ValueError, match="c.jsonl:1: expected a JSON object with a 'text' field"):
        load_corpus(str(j), 5)
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        load_corpus(str(tmp_path / "missing.txt"), 5)
    (tmp_path / "empty.txt").write_text("\n = Only a heading = \n")
    with pytest.raises(ValueError, match="no texts"):
        load_corpus(str(tmp_path / "empty.txt"), 5)


# ---- recipe and pipeline -------------------------------------------------------------------------------


MINIMAL = {"model": {"path": "organism"}, "method": "memit", "data": {"world": {"n": 4}}}


def test_recipe_sections(tmp_path):
    r = recipe_from_dict(MINIMAL | {"memit": {"v_lr": 0.5, "corpus": "texts/wiki.txt"},
                                    "report": {"compare_methods": ["alphaedit", "neural_gate"]}},
                         root=tmp_path, check_files=False)
    assert r.memit == dataclasses.replace(MemitHParams(), v_lr=0.5, corpus=str(tmp_path / "texts/wiki.txt"))
    assert r.alphaedit == AlphaEditHParams()
    assert recipe_from_dict(r.to_dict(), check_files=False) == r
    with pytest.raises(RecipeError, match=r"memit\.corpus: file not found: .*wiki\.txt"):
        recipe_from_dict(MINIMAL | {"memit": {"corpus": "wiki.txt"}}, root=tmp_path)
    for raw, msg in [({"memit": {"v_lr": "fast"}}, "memit.v_lr: expected float, got str 'fast'"),
                     ({"alphaedit": {"null_threshold": 0}}, "alphaedit.null_threshold: must be > 0, got 0"),
                     ({"alphaedit": {"lambda": 1}}, "alphaedit.lambda: unknown key"),
                     ({"method": "memitt"}, "method: unknown value 'memitt' (did you mean 'memit'?)")]:
        with pytest.raises(RecipeError) as err:
            recipe_from_dict(MINIMAL | raw, check_files=False)
        assert msg in str(err.value) and "\n" not in str(err.value)
    dev = method_deviations(r)
    assert dev[0].startswith("memit: a request = one sensitive question")
    assert "memit.v_lr = 0.5 (paper default 0.1)" in dev
    assert any(d.startswith("alphaedit: as memit") for d in dev)
    assert not any("neural_gate" in d for d in dev)


def test_shipped_memit_recipe_has_paper_settings():
    r = load_recipe(REPO / "recipes/llava-1.5-7b-memit.yaml", check_files=False)
    assert r.method == "memit" and r.layers == (9, 10, 11, 12, 13, 14) and r.module == "down_proj"
    assert "alphaedit" in r.report.compare_methods
    for hp, cls in ((r.memit, MemitHParams), (r.alphaedit, AlphaEditHParams)):
        assert dataclasses.replace(hp, corpus="world") == cls()            # the papers' settings
        assert hp.corpus.endswith("wiki.train.tokens")


def test_pipeline_dispatches_to_the_registry(tmp_path):
    from ngguard.pipeline import recipe_deviations, run_edit

    r = recipe_from_dict(MINIMAL | {"memit": dataclasses.asdict(_hp(MemitHParams, tmp_path)) | {"contexts": ["I am an AI."]}},
                         check_files=False)
    adapter = adapter_for(*tiny_llava(0))
    res = run_edit(adapter, _samples(), [2], "memit", None, r)
    assert list(res.deltas) == [adapter.parameter_name(2, "down_proj")] and res.deltas[adapter.parameter_name(2, "down_proj")].abs().sum() > 0
    assert any(d.startswith("memit.v_steps = 6") for d in recipe_deviations(r))


def test_target_values_are_cached_and_shared_between_memit_and_alphaedit(tmp_path, monkeypatch):
    """compute_vs runs once for MEMIT then AlphaEdit with the same settings on the same model; the
    cached values give the same edit as fresh ones; another v_* setting or another model recomputes."""
    from ngguard.methods import memit as memit_mod
    calls: list[int] = []
    real = memit_mod.compute_vs
    monkeypatch.setattr(memit_mod, "compute_vs", lambda *a, **k: calls.append(1) or real(*a, **k))
    samples = _samples()
    hp_m, hp_a = _hp(MemitHParams, tmp_path), _hp(AlphaEditHParams, tmp_path)
    apply_memit(adapter_for(*tiny_llava(0)), samples, [1], refusal=REFUSAL, hparams=hp_m)
    assert len(calls) == 1
    shared = apply_alphaedit(adapter_for(*tiny_llava(0)), samples, [1], refusal=REFUSAL, hparams=hp_a)
    assert len(calls) == 1                                               # AlphaEdit took MEMIT's values
    fresh = apply_alphaedit(adapter_for(*tiny_llava(0)), samples, [1], refusal=REFUSAL,
                            hparams=dataclasses.replace(hp_a, cache_dir=str(tmp_path / "other")))
    assert len(calls) == 2
    assert all(torch.equal(shared.weights[k], fresh.weights[k]) for k in fresh.weights)
    apply_memit(adapter_for(*tiny_llava(0)), samples, [1], refusal=REFUSAL, hparams=dataclasses.replace(hp_m, v_steps=3))
    assert len(calls) == 3                                               # another setting
    apply_memit(adapter_for(*tiny_llava(1)), samples, [1], refusal=REFUSAL, hparams=hp_m)
    assert len(calls) == 4                                               # another model
