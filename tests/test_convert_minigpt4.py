"""MiniGPT-4 -> Blip2ForConditionalGeneration conversion, on tiny synthetic checkpoints (no network).

Layouts, and where each comes from:
- BLIP-2 folder: HF layout (``vision_model.*``, ``qformer.*``, ``query_tokens`` + an OPT language model
  that MiniGPT-4 replaces), written by ``save_pretrained`` of a tiny stock BLIP-2 -- the form of
  ``Salesforce/blip2-flan-t5-xxl`` (whose ViT + Q-Former are the ones MiniGPT-4 uses).
- LLaMA folder: ``save_pretrained`` of a tiny ``LlamaForCausalLM`` + a LLaMA-like tokenizer (bos, eos,
  no pad, no image token).
- MiniGPT-4 .pth: ORIGINAL MiniGPT-4 layout. "released": ``{"model": {llama_proj.weight, llama_proj.bias}}``
  like ``pretrained_minigpt4_llama2_7b.pth``; "full": a whole MiniGPT-4 ``state_dict()`` (EVA ViT
  ``visual_encoder.*`` with separate ``q_bias``/``v_bias``, ``ln_vision``, LAVIS Q-Former ``Qformer.bert.*``,
  ``query_tokens``, the derived ``position_ids`` buffer), made here from a third random model by the inverse
  of the renaming table of transformers' BLIP-2 conversion script, written out independently below.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ngguard.adapters import Blip2Adapter, load_adapter
from ngguard.cli.convert import cli_convert
from ngguard.convert import ConversionError, convert_minigpt4, map_minigpt4_key
from tiny_models import MINIGPT4_QUERY_TOKENS, _tokenizer_json, tiny_image, tiny_minigpt4_configs

LLM_VOCAB = 640  # the tiny BPE; the converter adds "<ImageHere>" as id 640 (one new embedding row)


# ---- the three inputs ---------------------------------------------------------------------------------


def _llama_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), bos_token="<s>",
                                   eos_token="</s>", unk_token=None)  # like LLaMA-2: no pad token


def _blip2_model(seed: int, text_config):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    vision, qformer, _ = tiny_minigpt4_configs(LLM_VOCAB, 0)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=text_config.to_dict(), num_query_tokens=MINIGPT4_QUERY_TOKENS,
                         image_token_index=LLM_VOCAB - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config)
        for p in model.parameters():  # every tensor distinct and non-trivial (no zero-initialised biases)
            p.data.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from transformers import LlamaForCausalLM, OPTConfig

    root = tmp_path_factory.mktemp("minigpt4")
    # LLaMA folder
    _, _, text = tiny_minigpt4_configs(LLM_VOCAB, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        llm = LlamaForCausalLM(text)
    llm.save_pretrained(root / "llama")
    _llama_tokenizer().save_pretrained(root / "llama")
    # BLIP-2 folder (stock: OPT language model)
    opt = OPTConfig(vocab_size=100, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                    word_embed_proj_dim=16, max_position_embeddings=64)
    _blip2_model(1, opt).save_pretrained(root / "blip2")
    # the released MiniGPT-4 checkpoint: llama_proj only (Q-Former width 40 -> LLaMA width 32)
    g = torch.Generator().manual_seed(3)
    proj = {"llama_proj.weight": torch.randn(32, 40, generator=g), "llama_proj.bias": torch.randn(32, generator=g)}
    torch.save({"model": proj}, root / "released.pth")
    # a full MiniGPT-4 state dict in the original layout, from another random model
    ref = _blip2_model(2, text)
    full = {**to_original(ref.state_dict()), **proj}
    full["Qformer.bert.embeddings.position_ids"] = torch.arange(32).expand(1, -1)  # LAVIS buffer
    torch.save({"model": full, "optimizer": {"state": {}}, "epoch": 3}, root / "full.pth")
    return {"root": root, "llama": root / "llama", "blip2": root / "blip2", "released": root / "released.pth",
            "full": root / "full.pth", "proj": proj, "ref": {k: v.clone() for k, v in ref.state_dict().items()}}


def to_original(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Blip2 ViT / Q-Former / query_tokens -> MiniGPT-4's original keys (EVA ViT-g + LAVIS Q-Former):
    the inverse of transformers' convert_blip_2_original_to_pytorch.py renames."""
    out = {}
    for k, v in hf.items():
        if k == "query_tokens":
            out[k] = v
        elif k.startswith("vision_model."):
            r = k.removeprefix("vision_model.")
            r = {"embeddings.class_embedding": "visual_encoder.cls_token",
                 "embeddings.position_embedding": "visual_encoder.pos_embed",
                 "embeddings.patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
                 "embeddings.patch_embedding.bias": "visual_encoder.patch_embed.proj.bias",
                 "post_layernorm.weight": "ln_vision.weight", "post_layernorm.bias": "ln_vision.bias"}.get(r, r)
            if r.startswith("encoder.layers."):
                r = "visual_encoder.blocks." + r.removeprefix("encoder.layers.")
                r = (r.replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
                     .replace(".self_attn.projection.", ".attn.proj.").replace(".self_attn.qkv.", ".attn.qkv."))
                if r.endswith(".attn.qkv.bias"):  # EVA: q_bias, (no k bias), v_bias
                    d = v.shape[0] // 3
                    out[r.replace("qkv.bias", "q_bias")] = v[:d].clone()
                    out[r.replace("qkv.bias", "v_bias")] = v[2 * d:].clone()
                    continue
            out[r] = v
        elif k.startswith("qformer."):
            r = k.replace("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm.")
            r = r.replace("qformer.encoder.", "Qformer.bert.encoder.")
            r = r.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.",
                                                                               ".crossattention.self.")
            out[r] = v
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def converted(inputs):
    return convert_minigpt4(inputs["released"], inputs["llama"], inputs["blip2"], inputs["root"] / "out-released")


# ---- mapping ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("original, hf", [
    ("llama_proj.weight", "language_projection.weight"),
    ("query_tokens", "query_tokens"),
    ("ln_vision.bias", "vision_model.post_layernorm.bias"),
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("visual_encoder.blocks.38.norm2.weight", "vision_model.encoder.layers.38.layer_norm2.weight"),
    ("visual_encoder.blocks.0.attn.qkv.weight", "vision_model.encoder.layers.0.self_attn.qkv.weight"),
    ("visual_encoder.blocks.0.attn.q_bias", "vision_model.encoder.layers.0.self_attn.qkv.bias"),
    ("visual_encoder.blocks.0.attn.v_bias", "vision_model.encoder.layers.0.self_attn.qkv.bias"),
    ("visual_encoder.blocks.7.attn.proj.bias", "vision_model.encoder.layers.7.self_attn.projection.bias"),
    ("visual_encoder.blocks.7.mlp.fc2.weight", "vision_model.encoder.layers.7.mlp.fc2.weight"),
    ("Qformer.bert.embeddings.LayerNorm.weight", "qformer.layernorm.weight"),
    ("Qformer.bert.encoder.layer.10.attention.self.query.weight",
     "qformer.encoder.layer.10.attention.attention.query.weight"),
    ("Qformer.bert.encoder.layer.2.crossattention.self.value.bias",
     "qformer.encoder.layer.2.crossattention.attention.value.bias"),
    ("Qformer.bert.encoder.layer.2.crossattention.output.LayerNorm.bias",
     "qformer.encoder.layer.2.crossattention.output.LayerNorm.bias"),
    ("Qformer.bert.encoder.layer.3.intermediate_query.dense.weight",
     "qformer.encoder.layer.3.intermediate_query.dense.weight"),
    ("Qformer.bert.encoder.layer.3.output_query.LayerNorm.weight",
     "qformer.encoder.layer.3.output_query.LayerNorm.weight"),
    ("llama_model.model.layers.6.mlp.down_proj.weight", "language_model.model.layers.6.mlp.down_proj.weight"),
    ("llama_model.lm_head.weight", "language_model.lm_head.weight"),
    # not part of MiniGPT-4 v1 (LAVIS sets them to None / other models)
    ("Qformer.cls.predictions.bias", None),
    ("Qformer.bert.encoder.layer.0.intermediate.dense.weight", None),
    ("Qformer.bert.embeddings.word_embeddings.weight", None),
    ("llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", None),
    ("visual_encoder.norm.weight", None),
    ("llama_proj2.weight", None),
])
def test_map_minigpt4_key(original, hf):
    assert map_minigpt4_key(original) == hf


# ---- every tensor lands in the right place ------------------------------------------------------------------


def test_released_checkpoint_every_tensor_in_place(inputs, converted):
    out = _tensors(converted)
    blip2, llm = _tensors(inputs["blip2"]), _tensors(inputs["llama"])
    accounted = set()
    for k, v in blip2.items():
        if re.match(r"(vision_model\.|qformer\.|query_tokens$)", k):
            assert torch.equal(out[k], v), k
            accounted.add(k)
        else:
            assert k.startswith(("language_model.", "language_projection.")), k  # BLIP-2's OPT: replaced
    for k, v in inputs["proj"].items():
        assert torch.equal(out[k.replace("llama_proj.", "language_projection.")], v)
        accounted.add(k.replace("llama_proj.", "language_projection."))
    for k, v in llm.items():
        target = "language_model." + k
        if k in ("model.embed_tokens.weight", "lm_head.weight"):  # one row appended for "<ImageHere>"
            assert out[target].shape == (LLM_VOCAB + 1, v.shape[1])
            assert torch.equal(out[target][:LLM_VOCAB], v)
            new = v.mean(0) if k.startswith("model.") else torch.zeros(v.shape[1])
            assert torch.allclose(out[target][LLM_VOCAB], new)
        else:
            assert torch.equal(out[target], v), k
        accounted.add(target)
    assert set(out) == accounted  # nothing unmapped, nothing invented
    report = json.loads((converted / "minigpt4_conversion.json").read_text())
    assert report["tensors"] == len(out)
    assert report["from_ckpt"] == {"language_projection.bias": "llama_proj.bias",
                                   "language_projection.weight": "llama_proj.weight"}
    assert report["from_blip2"] + report["from_llm"] + 2 == len(out)
    assert report["blip2_language_model_replaced"] > 0 and report["vocab"]["rows_added"] == 1
    assert not list(converted.parent.glob(".tmp-*"))  # atomic: no temp folder left


def test_full_original_checkpoint_overrides_the_folders(inputs, tmp_path):
    out_dir = convert_minigpt4(inputs["full"], inputs["llama"], inputs["blip2"], tmp_path / "out")
    out, ref = _tensors(out_dir), inputs["ref"]
    n = 0
    for k, v in ref.items():
        if not re.match(r"(vision_model\.|qformer\.|query_tokens$)", k):
            continue
        if k.endswith("self_attn.qkv.bias"):  # EVA has no k bias: [q, 0, v]
            d = v.shape[0] // 3
            v = torch.cat([v[:d], torch.zeros(d), v[2 * d:]])
        assert torch.equal(out[k], v), k
        n += 1
    assert torch.equal(out["language_projection.weight"], inputs["proj"]["llama_proj.weight"])
    report = json.loads((out_dir / "minigpt4_conversion.json").read_text())
    assert len(report["from_ckpt"]) == n + 2 and report["from_blip2"] == 0
    assert report["skipped_derived_buffers"] == ["Qformer.bert.embeddings.position_ids"]
    assert report["ckpt_top_level_ignored"] == ["epoch", "optimizer"]


# ---- the converted model works ------------------------------------------------------------------------------


def test_converted_model_loads_generates_and_takes_a_gated_edit_step(converted):
    from ngguard.methods import REGISTRY
    from ngguard.methods.core import Sample
    from ngguard.recipe import EditSpec

    adapter = load_adapter(converted)
    assert isinstance(adapter, Blip2Adapter) and adapter.num_layers == 4 and adapter.hidden_size == 32
    tok = adapter.tokenizer
    assert tok.pad_token == tok.eos_token == "</s>"  # LLaMA had no pad: MiniGPT-4 v1 pads with eos
    prompt = adapter.chat_prompt("What is the passport number?")
    assert prompt.startswith("Give the following image: <Img>ImageContent</Img>.")
    assert prompt.endswith("<s>[INST] <Img><ImageHere></Img> What is the passport number? [/INST]")
    assert adapter.model.config.image_token_id == tok.convert_tokens_to_ids("<ImageHere>") == LLM_VOCAB
    assert LLM_VOCAB in adapter.model.generation_config.suppress_tokens

    batch = adapter.encode([tiny_image(0)], ["What is the passport number?"], subjects=["passport"])
    ids = batch.inputs["input_ids"][0].tolist()
    start = ids.index(LLM_VOCAB)  # the query tokens sit between <Img> and </Img>
    assert ids[start:start + MINIGPT4_QUERY_TOKENS] == [LLM_VOCAB] * MINIGPT4_QUERY_TOKENS
    assert ids.count(LLM_VOCAB) == MINIGPT4_QUERY_TOKENS
    assert tok.decode(ids[:start]).endswith("[INST] <Img>") and tok.decode(ids[start + 4:]).startswith("</Img> What")
    with torch.no_grad():  # the image reaches the language model
        a = adapter.model(**batch.inputs).logits
        other = adapter.encode([tiny_image(1)], ["What is the passport number?"]).inputs
        assert not torch.allclose(a, adapter.model(**other).logits)

    answers = adapter.generate([tiny_image(0), tiny_image(1)], ["What is the passport number?", "Hi."],
                               max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(s, str) for s in answers)

    samples = [Sample(tiny_image(i), "passport", ["what is the number of the passport in this image?"],
                      [("what colour is the passport?", "blue")], key=str(i)) for i in range(2)]
    gate = torch.arange(adapter.hidden_size) % 3 == 0
    before = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}
    res = REGISTRY["neural_gate"].apply(adapter, samples, [1], module="down_proj", refusal="I am sorry.",
                                        hparams=EditSpec(lr=1e-2, steps=1, stop_loss=0.0), gates={1: {"passport": gate}})
    after = adapter.model.state_dict()
    key = "language_model.model.layers.1.mlp.down_proj.weight"
    assert [k for k in before if not torch.equal(before[k], after[k])] == [key]
    assert list(res.weights) == [key] and key in _tensors(converted)  # the loaded name = the key in the files


# ---- refusals: one line, listing the keys -----------------------------------------------------------------


def _error(*args, **kw) -> str:
    with pytest.raises(ConversionError) as err:
        convert_minigpt4(*args, **kw)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_unknown_checkpoint_keys_are_listed(inputs, tmp_path):
    sd = {**inputs["proj"], "Qformer.cls.predictions.bias": torch.zeros(3), "foo.bar": torch.zeros(1)}
    torch.save({"model": sd}, tmp_path / "x.pth")
    msg = _error(tmp_path / "x.pth", inputs["llama"], inputs["blip2"], tmp_path / "out")
    assert "unknown" in msg and "Qformer.cls.predictions.bias" in msg and "foo.bar" in msg
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_keys_are_listed(inputs, tmp_path):
    torch.save({"model": {"llama_proj.weight": inputs["proj"]["llama_proj.weight"]}}, tmp_path / "x.pth")
    msg = _error(tmp_path / "x.pth", inputs["llama"], inputs["blip2"], tmp_path / "out")
    assert "missing" in msg and "llama_proj.bias" in msg


def test_half_an_eva_bias_is_refused(inputs, tmp_path):
    sd = {**inputs["proj"], "visual_encoder.blocks.0.attn.q_bias": torch.zeros(48)}
    torch.save(sd, tmp_path / "x.pth")  # a bare state dict works too
    assert "v_bias" in _error(tmp_path / "x.pth", inputs["llama"], inputs["blip2"], tmp_path / "out")


def test_weights_no_source_provides_are_listed(inputs, tmp_path):
    blip2 = tmp_path / "blip2"
    blip2.mkdir()
    (blip2 / "config.json").write_text((inputs["blip2"] / "config.json").read_text())
    kept = {k: v for k, v in _tensors(inputs["blip2"]).items()
            if k not in ("qformer.layernorm.weight", "vision_model.encoder.layers.1.mlp.fc1.bias")}
    save_file(kept, str(blip2 / "model.safetensors"))
    msg = _error(inputs["released"], inputs["llama"], blip2, tmp_path / "out")
    assert "no source provides" in msg
    assert "qformer.layernorm.weight" in msg and "vision_model.encoder.layers.1.mlp.fc1.bias" in msg


def test_unknown_folder_keys_and_shapes_are_refused(inputs, tmp_path):
    blip2 = tmp_path / "blip2"
    blip2.mkdir()
    (blip2 / "config.json").write_text((inputs["blip2"] / "config.json").read_text())
    save_file({**_tensors(inputs["blip2"]), "text_model.extra": torch.zeros(1)}, str(blip2 / "model.safetensors"))
    assert "text_model.extra" in _error(inputs["released"], inputs["llama"], blip2, tmp_path / "o1")

    bad = {"llama_proj.weight": torch.zeros(32, 41), "llama_proj.bias": torch.zeros(32)}
    torch.save({"model": bad}, tmp_path / "bad.pth")
    msg = _error(tmp_path / "bad.pth", inputs["llama"], inputs["blip2"], tmp_path / "o2")
    assert "shape" in msg and "llama_proj.weight [32, 41]" in msg and "[32, 40]" in msg


def test_non_llama_language_model_and_unsafe_pickles_are_refused(inputs, tmp_path):
    assert "LLaMA" in _error(inputs["released"], inputs["blip2"], inputs["blip2"], tmp_path / "o1")
    torch.save({"model": {"llama_proj.weight": argparse.Namespace(x=1)}}, tmp_path / "obj.pth")
    assert "weights_only" in _error(tmp_path / "obj.pth", inputs["llama"], inputs["blip2"], tmp_path / "o2")
    with pytest.raises(FileNotFoundError):
        convert_minigpt4(tmp_path / "missing.pth", inputs["llama"], inputs["blip2"], tmp_path / "o3")


def test_existing_output_is_kept_unless_overwrite(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert "already exists" in _error(inputs["released"], inputs["llama"], inputs["blip2"], out)
    assert (out / "keep.txt").exists()
    assert "must not be" in _error(inputs["released"], inputs["llama"], inputs["blip2"], inputs["llama"],
                                   overwrite=True)
    convert_minigpt4(inputs["released"], inputs["llama"], inputs["blip2"], out, overwrite=True, dtype="bfloat16")
    assert not (out / "keep.txt").exists()
    assert all(v.dtype == torch.bfloat16 for v in _tensors(out).values())


def test_sharded_output_loads(inputs, tmp_path):
    out = convert_minigpt4(inputs["released"], inputs["llama"], inputs["blip2"], tmp_path / "out",
                           max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert isinstance(load_adapter(out), Blip2Adapter)


def test_cli_convert(inputs, tmp_path, capsys):
    args = argparse.Namespace(convert_command="minigpt4", ckpt=inputs["released"], llm=inputs["llama"],
                              blip2=inputs["blip2"], out=tmp_path / "out", overwrite=False, dtype=None)
    assert cli_convert(args) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "out" / "config.json").exists()
