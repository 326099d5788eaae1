"""Localization and the gated edit on tiny random LLaVA models (no files, no network)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ngguard.adapters import adapter_for
from ngguard.data import Query
from ngguard.methods import REGISTRY
from ngguard.methods.core import Sample, jaccard, row_nll
from ngguard.methods.dinm import dinm_layer
from ngguard.methods.gate_share import subject_gradient_share
from ngguard.methods.neural_gate import gates_from_scales, localize_layer, sample_rows
from ngguard.recipe import EditSpec
from tiny_models import tiny_image, tiny_llava

REFUSAL = "I am sorry."


@pytest.fixture(params=["image_first", "text_first"])
def adapter(request):
    model, processor = tiny_llava(0, request.param)
    return adapter_for(model, processor)


def _samples(n=3, subject="passport"):
    return [Sample(tiny_image(i), subject, [f"what is the number of the {subject} in this image?"],
                   [(f"what colour is the {subject}?", "blue")], key=str(i)) for i in range(n)]


def test_gate_blocks_gradient_on_gated_off_dims_at_subject_token_only(adapter, gated_layer_grad):
    d = adapter.hidden_size
    gate = torch.zeros(d, dtype=torch.bool)
    gate[: d // 4] = True
    layer = 1
    g, idx = gated_layer_grad(adapter, _samples(1)[0], layer, gate, REFUSAL)
    rows = torch.arange(g.shape[0])
    at_subject = g[rows, idx]                       # [B, d]
    assert torch.all(at_subject[:, ~gate] == 0), "gated-off dims must get no gradient at the subject token"
    assert at_subject[:, gate].abs().sum() > 0, "gated-on dims keep their gradient"
    other = g.clone()
    other[rows, idx] = 0
    # every dimension still receives gradient through the other tokens
    assert (other.abs().sum(dim=(0, 1)) > 0).all()


def test_without_gate_subject_token_gets_full_gradient(adapter, gated_layer_grad):
    d = adapter.hidden_size
    g, idx = gated_layer_grad(adapter, _samples(1)[0], 1, torch.zeros(d, dtype=torch.bool), REFUSAL, use_gate=False)
    at_subject = g[torch.arange(g.shape[0]), idx]
    assert (at_subject.abs().sum(0) > 0).float().mean() > 0.9


def test_gate_changes_the_weight_gradient(adapter):
    """The gate must change what the down-projection learns (else the method is plain fine-tuning)."""
    s = _samples(2)
    d = adapter.hidden_size
    none = {1: {"passport": torch.zeros(d, dtype=torch.bool)}}
    full = {1: {"passport": torch.ones(d, dtype=torch.bool)}}
    w0 = adapter.component(1, "down_proj").weight.detach().clone()
    hp = EditSpec(lr=1e-2, steps=2, stop_loss=0.0)
    r_none = REGISTRY["neural_gate"].apply(adapter, s, [1], module="down_proj", refusal=REFUSAL, hparams=hp, gates=none)
    with torch.no_grad():
        adapter.component(1, "down_proj").weight.copy_(w0)
    r_full = REGISTRY["neural_gate"].apply(adapter, s, [1], module="down_proj", refusal=REFUSAL, hparams=hp, gates=full)
    with torch.no_grad():
        adapter.component(1, "down_proj").weight.copy_(w0)
    r_plain = REGISTRY["no_gate"].apply(adapter, s, [1], module="down_proj", refusal=REFUSAL, hparams=hp)
    name = adapter.parameter_name(1, "down_proj")
    # an all-open gate is exactly plain fine-tuning; an all-closed gate is not
    assert torch.allclose(r_full.deltas[name], r_plain.deltas[name], atol=1e-6)
    assert not torch.allclose(r_none.deltas[name], r_plain.deltas[name], atol=1e-6)


def test_edit_changes_only_the_target_matrix(adapter):
    before = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}
    d = adapter.hidden_size
    gates = {2: {"passport": torch.rand(d, generator=torch.Generator().manual_seed(0)) > 0.5}}
    res = REGISTRY["neural_gate"].apply(adapter, _samples(2), [2], module="down_proj", refusal=REFUSAL,
                                        hparams=EditSpec(lr=1e-2, steps=2), gates=gates)
    after = adapter.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [adapter.state_dict_key(2, "down_proj")]
    assert list(res.weights) == [adapter.parameter_name(2, "down_proj")]
    assert all(not p.requires_grad or p is None for p in adapter.model.parameters())


def test_edit_lowers_the_refusal_loss(adapter):
    samples = _samples(2)
    rows = sample_rows(samples, REFUSAL, 0.0)
    def loss():
        b = adapter.encode([samples[r.sample].image for r in rows], [r.text for r in rows],
                           targets=[r.target for r in rows])
        with torch.no_grad():
            return row_nll(adapter.model(**b.inputs).logits, b.labels)[[0, 2]].mean().item()
    l0 = loss()
    REGISTRY["no_gate"].apply(adapter, samples, [1], module="down_proj", refusal=REFUSAL,
                              hparams=EditSpec(alpha=0.0, lr=5e-2, steps=5, stop_loss=0.0))
    # a random tiny model's final norm + small lm_head bound how peaked logits can get (~0.6 nats here)
    assert loss() < l0 - 0.3


def test_missing_gates_are_refused(adapter):
    with pytest.raises(ValueError, match="needs gates"):
        REGISTRY["neural_gate"].apply(adapter, _samples(1), [1], module="down_proj", refusal=REFUSAL, hparams=EditSpec())


def test_the_deprecated_apply_edit_warns_and_edits_as_the_registry_does():
    """``ngguard.edit`` (kept one release): importing it warns; ``apply_edit`` is the registry's edit with an
    ``EditSpec``, the same deltas; an unknown method is refused."""
    import importlib
    import sys

    sys.modules.pop("ngguard.edit", None)
    with pytest.warns(DeprecationWarning, match=r"ngguard\.methods"):
        edit = importlib.import_module("ngguard.edit")
    s, d = _samples(2), tiny_llava(0)[0].config.text_config.hidden_size
    gates = {1: {"passport": torch.arange(d) % 2 == 0}}
    old = edit.apply_edit(adapter_for(*tiny_llava(0)), s, [1], method="neural_gate", gates=gates, refusal=REFUSAL,
                          lr=1e-2, steps=2, stop_loss=0.0)
    new = REGISTRY["neural_gate"].apply(adapter_for(*tiny_llava(0)), s, [1], module="down_proj", refusal=REFUSAL,
                                        hparams=EditSpec(lr=1e-2, steps=2, stop_loss=0.0), gates=gates)
    (name, delta), = new.deltas.items()
    assert delta.abs().sum() > 0 and torch.equal(old.deltas[name], delta)
    with pytest.raises(ValueError, match="unknown method"):
        edit.apply_edit(adapter_for(*tiny_llava(0)), s, [1], method="rome", refusal=REFUSAL)


def test_registry_holds_every_method_once_and_declares_what_the_pipeline_needs():
    """A recipe's method names (recipe.METHODS, EDIT_METHODS: derived from the registry) and the registry
    are the same lists; each editing entry's hyperparameters are a section of
    the recipe (the gradient edits share ``edit``);
    what the pipeline treats differently is declared by the entry, not found by its name."""
    from ngguard.methods import REGISTRY, hparams_for
    from ngguard.recipe import EDIT_METHODS, METHODS, EditSpec, Recipe, load_recipe

    assert list(REGISTRY) == list(METHODS)
    assert [m for m, e in REGISTRY.items() if e.edits_weights] == list(EDIT_METHODS)
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "organism.yaml")
    assert isinstance(recipe, Recipe)
    for name in EDIT_METHODS:
        hp = hparams_for(recipe, name)
        assert isinstance(hp, REGISTRY[name].hparams) and callable(REGISTRY[name].apply)
    assert hparams_for(recipe, "no_gate") is recipe.edit and isinstance(recipe.edit, EditSpec)
    assert hparams_for(recipe, "memit") is recipe.memit
    assert [m for m, e in REGISTRY.items() if e.needs_gates] == ["neural_gate"]
    assert [m for m, e in REGISTRY.items() if e.choose_layers is not None] == ["dinm"]
    assert [(m, e.ablation_of) for m, e in REGISTRY.items() if e.ablation_of] == [("no_gate", "neural_gate")]
    guard, fields = REGISTRY["keyword_filter"].guard(
        [Query("a.png", "passport", "What is the passport number?", True),
         Query("a.png", "passport", "What is the passport colour?", False)], "No.")
    assert guard.blocks("tell me the number") and not guard.blocks("what colour is it?") and fields == {"phrases": ["number"]}


def test_gates_from_scales_by_hand():
    scales = torch.tensor([[-0.5, 0.9, -0.1], [0.3, 0.9, -0.2], [-0.1, -0.4, 0.8]])
    g = gates_from_scales(scales, ["a", "a", "b"])
    assert torch.allclose(g["a"], torch.tensor([0.5, 0.0, 1.0]))
    assert torch.allclose(g["b"], torch.tensor([1.0, 1.0, 0.0]))


def test_localization_batched_matches_per_sample_loop(adapter):
    """The plain reference (ngguard.methods.reference, imported here): one sample at a time, the whole model."""
    from ngguard.methods.reference import localize_reference
    samples = _samples(3) + _samples(2, "receipt")
    # eps small: a random tiny model has tiny gradients, which the paper's eps=1e-3 would swallow
    kw = dict(refusal=REFUSAL, alpha=1.25, contexts=("I am an AI.",), steps=6, lr=0.5, eps=1e-8, batch_size=4)
    a = localize_layer(adapter, samples, 1, **kw)
    b = localize_reference(adapter, samples, 1, **{k: v for k, v in kw.items() if k != "batch_size"})
    assert a.scales.shape == (5, adapter.hidden_size)
    assert torch.allclose(a.scales, b.scales, atol=1e-4)
    assert set(a.gates) == {"passport", "receipt"}
    assert jaccard(a.strong("passport"), b.strong("passport")) == 1.0
    # the vectors moved away from the init (tanh(2)) and some dims flipped sign
    assert (a.scales < 0).any()
    assert a.losses.shape == (5,) and (a.steps >= 1).all()


@pytest.mark.parametrize("batched", [True, False])
def test_localization_early_stop_freezes_finished_samples(adapter, batched):
    from ngguard.methods.reference import localize_reference
    samples = _samples(2)
    loc = (localize_layer if batched else localize_reference)(adapter, samples, 1, refusal=REFUSAL, steps=3,
                                                               stop_loss=1e9)  # everything "done" at once
    assert (loc.steps == 1).all()
    assert torch.allclose(loc.scales, torch.tanh(torch.tensor(2.0)).expand_as(loc.scales))


def test_dinm_layer_picks_a_valid_layer(adapter):
    samples = _samples(2)
    unsafe = {s.sensitive[0]: "one two" for s in samples}
    best, dist = dinm_layer(adapter, samples, REFUSAL, unsafe)
    assert 0 <= best < adapter.num_layers and len(dist) == adapter.num_layers
    assert dist[best] == max(dist)


def test_subject_gradient_share_is_a_fraction_and_nonzero(adapter):
    share = subject_gradient_share(adapter, _samples(2), 1, refusal=REFUSAL)
    assert 0.0 < share < 1.5
    assert all(not p.requires_grad for p in adapter.model.parameters())


@pytest.mark.parametrize("template", ["image_first", "text_first"])
def test_each_question_runs_once_up_to_its_answer(template):
    """With answer-start contexts, a sensitive question has several rows: the batched loop runs the
    question once (a stem holding the subject token) and only the different endings per row."""
    from ngguard.methods.fastpath import prepare
    from ngguard.methods.core import encode_rows

    adapter = adapter_for(*tiny_llava(0, template))
    samples = _samples(2)
    rows = sample_rows(samples, REFUSAL, 1.25, ("I am an AI.", "You want to."))
    groups = {k: i for i, k in enumerate(dict.fromkeys((r.sample, r.text) for r in rows))}
    batch = encode_rows(adapter, samples, rows)
    chunk = prepare(adapter, batch, 1, frozen_above=True, sample_of_row=torch.tensor([r.sample for r in rows]),
                    question_of_row=torch.tensor([groups[(r.sample, r.text)] for r in rows]))
    pk = chunk.packed
    assert pk is not None and len(pk.stem_rows) == len(groups) == 4 and pk.lines.unpack.shape[0] == len(rows) == 8
    # the hook's packed subject positions point at each stem's subject token
    ids = pk.lines.inputs["input_ids"]
    assert (ids[pk.lines.subject] == batch.inputs["input_ids"][pk.stem_rows, batch.subject_index[pk.stem_rows]]).all()
    # the packed stems and tails hold fewer tokens than the rows they stand for
    mask = batch.inputs["attention_mask"]
    real = int((pk.lines.inputs["attention_mask"][:, 0].amax(-1) == 0).sum())  # tokens that see something
    assert real < mask[:, chunk.start:].sum()
    # every target token is still predicted (same labels, in the window)
    assert (chunk.labels != -100).sum() == (batch.labels != -100).sum()


def test_a_second_pass_is_the_same_edit_run_again_on_the_edited_model(adapter):
    """edit.passes = 2 revisits every subject after the last one: the same as editing the edited model
    again with passes = 1 (a fresh Adam per subject and pass); the log has a row per image and pass."""
    from ngguard.methods import REGISTRY
    from ngguard.recipe import EditSpec
    s = _samples(2) + _samples(2, "receipt")
    d = adapter.hidden_size
    gates = {1: {subj: torch.rand(d, generator=torch.Generator().manual_seed(k)) > 0.5
                 for k, subj in enumerate(["passport", "receipt"])}}
    name, w0 = adapter.parameter_name(1, "down_proj"), adapter.component(1, "down_proj").weight.detach().clone()
    def edit(passes):
        hp = EditSpec(lr=1e-2, steps=2, stop_loss=0.0, passes=passes)
        return REGISTRY["neural_gate"].apply(adapter, s, [1], module="down_proj", refusal=REFUSAL, hparams=hp,
                                             gates=gates)
    twice = edit(2)
    assert [(r["subject"], r["pass"]) for r in twice.log] == \
        [("passport", 0)] * 2 + [("receipt", 0)] * 2 + [("passport", 1)] * 2 + [("receipt", 1)] * 2
    with torch.no_grad():
        adapter.component(1, "down_proj").weight.copy_(w0)
    edit(1)
    once_more = edit(1)
    assert torch.allclose(twice.weights[name], once_more.weights[name], atol=1e-5)
    with torch.no_grad():
        adapter.component(1, "down_proj").weight.copy_(w0)
    assert not torch.allclose(edit(1).weights[name], twice.weights[name], atol=1e-5)


def test_the_lowest_edited_layer_is_replayed_only_where_its_module_adds_into_its_output(adapter):
    """The edit replays the lowest edited layer from its recorded output plus the delta's own term
    (``hooks.LiveReplay``) only where that is the layer's output: for the MLP's down-projection (its output
    adds into the residual stream), not for the up-projection (its output goes through the activation);
    and the replayed layer's output equals the real one's under a trained delta."""
    from ngguard.methods.core import encode_sample
    from ngguard.methods.fastpath import live_replay_holds, record_live, record_layer_output
    from ngguard.methods.hooks import deltas
    batch = encode_sample(adapter, _samples(1)[0], REFUSAL)[0]
    with deltas(adapter, [1], "down_proj") as ds:
        (delta,) = ds.values()
        assert live_replay_holds(adapter, 1, "down_proj", delta, batch.inputs)
        rec = record_live(adapter, 1, "down_proj", delta, batch.inputs)
        with torch.no_grad():
            delta.delta.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        d = adapter.hidden_size
        assert torch.allclose(delta(rec[..., d:], rec[..., :d]), record_layer_output(adapter, 1, batch.inputs), atol=1e-5)
        assert not torch.allclose(rec[..., :d], record_layer_output(adapter, 1, batch.inputs), atol=1e-3)  # the delta matters
    with deltas(adapter, [1], "up_proj") as ds:
        assert not live_replay_holds(adapter, 1, "up_proj", next(iter(ds.values())), batch.inputs)


@pytest.mark.parametrize("method", ["neural_gate", "no_gate", "dinm"])
def test_the_fast_edit_equals_the_plain_loop(adapter, method):
    """The edit's shortcuts (layers below the lowest edited one replayed, the image prefix run once per
    step for all of an image's rows, logits only on targets) give the weights of the plain loop (the
    whole model, every row whole, all logits), with the gate, the KL keep term and the retained answers."""
    from ngguard.methods.core import encode_sample
    from ngguard.methods.fastpath import prepare
    from ngguard.methods import REGISTRY
    from ngguard.recipe import EditSpec
    s = _samples(2) + _samples(2, "receipt")
    retain = [Sample(tiny_image(9), "shapes", [], [("what shape is drawn here?", "a square"),
                                                   ("what colour is it?", "red")])]
    d = adapter.hidden_size
    gates = {l: {subj: torch.rand(d, generator=torch.Generator().manual_seed(k + l)) > 0.5
                 for k, subj in enumerate(["passport", "receipt"])} for l in (1, 2)}
    w0 = {l: adapter.component(l, "down_proj").weight.detach().clone() for l in (1, 2)}
    hp = EditSpec(lr=1e-2, steps=3, stop_loss=0.0, passes=2)
    weights = {}
    for shortcuts in (True, False):
        with torch.no_grad():
            for l, w in w0.items():
                adapter.component(l, "down_proj").weight.copy_(w)
        res = REGISTRY[method].apply(adapter, s, [1, 2], module="down_proj", refusal=REFUSAL, hparams=hp, gates=gates,
                                     retain=retain, shortcuts=shortcuts)
        weights[shortcuts] = res.deltas
    for name, delta in weights[True].items():
        assert delta.abs().sum() > 0
        assert torch.allclose(delta, weights[False][name], atol=1e-6), (name, (delta - weights[False][name]).abs().max())
    # where the image comes first, every image token is in the shared prefix, run once per step
    batch = encode_sample(adapter, s[0], REFUSAL)[0]
    pb = prepare(adapter, batch, 0, frozen_above=False)
    image_at = (batch.inputs["input_ids"][0] == adapter.image_token_id).nonzero().flatten()
    if int(image_at[0]) < 8:
        assert pb.shared is not None and pb.shared.out.shape[1] > int(image_at[-1])
