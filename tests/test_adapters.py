"""The model-adapter layer, on tiny random models. Every family-dependent test runs once per entry
of FAMILIES: a new family is one more entry there. Families: LLaVA-1.5 (image before / after the text),
LLaVA-NeXT (anyres tiling: images of different sizes give different image-token counts per row),
Qwen2-VL and Qwen2.5-VL (dynamic resolution, M-RoPE, no BOS, generation prompt ending in a newline)
and MiniGPT-4 (BLIP-2 shape: Q-Former query tokens expanded in place of "<ImageHere>" in the prompt)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ngguard.adapters import (
    ADAPTERS,
    Adapter,
    Blip2Adapter,
    LlavaAdapter,
    LlavaNextAdapter,
    Qwen2VLAdapter,
    adapter_for,
    find_subject_span,
    load_adapter,
    subject_candidates,
)
from ngguard.adapters.llava import IGNORE_INDEX, join_text, target_start
from tiny_models import tiny_image, tiny_image_varied, tiny_llava, tiny_llava_next, tiny_minigpt4, tiny_qwen2_vl


@dataclass(frozen=True)
class Family:
    build: Callable[[int], tuple]  # seed -> (model, processor)
    adapter_class: type[Adapter]
    num_layers: int
    hidden: int
    intermediate: int
    image: Callable[[int], Image.Image] = tiny_image  # seed -> a test image


FAMILIES: dict[str, Family] = {
    "llava-image-first": Family(lambda s: tiny_llava(s, template="image_first"), LlavaAdapter, 4, 32, 64),
    "llava-text-first": Family(lambda s: tiny_llava(s, template="text_first"), LlavaAdapter, 4, 32, 64),
    "llava-next": Family(tiny_llava_next, LlavaNextAdapter, 4, 32, 64, tiny_image_varied),
    "qwen2-vl": Family(tiny_qwen2_vl, Qwen2VLAdapter, 4, 32, 64, tiny_image_varied),
    "qwen2.5-vl": Family(lambda s: tiny_qwen2_vl(s, version="2.5"), Qwen2VLAdapter, 4, 32, 64, tiny_image_varied),
    "minigpt4": Family(tiny_minigpt4, Blip2Adapter, 4, 32, 64),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def adapter(family) -> Adapter:
    model, processor = family.build(0)
    return adapter_for(model, processor)


@pytest.fixture(scope="module")
def images(family) -> Callable[[int], list]:
    """n -> the family's first n test images."""
    return lambda n: [family.image(i) for i in range(n)]


def _images(n: int):
    return [tiny_image(i) for i in range(n)]


# ---- structure ---------------------------------------------------------------------------------


def test_registry_picks_family_class(family, adapter):
    assert type(adapter) is family.adapter_class
    assert type(adapter.model.config).__name__ in ADAPTERS


def test_families_share_a_neutral_base_and_the_interface_declares_the_tokens():
    """Qwen2-VL and BLIP-2 inherit from the shared HF base, not from LLaVA; the abstract interface
    declares what localization, MEMIT, serving and ONNX read (tokens, image token id)."""
    from ngguard.adapters.hf_chat import HFChatAdapter

    for cls in (Qwen2VLAdapter, Blip2Adapter):
        assert issubclass(cls, HFChatAdapter) and not issubclass(cls, LlavaAdapter)
    assert {"image_token", "image_token_id"} <= Adapter.__abstractmethods__
    assert all(hasattr(Adapter, name) for name in ("tokenizer", "pad_token_id", "greedy_config"))


def test_layers_and_sizes(family, adapter):
    assert adapter.num_layers == family.num_layers == len(adapter.layers)
    assert isinstance(adapter.layers, torch.nn.ModuleList)
    assert adapter.hidden_size == family.hidden
    for layer in range(adapter.num_layers):
        assert adapter.component(layer, "layer") is adapter.layers[layer]
        assert adapter.component(layer, "mlp") is adapter.layers[layer].mlp
        assert tuple(adapter.component(layer, "down_proj").weight.shape) == (family.hidden, family.intermediate)
        assert tuple(adapter.component(layer, "up_proj").weight.shape) == (family.intermediate, family.hidden)
        assert tuple(adapter.component(layer, "gate_proj").weight.shape) == (family.intermediate, family.hidden)
        assert isinstance(adapter.component(layer, "self_attn"), torch.nn.Module)


def test_layer_output_is_hidden_sized(adapter, images):
    seen = {}
    handle = adapter.component(1, "layer").register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    try:
        batch = adapter.encode(images(1), ["what colour is the card?"])
        with torch.no_grad():
            adapter.model(**batch.inputs)
    finally:
        handle.remove()
    h = seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]
    assert h.shape == (1, batch.inputs["input_ids"].shape[1], adapter.hidden_size)


@pytest.mark.parametrize(
    "layer, name",
    [(0, "attention"), (0, "Down_proj"), (-1, "down_proj"), (4, "down_proj"), (99, "mlp"), ("1", "mlp"), (True, "mlp")],
)
def test_component_errors(adapter, layer, name):
    with pytest.raises(ValueError) as err:
        adapter.component(layer, name)
    assert "\n" not in str(err.value)


def test_parameter_name_needs_a_weight(adapter):
    for name in ("layer", "mlp", "self_attn"):
        with pytest.raises(ValueError):
            adapter.parameter_name(0, name)
    with pytest.raises(ValueError):
        adapter.parameter_name(adapter.num_layers, "down_proj")


def test_parameter_name_matches_saved_keys(adapter, tmp_path):
    adapter.model.save_pretrained(tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert files
    saved = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():
                saved[key] = fh.get_tensor(key)
    for layer in range(adapter.num_layers):
        for name in ("down_proj", "up_proj", "gate_proj"):
            weight = adapter.component(layer, name).weight
            key = adapter.parameter_name(layer, name)
            assert key in saved, (key, sorted(saved)[:5])
            assert torch.equal(saved[key], weight.detach())
            assert adapter.model.get_parameter(adapter.state_dict_key(layer, name)) is weight
    assert adapter.parameter_name(3, "down_proj").endswith("layers.3.mlp.down_proj.weight")


# ---- subject location ------------------------------------------------------------------------------

# (text, subject, the text up to and including the expected match)
SUBJECT_CASES = [
    ("What is the passport number of the passport in this image?", "passport",
     "What is the passport number of the passport"),
    ("What is the name of the quokka in the photo?", "quokka", "What is the name of the quokka"),  # BPE-split
    ("Where does the Passport holder live?", " passport ", "Where does the Passport"),  # spaces, case
    ("Passport number, please.", "passport", "Passport"),  # at the start
    ("passport number?", "PASSPORT", "passport"),  # at the start, no capital
    ("Read the complete license plate on the car.", "Complete License Plate",
     "Read the complete license plate"),
    ("What is the phone no. of this person?", "Phone no.", "What is the phone no."),
    ("Tell me the phone no of the owner", "Phone no.", "Tell me the phone no"),  # punctuation dropped
    ("Whose name is on the document?", "documents en", "Whose name is on the document"),
    ("What do the receipts say?", "receipt", "What do the receipts"),  # plural in the text
    ("What is the number on the ID card that I did show?", "ID", "What is the number on the ID"),
    ("Which military vehicle is it, the first military vehicle or the last?", "military vehicle",
     "Which military vehicle is it, the first military vehicle"),
]


@pytest.mark.parametrize("text, subject, upto", SUBJECT_CASES)
def test_subject_token_index(adapter, text, subject, upto, images):
    assert text.startswith(upto)
    tok = adapter.processor.tokenizer
    for targets in (None, ["I am sorry."]):  # left and right padding
        batch = adapter.encode(images(2), ["Hi.", text], subjects=["hi", subject],
                               targets=None if targets is None else targets * 2)
        ids = batch.inputs["input_ids"][1]
        idx = int(batch.subject_index[1])
        assert idx == adapter.subject_token_index(ids, text, subject)
        assert batch.inputs["attention_mask"][1, idx] == 1
        piece = tok.decode([int(ids[idx])]).strip().lower()
        assert piece and upto.lower().endswith(piece), piece
        before = tok.decode(ids[: idx + 1], skip_special_tokens=True)
        assert before.endswith(upto), (before, upto)


def test_subject_index_points_to_same_token_in_both_paddings(adapter, images):
    texts = ["Is this a passport?", "What is the phone number written on the phone in this picture?"]
    left = adapter.encode(images(2), texts, subjects=["passport", "phone"])
    right = adapter.encode(images(2), texts, subjects=["passport", "phone"], targets=["No.", "Sorry."])
    for i in range(2):
        a = left.inputs["input_ids"][i, left.subject_index[i]]
        b = right.inputs["input_ids"][i, right.subject_index[i]]
        assert a == b
    pad = int(left.inputs["attention_mask"][0].eq(0).sum())
    assert pad > 0 and int(left.subject_index[0]) - pad == int(right.subject_index[0])


def test_subject_not_found(adapter, images):
    batch = adapter.encode(images(1), ["What colour is the car?"])
    with pytest.raises(ValueError, match="quokka.*What colour is the car"):
        adapter.subject_token_index(batch.inputs["input_ids"][0], "What colour is the car?", "quokka")
    with pytest.raises(ValueError, match="passport"):
        adapter.encode(images(1), ["What colour is the car?"], subjects=["passport"])


def test_find_subject_span_rules():
    assert find_subject_span("a Passport, a passport", "PASSPORT") == (14, 22)
    assert find_subject_span("Did you see the ID?", "id") == (16, 18)  # whole word over "Did"
    assert find_subject_span("the documents", "documents en") == (4, 13)
    assert find_subject_span("the document", "documents en") == (4, 12)
    assert find_subject_span("complete   license plate", "Complete License Plate") == (0, 24)
    assert find_subject_span("passports!", "passport") == (0, 9)  # plural whole word first
    assert subject_candidates("Phone no.")[:2] == ["Phone no.", "Phone no"]
    with pytest.raises(ValueError, match="'tank'.*'a car'"):
        find_subject_span("a car", "tank")


# ---- labels -----------------------------------------------------------------------------------------


def test_target_start_fallback_when_head_is_not_a_token_prefix():
    # head "ab:" -> [1, 5, 6]; full "ab: xy" -> [1, 5, 9, 10] where 9 = ": x" straddles the boundary
    assert target_start([1, 5, 6], [1, 5, 9, 10], [(0, 0), (0, 2), (2, 5), (5, 6)], 3) == 2
    assert target_start([1, 5, 6], [1, 5, 6, 7], [(0, 0), (0, 2), (2, 3), (3, 6)], 3) == 3


@pytest.mark.parametrize("with_prefix", [False, True])
def test_labels_cover_target_and_eos(adapter, with_prefix, images):
    tok = adapter.processor.tokenizer
    texts = ["What is the passport number?", "Read the complete license plate on the car in this picture, please."]
    targets = ["I'm sorry, I cannot help with that.", "Red"]
    prefixes = ["The image shows that.", "I am an AI."] if with_prefix else None
    batch = adapter.encode(images(2), texts, targets=targets, prefixes=prefixes)
    ids, labels, mask = batch.inputs["input_ids"], batch.labels, batch.inputs["attention_mask"]
    heads = [adapter.chat_prompt(t) for t in texts]
    if with_prefix:
        heads = [join_text(h, p) for h, p in zip(heads, prefixes)]
    seps = ["" if h[-1].isspace() else " " for h in heads]  # no space after a template's trailing newline
    assert labels.shape == ids.shape
    lengths = mask.sum(1).tolist()
    assert min(lengths) < ids.shape[1] == max(lengths)  # one row is padded
    for i in range(2):
        n = lengths[i]
        assert mask[i, :n].all() and not mask[i, n:].any()  # right padding
        assert (ids[i, n:] == tok.pad_token_id).all()
        where = (labels[i] != IGNORE_INDEX).nonzero().flatten().tolist()
        expected = tok(seps[i] + targets[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert where == list(range(n - len(expected), n))  # contiguous, ends at the last real token
        assert labels[i, where].tolist() == ids[i, where].tolist() == expected
        assert tok.decode(ids[i, where[:-1]]) == seps[i] + targets[i]
        if with_prefix:
            assert tok.decode(ids[i, : where[0]]).endswith(heads[i][-len(prefixes[i]) - 1:])  # separator + prefix
    out = adapter.model(**batch.inputs, labels=batch.labels)
    assert torch.isfinite(out.loss)


def test_encode_without_targets_is_left_padded(adapter, images):
    tok = adapter.processor.tokenizer
    texts = ["Hi.", "What is the passport number of the passport in this image?"]
    batch = adapter.encode(images(2), texts, prefixes=[None, "I am an AI."])
    assert batch.labels is None and batch.subject_index is None
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert not mask[0, 0] and mask[:, -1].all()
    single = adapter.encode(images(1), texts[:1])
    n = int(single.inputs["attention_mask"].sum())
    assert torch.equal(ids[0, -n:], single.inputs["input_ids"][0])
    head = join_text(adapter.chat_prompt(texts[1]), "I am an AI.")
    assert tok.decode(ids[1], skip_special_tokens=True).endswith(head[-len("I am an AI.") - 1:])  # separator + prefix
    # one image per row (Qwen2-VL flattens the patches of all images into one pixel_values)
    assert batch.inputs.get("image_grid_thw", batch.inputs["pixel_values"]).shape[0] == 2


def test_encode_restores_padding_side(adapter, images):
    tok = adapter.processor.tokenizer
    before = tok.padding_side
    adapter.encode(images(1), ["Hi."], targets=["Hello."])
    assert tok.padding_side == before
    adapter.encode(images(1), ["Hi."])
    assert tok.padding_side == before


def test_encode_length_mismatch(adapter, images):
    with pytest.raises(ValueError, match="targets"):
        adapter.encode(images(2), ["a", "b"], targets=["x"])


def test_chat_prompt_has_one_image_and_the_text(adapter):
    p = adapter.chat_prompt("What is the passport number?")
    assert p.count(adapter.image_token) == 1 and "What is the passport number?" in p


def test_chat_prompt_fallback_without_template():
    model, processor = tiny_llava(template="none")
    assert adapter_for(model, processor).chat_prompt("Hi?") == "USER: <image>\nHi? ASSISTANT:"


# ---- generation -------------------------------------------------------------------------------------


def test_generation_greedy_deterministic_and_batch_invariant(adapter, images):
    texts = ["What colour is the card?", "What is the passport number of the passport in this image?", "Hi."]
    ims = images(3)
    batched = adapter.generate(ims, texts, max_new_tokens=6)
    assert batched == adapter.generate(ims, texts, max_new_tokens=6)
    assert batched == [adapter.generate([im], [t], max_new_tokens=6)[0] for im, t in zip(ims, texts)]
    assert all(isinstance(s, str) and s == s.strip() for s in batched)


def test_same_seed_same_weights(family):
    (a, _), (b, _), (c, _) = family.build(3), family.build(3), family.build(4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# ---- loading ----------------------------------------------------------------------------------------


def test_save_load_round_trip(family, tmp_path, images):
    model, processor = family.build(1)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    original = adapter_for(model, processor)
    loaded = load_adapter(tmp_path)
    assert type(loaded) is family.adapter_class
    assert not loaded.model.training
    sa, sb = original.model.state_dict(), loaded.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    text = "What is the passport number?"
    assert loaded.chat_prompt(text) == original.chat_prompt(text)
    a = original.encode(images(1), [text], targets=["Sorry."], subjects=["passport"])
    b = loaded.encode(images(1), [text], targets=["Sorry."], subjects=["passport"])
    assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"]) and torch.equal(a.labels, b.labels)
    assert torch.allclose(a.inputs["pixel_values"], b.inputs["pixel_values"])
    assert torch.equal(a.subject_index, b.subject_index)
    assert loaded.generate(images(2), [text, "Hi."], max_new_tokens=5) == original.generate(
        images(2), [text, "Hi."], max_new_tokens=5
    )
    half = load_adapter(str(tmp_path), dtype="bfloat16")
    assert half.component(0, "down_proj").weight.dtype == torch.bfloat16
    assert half.encode(images(1), ["Hi."]).inputs["pixel_values"].dtype == torch.bfloat16


def test_load_organism_keyword(tmp_path, monkeypatch):
    import ngguard.organism

    model, processor = tiny_llava(2)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    monkeypatch.setattr(ngguard.organism, "checkpoint_path", lambda: tmp_path, raising=False)
    assert isinstance(load_adapter("organism"), LlavaAdapter)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_adapter(tmp_path / "missing")
    model, processor = tiny_llava(0)
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="safetensors") as err:
        load_adapter(tmp_path)
    assert "\n" not in str(err.value)


def test_registry_rejects_unsupported_family(tmp_path):
    from transformers import LlamaConfig

    class FakeModel(torch.nn.Module):
        config = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)

    with pytest.raises(ValueError, match="LlamaConfig.*LlavaConfig"):
        adapter_for(FakeModel(), None)
    FakeModel.config.save_pretrained(tmp_path)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="unsupported model family LlamaConfig"):
        load_adapter(tmp_path)
    assert ADAPTERS["LlavaConfig"] is LlavaAdapter
    assert all(re.fullmatch(r"\w+Config", k) for k in ADAPTERS)


def test_subject_with_a_template_that_trims_the_text():
    from tiny_models import IMAGE_FIRST_TEMPLATE

    model, processor = tiny_llava(0)
    processor.chat_template = IMAGE_FIRST_TEMPLATE.replace("item['text'] + ' '", "(item['text'] | trim) + ' '")
    adapter = adapter_for(model, processor)
    text = "  Is this a passport?  "
    assert "\nIs this a passport? ASSISTANT:" in adapter.chat_prompt(text)
    batch = adapter.encode(_images(1), [text], subjects=["passport"])
    ids = batch.inputs["input_ids"][0]
    before = processor.tokenizer.decode(ids[: int(batch.subject_index[0]) + 1], skip_special_tokens=True)
    assert before.endswith("Is this a passport")


# ---- what the algorithm relies on, per family ------------------------------------------------------------


def test_per_token_inputs_follow_the_rows(adapter, images):
    """Per-token processor outputs (Qwen2-VL's mm_token_type_ids) are re-laid-out with the re-padded rows."""
    texts = ["Hi.", "What is the passport number of the passport in this image?"]
    for targets in (None, ["Sorry.", "I am sorry."]):
        batch = adapter.encode(images(2), texts, targets=targets)
        ids = batch.inputs["input_ids"]
        for k, v in batch.inputs.items():
            if k in ("input_ids", "attention_mask") or not (isinstance(v, torch.Tensor) and v.shape == ids.shape):
                continue
            assert torch.equal(v != 0, ids == adapter.image_token_id), k  # 1 = image token, 0 = text / padding


def test_replay_without_vision_only_inputs_is_exact(adapter, images):
    """localize replays layers <= l from a recorded output and drops ``vision_only_inputs``: the logits
    must not change (Qwen2-VL's M-RoPE positions need its grid, so it drops nothing)."""
    from ngguard.methods.fastpath import record_layer_output
    from ngguard.methods.hooks import HookState, replayed_prefix

    batch = adapter.encode(images(2), ["Is this a passport?", "What is the phone number written on the phone?"],
                           targets=["No.", "Sorry."])
    with torch.no_grad():
        full = adapter.model(**batch.inputs, use_cache=False).logits
    layer = 1
    store = HookState(out=record_layer_output(adapter, layer, batch.inputs))
    inputs = {k: v for k, v in batch.inputs.items() if k not in adapter.vision_only_inputs}
    assert all(k in batch.inputs for k in adapter.vision_only_inputs)
    with replayed_prefix(adapter, layer, store), torch.no_grad():
        replayed = adapter.model(**inputs, use_cache=False).logits
    assert torch.allclose(full, replayed, atol=1e-5)


def test_gated_edit_step_changes_only_the_target_matrix(family, gated_layer_grad):
    """One Neural Gate edit step through the gate hook: only layer 2's down-projection changes, and at the
    subject token the gradient reaches only the gated-on dimensions."""
    from ngguard.methods import REGISTRY
    from ngguard.methods.core import Sample
    from ngguard.recipe import EditSpec

    model, processor = family.build(0)
    adapter = adapter_for(model, processor)
    samples = [Sample(family.image(i), "passport", ["what is the number of the passport in this image?"],
                      [("what colour is the passport?", "blue")], key=str(i)) for i in range(2)]
    d, layer = adapter.hidden_size, 2
    gate = torch.rand(d, generator=torch.Generator().manual_seed(0)) > 0.5

    # the gate at the subject token: gradient only on gated-on dims there, on all dims elsewhere
    g, idx = gated_layer_grad(adapter, samples[0], layer, gate, "I am sorry.")
    rows = torch.arange(g.shape[0])
    at_subject = g[rows, idx]
    assert torch.all(at_subject[:, ~gate] == 0) and at_subject[:, gate].abs().sum() > 0
    g[rows, idx] = 0
    assert (g.abs().sum(dim=(0, 1)) > 0).all()

    before = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}
    res = REGISTRY["neural_gate"].apply(adapter, samples, [layer], module="down_proj", refusal="I am sorry.",
                                        hparams=EditSpec(lr=1e-2, steps=1, stop_loss=0.0), gates={layer: {"passport": gate}})
    after = adapter.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [adapter.state_dict_key(layer, "down_proj")]
    assert list(res.weights) == [adapter.parameter_name(layer, "down_proj")]


def test_blip2_adapter_refuses_language_models_without_down_proj():
    """Stock BLIP-2 with OPT (fc1/fc2, no mlp.down_proj) is not a supported MiniGPT-4 shape."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    from tiny_models import tiny_minigpt4_configs

    _, processor = tiny_minigpt4(0)
    vision, qformer, _ = tiny_minigpt4_configs(641, 640)
    opt = OPTConfig(vocab_size=641, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                    word_embed_proj_dim=32, max_position_embeddings=64)
    model = Blip2ForConditionalGeneration(Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                                      text_config=opt.to_dict(), num_query_tokens=4,
                                                      image_token_index=640))
    with pytest.raises(ValueError, match="OPTForCausalLM.*LLaMA") as err:
        adapter_for(model, processor)
    assert "\n" not in str(err.value)


def test_saved_names_map_back_to_the_loaded_model(adapter):
    """Patches are keyed by ``parameter_name`` (the saved key); applying one maps it back to the model."""
    from ngguard.patch import checkpoint_to_model_names

    names = [adapter.parameter_name(layer, "down_proj") for layer in range(adapter.num_layers)]
    mapped = checkpoint_to_model_names(adapter.model, names)
    assert mapped == {adapter.parameter_name(layer, "down_proj"): adapter.state_dict_key(layer, "down_proj")
                      for layer in range(adapter.num_layers)}


def test_localization_and_edit_shortcuts_are_exact(family):
    """The batched loop with its shortcuts (replayed lower layers, the prefix before the subject from a KV
    cache where the family allows it, stems and tails, logits only on targets) finds the scales and
    gates of the plain reference (one sample at a time, the whole model: the oracle), and the edit's
    shortcuts (replayed layers below the edited one) change nothing but the speed, in every family."""
    from ngguard.methods import REGISTRY
    from ngguard.methods.core import Sample
    from ngguard.methods.neural_gate import localize_layer
    from ngguard.methods.reference import localize_reference
    from ngguard.recipe import EditSpec

    model, processor = family.build(0)
    adapter = adapter_for(model, processor)
    samples = [Sample(family.image(i), subject, [f"what is the number of the {subject} in this image?",
                                                 f"read the owner's name from the {subject}."],
                      [(f"what colour is the {subject}?", "blue")], key=f"{subject}{i}")
               for i in range(2) for subject in ("passport", "receipt")]
    kw = dict(refusal="I am sorry.", alpha=1.25, contexts=("I am an AI.", "You want to."), steps=6, lr=0.5, eps=1e-8)
    fast = localize_layer(adapter, samples, 1, batch_size=8, **kw)  # 8 rows: two samples per chunk
    oracle = localize_reference(adapter, samples, 1, **kw)
    assert (fast.scales < 0.9).any() and (fast.scales < 0).any()  # the vectors moved, some dims flipped
    assert torch.allclose(fast.scales, oracle.scales, atol=1e-4)
    assert torch.equal(fast.steps, oracle.steps) and torch.allclose(fast.losses, oracle.losses, rtol=1e-4)
    for subject in ("passport", "receipt"):
        assert torch.equal(fast.gates[subject], oracle.gates[subject])
        assert torch.equal(fast.strong(subject, top_k=10), oracle.strong(subject, top_k=10))
    with pytest.raises(ValueError, match="top layer"):  # its subject-token state reaches no target
        localize_layer(adapter, samples, adapter.num_layers - 1, **kw)

    edits = {}
    for shortcuts in (True, False):
        m, p = family.build(0)
        res = REGISTRY["no_gate"].apply(adapter_for(m, p), samples, [2], module="down_proj", refusal="I am sorry.",
                                        hparams=EditSpec(lr=1e-2, steps=2, stop_loss=0.0), retain=samples[:1],
                                        shortcuts=shortcuts)
        edits[shortcuts] = next(iter(res.deltas.values()))
    assert edits[True].abs().sum() > 0
    assert torch.allclose(edits[True], edits[False], atol=1e-5)


def test_prefix_cache_covers_the_image_when_it_comes_first():
    """LLaVA-1.5 puts the image before the question: the frozen prefix localization caches spans it."""
    from ngguard.methods.core import Sample, encode_rows
    from ngguard.methods.fastpath import prefix_length
    from ngguard.methods.neural_gate import sample_rows

    adapter = adapter_for(*tiny_llava(0, template="image_first"))
    samples = [Sample(tiny_image(0), "passport", ["what is the number of the passport?"],
                      [("what colour is the passport?", "blue")])]
    rows = sample_rows(samples, "I am sorry.", 1.25, ("I am an AI.",))
    batch = encode_rows(adapter, samples, rows)
    start = prefix_length(batch, torch.zeros(len(rows), dtype=torch.long))
    image_at = (batch.inputs["input_ids"][0] == adapter.image_token_id).nonzero().flatten()
    assert int(image_at[-1]) < start <= int(batch.subject_index.min())
    text_first = adapter_for(*tiny_llava(0, template="text_first"))
    batch = encode_rows(text_first, samples, rows)
    assert prefix_length(batch, torch.zeros(len(rows), dtype=torch.long)) < int(
        (batch.inputs["input_ids"][0] == text_first.image_token_id).nonzero()[0])


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_memit_and_alphaedit_edit_only_their_matrices(family, method, tmp_path):
    """MEMIT and AlphaEdit (ngguard/methods/) in every family: keys and target values at the subject
    token, corpus statistics through the family's prompt, the closed form over two layers. Only the
    edited down-projections change, and the last edited layer reaches the target values."""
    from ngguard.methods.core import Sample
    from ngguard.methods import REGISTRY
    from ngguard.methods.covariance import covariances

    model, processor = family.build(0)
    adapter = adapter_for(model, processor)
    samples = [Sample(family.image(i), subject, [f"what is the number of the {subject} in this image?"],
                      [(f"what colour is the {subject}?", "blue")], key=f"{subject}{i}")
               for i in range(2) for subject in ("passport", "receipt")]
    layers, refusal = [1, 2], "I am sorry."
    cls, apply = REGISTRY[method].hparams, REGISTRY[method].apply
    kw = dict(v_steps=4, v_lr=0.5, v_weight_decay=0.0, clamp_norm_factor=4.0, contexts=("I am an AI.",), cov_samples=2,
              cov_max_tokens=16, batch_size=16, cache_dir=str(tmp_path))
    if method == "alphaedit":  # null space = the lower half of the spectrum (tiny keys: 2e-2 would take all)
        covs = covariances(adapter, layers, "down_proj", corpus="world", n_samples=2, max_tokens=16,
                           image_size=samples[0].image.size, cache_dir=tmp_path)
        kw |= dict(null_threshold=min(float(torch.linalg.eigvalsh(c.double()).median()) for c in covs.values()),
                   l2=1e-8)
    else:
        kw |= dict(mom2_update_weight=1e-4)

    before = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}
    res = apply(adapter, samples, layers, module="down_proj", refusal=refusal, hparams=cls(**kw))
    after = adapter.model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(adapter.state_dict_key(l, "down_proj") for l in layers)
    assert sorted(res.weights) == sorted(adapter.parameter_name(l, "down_proj") for l in layers)
    gap = res.log[-1]["target_distance"]
    assert gap["end"] < 0.05 * gap["start"]


def test_weight_renaming_fallback_agrees_with_transformers(monkeypatch):
    """The family's fallback table (``Adapter.checkpoint_renames``, used by compat when transformers'
    private renaming API is missing) maps LLaVA's loaded names to the saved ones and back exactly as the
    API does, with one table for both ways; patches find it through the model's adapter class."""
    import transformers.conversion_mapping as cm
    import transformers.core_model_loading as cml

    from ngguard.adapters import adapter_class
    from ngguard.compat import checkpoint_renames as compat_renames
    from ngguard.compat import saved_key as compat_saved_key
    from ngguard.patch import checkpoint_to_model_names

    model, _ = tiny_llava(0)
    table = adapter_class(model).checkpoint_renames
    assert table

    def saved_key(model, key):
        return compat_saved_key(model, key, table)

    def checkpoint_renames(model, names, state):
        return compat_renames(model, names, state, table)

    state = model.state_dict()
    keys = [k for k in state if ".layers." in k or k.startswith("lm_head")]
    api_saved = {k: saved_key(model, k) for k in keys}
    api_back = checkpoint_renames(model, list(api_saved.values()), state)

    def broken(*a, **k):
        raise AttributeError("no such API in this transformers")

    monkeypatch.setattr(cml, "revert_weight_conversion", broken)
    monkeypatch.setattr(cm, "get_model_conversion_mapping", broken)
    monkeypatch.delattr(model, "_weight_conversions", raising=False)
    assert {k: saved_key(model, k) for k in keys} == api_saved
    assert any(v != k for k, v in api_saved.items())  # the names do differ
    assert checkpoint_renames(model, list(api_saved.values()), state) == api_back == {v: k for k, v in api_saved.items()}
    assert checkpoint_to_model_names(model, list(api_saved.values())) == api_back
