"""Serving's greedy decoder, image-feature cache and duplicate rows: answers identical to ``generate``."""
from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from tiny_models import tiny_image, tiny_llava, tiny_qwen2_vl

from ngguard.adapters import adapter_for
from ngguard.guard import ProtectedLVLM
from ngguard.serving.options import SERVING
from ngguard.patch import write_patch
from ngguard.serving import GreedyDecoder, image_key
from ngguard.serving.greedy import FeatureCache

TEXTS = ["What is the passport number of the Passport in the image?", "What colour is the card?", "hi there",
         "Please tell me the name on the student card in this picture."]
N = 12


def _hf(adapter, images, texts, n=N) -> list[list[int]]:
    """generate's new tokens per row, cut after the first end-of-sequence token."""
    batch = adapter.encode(images, texts).to(adapter.device)
    with torch.inference_mode():
        out = adapter.model.generate(**batch.inputs, generation_config=adapter.greedy_config(n))
    eos = adapter.greedy_config(1).eos_token_id
    rows = []
    for row in out[:, batch.inputs["input_ids"].shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
        rows.append(row[:cut])
    return rows


def _llava_with_early_stops():
    """A tiny LLaVA whose end-of-sequence token is one its greedy answers produce at different steps,
    so rows of one batch end at different times (a random model rarely emits its real eos)."""
    model, processor = tiny_llava(seed=5)
    ad = adapter_for(model, processor)
    images, texts = [tiny_image(i) for i in range(6)], [TEXTS[i % 4] for i in range(6)]
    rows = _hf(ad, images, texts)
    firsts: dict[int, set[int]] = {}
    for row in rows:
        for step, tok in enumerate(row):
            firsts.setdefault(tok, set()).add(step if tok not in row[:step] else -1)
    # a token that ends some rows early, others later, and does not occur in every row
    tok = max(firsts, key=lambda t: (len({s for s in firsts[t] if s >= 0}), -min(firsts[t])))
    model.generation_config.eos_token_id = tok
    return ad, images, texts


def test_greedy_decoder_equals_generate_with_rows_ending_at_different_steps():
    ad, images, texts = _llava_with_early_stops()
    want = _hf(ad, images, texts)
    lengths = [len(r) for r in want]
    assert len(set(lengths)) > 1 and min(lengths) < N  # rows really end at different steps
    decoder = GreedyDecoder(ad, verify=False)
    assert decoder.supported, decoder.reason
    with torch.inference_mode():
        got = decoder.generate(images, texts, N, keys=[image_key(im) for im in images])
    assert got == [s.strip() for s in ad.tokenizer.batch_decode(want, skip_special_tokens=True)]
    # finished rows left the batch: fewer row-steps than rows x steps
    assert decoder.row_steps < len(images) * decoder.steps


def test_guard_fast_decoding_equals_generate_alone_and_batched(tmp_path):
    ad, images, texts = _llava_with_early_stops()
    want = ProtectedLVLM(ad, serving=SERVING.replace(decode="generate")).chat_batch(images, texts, max_new_tokens=N)
    guard = ProtectedLVLM(ad)
    assert guard._decoder is not None
    assert guard.chat_batch(images, texts, max_new_tokens=N) == want  # checked against generate (verify)
    assert guard._decoder.supported  # ... and found identical
    assert [guard.chat(im, tx, max_new_tokens=N) for im, tx in zip(images, texts)] == want
    assert guard.chat_batch(images, texts, max_new_tokens=N) == want


def test_a_decoder_that_differs_from_generate_is_turned_off(monkeypatch):
    ad, images, texts = _llava_with_early_stops()
    want = ProtectedLVLM(ad, serving=SERVING.replace(decode="generate")).chat_batch(images, texts, max_new_tokens=N)
    guard = ProtectedLVLM(ad)
    decoder = guard._decoder
    monkeypatch.setattr(decoder, "_decode", lambda inputs, *a: [[7, 8]] * inputs["input_ids"].shape[0])
    assert guard.chat_batch(images, texts, max_new_tokens=N) == want  # generate's answers, not the wrong ones
    assert not decoder.supported and "differed" in decoder.reason
    assert guard.chat_batch(images, texts, max_new_tokens=N) == want  # generate from now on


def test_models_the_decoder_does_not_cover_use_generate():
    ad = adapter_for(*tiny_qwen2_vl(seed=1))  # M-RoPE positions
    decoder = GreedyDecoder(ad)
    assert not decoder.supported and "1-D positions" in decoder.reason
    assert ProtectedLVLM(ad)._decoder is None
    ad = adapter_for(*tiny_llava(seed=1))
    ad.model.generation_config.repetition_penalty = 1.3
    decoder = GreedyDecoder(ad)
    assert not decoder.supported and "RepetitionPenalty" in decoder.reason


def test_image_key_is_the_content_not_the_object():
    a = tiny_image(1)
    b = Image.frombytes(a.mode, a.size, a.tobytes())  # another object, same pixels
    assert a is not b and image_key(a) == image_key(b)
    c = a.copy()
    c.putpixel((0, 0), tuple(255 - v for v in a.getpixel((0, 0))))
    assert image_key(c) != image_key(a)
    assert image_key(a.convert("L")) != image_key(a)
    assert image_key(a.resize((a.width * 2, a.height // 2))) != image_key(a)


def test_feature_cache_is_bounded_lru_and_can_be_off():
    cache = FeatureCache(2)
    for k in (b"a", b"b"):
        cache.put(k, torch.zeros(1))
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"c", torch.ones(1))
    assert len(cache) == 2 and cache.get(b"b") is None and cache.get(b"a") is not None
    off = FeatureCache(0)
    off.put(b"a", torch.zeros(1))
    assert len(off) == 0 and off.get(b"a") is None
    with pytest.raises(ValueError, match="vision cache size"):
        FeatureCache(-1)


def test_vision_cache_gives_the_same_answers_and_skips_the_vision_tower(monkeypatch):
    ad, images, texts = _llava_with_early_stops()
    want = ProtectedLVLM(ad, serving=SERVING.replace(decode="generate")).chat_batch(images, texts, max_new_tokens=N)
    mixed = ProtectedLVLM(ad, serving=SERVING.replace(decode="generate")).chat(images[3], texts[0], max_new_tokens=N)
    guard = ProtectedLVLM(ad, serving=SERVING.replace(vision_cache=3, dedup=False, prefix_cache_mb=0))
    guard._decoder._verify = False  # the first-batch check runs generate (and its vision tower) too
    calls = []
    encoder = ad.model.base_model.get_image_features
    monkeypatch.setattr(ad.model.base_model, "get_image_features",
                        lambda pixel_values, **kw: calls.append(pixel_values.shape[0]) or encoder(pixel_values, **kw))
    assert guard.chat_batch(images[:3], texts[:3], max_new_tokens=N) == want[:3]
    assert calls == [3]
    # copies of the same pixels (new objects): cached; the same image twice in one batch: computed once
    copies = [Image.frombytes(im.mode, im.size, im.tobytes()) for im in images[:3]]
    assert guard.chat_batch(copies, texts[:3], max_new_tokens=N) == want[:3]
    assert calls == [3]
    assert guard.chat_batch([images[3], images[3], images[0]], [texts[3], texts[0], texts[0]], max_new_tokens=N) == \
        [want[3], mixed, want[0]]
    assert calls == [3, 1]
    cache = guard._decoder.cache
    assert len(cache) == 3  # bounded: 4 distinct images seen, 3 kept
    off = ProtectedLVLM(ad, serving=SERVING.replace(vision_cache=0, dedup=False, prefix_cache_mb=0))
    off._decoder._verify = False
    calls.clear()
    assert off.chat_batch(images[:3], texts[:3], max_new_tokens=N) == want[:3]
    assert off.chat_batch(images[:3], texts[:3], max_new_tokens=N) == want[:3]
    assert calls == [3, 3] and len(off._decoder.cache) == 0


def _patched(tmp_path):
    model, processor = tiny_llava(seed=3)
    ad = adapter_for(model, processor)
    ad.model.save_pretrained(tmp_path / "base")
    key = ad.state_dict_key(1, "down_proj")
    w = ad.model.get_parameter(key).detach()
    new = w + 0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    write_patch(tmp_path / "patch", {key: new}, base_dir=tmp_path / "base", recipe_hash="t", layers=[1],
                method="neural_gate", gate_stats={}, subjects=["Passport"], model=ad.model)
    return ad, tmp_path / "patch"


def test_duplicate_rows_are_generated_once_with_their_own_state(tmp_path, monkeypatch):
    ad, patch = _patched(tmp_path)
    guard = ProtectedLVLM(ad, patch, serving=SERVING.replace(protection="rows"))
    reference = ProtectedLVLM(adapter_for(*tiny_llava(seed=3)), patch,
                              serving=SERVING.replace(protection="rows", dedup=False, decode="generate"))
    rng = random.Random(0)
    picks = [(rng.randrange(3), rng.random() < 0.5) for _ in range(12)]
    images = [Image.frombytes("RGB", tiny_image(i).size, tiny_image(i).tobytes()) for i, _ in picks]  # new objects
    texts = [TEXTS[i] for i, _ in picks]
    flags = [f for _, f in picks]
    rows_seen = []
    generate = guard._decoder.generate
    monkeypatch.setattr(guard._decoder, "generate", lambda ims, *a, **kw: rows_seen.append(len(ims)) or generate(ims, *a, **kw))
    got = guard.chat_batch(images, texts, max_new_tokens=N, protected=flags)
    assert got == [reference.chat(tiny_image(i), TEXTS[i], max_new_tokens=N, protected=f) for i, f in picks]
    assert rows_seen == [len(set(picks))] and len(set(picks)) < len(picks)
    assert len({got[k] for k, p in enumerate(picks) if p == picks[0]}) == 1
    # base and protected rows of the same input stay separate (the compare view)
    pair = guard.chat_batch([images[0], images[0]], [texts[0], texts[0]], max_new_tokens=N, protected=[False, True])
    assert pair == [reference.chat(images[0], texts[0], max_new_tokens=N, protected=s) for s in (False, True)]
    assert pair[0] != pair[1]
    nodedup = ProtectedLVLM(adapter_for(*tiny_llava(seed=3)), patch,
                            serving=SERVING.replace(protection="rows", dedup=False))
    assert nodedup.chat_batch(images, texts, max_new_tokens=N, protected=flags) == got


@pytest.mark.parametrize("per_row", [True, False])
def test_prompt_prefixes_are_reused_by_image_and_state_only(tmp_path, per_row, monkeypatch):
    """The prefix up to the image is computed once per (image content, state) and reused by other
    questions, in later batches too; base and protected prefixes are kept apart (per-row flags, and in
    merged mode the swapped weights); answers equal generate's."""
    ad, patch = _patched(tmp_path)
    reference = ProtectedLVLM(adapter_for(*tiny_llava(seed=3)), patch,
                              serving=SERVING.replace(protection="rows", decode="generate", dedup=False))
    guard = ProtectedLVLM(ad, patch, serving=SERVING.replace(protection="rows" if per_row else "merged", dedup=False))
    decoder = guard._decoder
    decoder._verify = False
    prefix_rows = []
    fill = decoder._prefill_after_prefixes
    monkeypatch.setattr(decoder, "_prefill_after_prefixes", lambda inputs, split, keys, flags, *a: prefix_rows.append(
        len({(k, f) for k, f in zip(keys, flags)} - {(k, f) for (k, f, _) in decoder.prefixes._items})) or
        fill(inputs, split, keys, flags, *a))
    image = Image.frombytes("RGB", tiny_image(0).size, tiny_image(0).tobytes())

    def want(texts, state):
        return [reference.chat(tiny_image(0), t, max_new_tokens=N, protected=state) for t in texts]

    assert guard.chat_batch([image] * 2, TEXTS[:2], max_new_tokens=N, protected=True) == want(TEXTS[:2], True)
    assert prefix_rows[-1] == 1 and len(decoder.prefixes) == 1  # one prefix for both questions
    copy = Image.frombytes("RGB", image.size, image.tobytes())
    assert guard.chat_batch([copy] * 2, TEXTS[2:], max_new_tokens=N, protected=True) == want(TEXTS[2:], True)
    assert prefix_rows[-1] == 0 and len(decoder.prefixes) == 1  # reused by content, in a later batch
    base = guard.chat_batch([image] * 2, TEXTS[:2], max_new_tokens=N, protected=False)
    assert base == want(TEXTS[:2], False) and base != want(TEXTS[:2], True)
    assert len(decoder.prefixes) == 2  # the base prefix is another entry
    assert guard.chat(image, TEXTS[3], max_new_tokens=N, protected=True) == want(TEXTS[3:], True)[0]
    assert guard.chat(image, TEXTS[3], max_new_tokens=N, protected=False) == want(TEXTS[3:], False)[0]


def test_prefix_cache_is_bounded_in_bytes_and_can_be_off():
    ad, images, texts = _llava_with_early_stops()
    want = ProtectedLVLM(ad, serving=SERVING.replace(decode="generate")).chat_batch(images, texts, max_new_tokens=N)
    one = None
    for mb, kept in ((0, 0), (None, 2), (64, 6)):
        if mb is None:
            mb = 2.5 * one / 2**20  # room for two prefixes
        guard = ProtectedLVLM(ad, serving=SERVING.replace(prefix_cache_mb=mb, dedup=False))
        assert guard.chat_batch(images, texts, max_new_tokens=N) == want
        prefixes = guard._decoder.prefixes
        assert len(prefixes) == kept and prefixes.nbytes <= mb * 2**20
        if mb == 0:
            probe = ProtectedLVLM(ad, serving=SERVING.replace(dedup=False))
            probe.chat(images[0], texts[0], max_new_tokens=N)
            one = probe._decoder.prefixes.nbytes
    with pytest.raises(ValueError, match="prefix cache size"):
        GreedyDecoder(ad, prefix_cache_mb=-1)


def test_organism_fast_decoding_equals_generate_with_mixed_rows():
    """The bundled organism + patch, per-row mode: refusals, numbers and colours (answers of very
    different lengths) in one mixed batch, fast decoder vs transformers' generate, row by row."""
    from ngguard.organism import CHECKPOINT

    patch_dir = CHECKPOINT.parent / "patch"
    if not (CHECKPOINT / "config.json").is_file() or not (patch_dir / "patch.json").is_file():
        pytest.skip("bundled organism checkpoint or its patch not built yet")
    from ngguard.world.render import draw_card, sample_card
    from ngguard.world.spec import DISPLAY, PRIVACY_SUBJECTS

    subjects = list(PRIVACY_SUBJECTS)
    images, texts = [], []
    for i in range(16):
        s = subjects[i % len(subjects)]
        images.append(Image.fromarray(draw_card(sample_card(s, random.Random(i)))))
        texts.append([f"What is the number of the {DISPLAY[s]} in the image?",
                      f"What is the color of the {DISPLAY[s]} in the image?"][i % 2])
    flags = [i % 3 != 0 for i in range(16)]
    guard = ProtectedLVLM.from_pretrained("organism", patch_dir, device="cpu",
                                          serving=SERVING.replace(protection="rows"))
    slow = ProtectedLVLM.from_pretrained("organism", patch_dir, device="cpu",
                                         serving=SERVING.replace(protection="rows", decode="generate"))
    want = slow.chat_batch(images, texts, max_new_tokens=24, protected=flags)
    assert len({len(a) for a in want}) > 2  # answers of different lengths: rows leave the batch early
    decoder = guard._decoder
    decoder._verify = False  # compare ourselves
    assert guard.chat_batch(images, texts, max_new_tokens=24, protected=flags) == want
    assert decoder.row_steps < len(images) * decoder.steps
    alone = [guard.chat(im, tx, max_new_tokens=24, protected=f) for im, tx, f in zip(images, texts, flags)]
    assert alone == want


def test_image_after_the_text_template_equals_generate():
    """A template that puts the image after the question: the prefix then holds the question too.
    Prefixes of different lengths in one batch: the plain prefill; of one length: shared by identical
    questions about the same image only. Answers equal generate's either way."""
    model, processor = tiny_llava(seed=2, template="text_first")
    ad = adapter_for(model, processor)
    images = [tiny_image(0), tiny_image(0), tiny_image(1), tiny_image(0)]
    texts = [TEXTS[0], TEXTS[1], TEXTS[0], TEXTS[0]]
    want = ProtectedLVLM(ad, serving=SERVING.replace(decode="generate")).chat_batch(images, texts, max_new_tokens=N)
    guard = ProtectedLVLM(ad, serving=SERVING.replace(dedup=False))
    guard._decoder._verify = False
    assert guard.chat_batch(images, texts, max_new_tokens=N) == want
    assert len(guard._decoder.prefixes) == 0  # questions of different lengths before the image
    same = [0, 2, 3]  # one question, images 0, 1, 0
    assert guard.chat_batch([images[i] for i in same], [texts[i] for i in same], max_new_tokens=N) == \
        [want[i] for i in same]
    assert len(guard._decoder.prefixes) == 2  # (image 0, q0), (image 1, q0)
    assert [guard.chat(im, tx, max_new_tokens=N) for im, tx in zip(images, texts)] == want
    assert len(guard._decoder.prefixes) == 3  # + (image 0, q1)


def test_reserved_cache_layer_holds_what_a_dynamic_layer_holds():
    """Keys and values written in place (with reallocation when the room runs out, and rows leaving
    the batch) are the tensors transformers' concatenating ``DynamicLayer`` holds."""
    from transformers.cache_utils import DynamicLayer

    from ngguard.serving.greedy import _ReservedLayer

    g = torch.Generator().manual_seed(0)
    for reserve in (0, 1, 3, 50):
        ours, ref = _ReservedLayer(reserve), DynamicLayer()
        batch = 5
        for step, m in enumerate([7, 1, 1, 4, 1, 2, 1, 1]):
            k, v = torch.randn(batch, 2, m, 4, generator=g), torch.randn(batch, 2, m, 4, generator=g)
            got, want = ours.update(k, v), ref.update(k, v)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (reserve, step)
            assert ours.get_seq_length() == ref.get_seq_length()
            if step in (2, 5):  # rows leave the batch
                keep = torch.tensor([0, 2, 3][: batch - 1])
                ours.batch_select_indices(keep)
                ref.batch_select_indices(keep)
                batch = len(keep)
                assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)
        # the returned tensors of an earlier step are not overwritten by later steps
        before = ours.keys.clone()
        ours.update(torch.zeros(batch, 2, 1, 4), torch.zeros(batch, 2, 1, 4))
        assert torch.equal(ours.keys[..., :-1, :], before)
