"""Patches: fingerprint, write, apply, revert, verify, in-place swap; byte-exactness and refusals."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ngguard.patch as P
from ngguard.cli.patch import cli_patch
from ngguard.patch import (
    PatchError,
    apply_patch,
    base_fingerprint,
    checkpoint_to_model_names,
    patch_state_dict,
    revert_patch,
    verify_patch,
    write_patch,
)

DOWN = "model.layers.1.mlp.down_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"


def tiny_llama(seed: int = 0, *, layers: int = 2, hidden: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def save_base(model, path: Path, *, shard: str | None = None) -> Path:
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    # non-weight files a real checkpoint carries (tokenizer, chat template, nested folder)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    (path / "chat_template.jinja").write_text("{{ messages }}\n")
    (path / "extra").mkdir()
    (path / "extra" / "notes.txt").write_text("kept as is\n")
    return path


def sha_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tensor_bytes(folder: Path) -> dict[str, bytes]:
    """name -> raw bytes of every tensor in the folder's weights."""
    locs = P._locate(folder)
    out = {}
    for name, loc in locs.items():
        with open(loc.file, "rb") as fh:
            fh.seek(loc.start)
            out[name] = fh.read(loc.nbytes)
    return out


def edited(base_dir: Path, names=(DOWN,), delta: float = 0.5) -> dict[str, torch.Tensor]:
    out = {}
    for n in names:
        loc = P._locate(base_dir)[n]
        with safe_open(str(loc.file), "pt") as fh:
            t = fh.get_tensor(n).float()
        out[n] = t + delta  # float32 on purpose: write_patch casts to the base dtype
    return out


def make_patch(base_dir: Path, out: Path, names=(DOWN,), **kw) -> dict:
    args = dict(base_dir=base_dir, recipe_hash="0123456789abcdef", layers=[1], method="neural_gate",
                gate_stats={"Passport": {"strong": 3, "share": torch.tensor(0.25)}}, subjects=["Passport"])
    args.update(kw)
    return write_patch(out, edited(base_dir, names), **args)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {
        "plain": save_base(tiny_llama(0), root / "plain"),
        "sharded": save_base(tiny_llama(0), root / "sharded", shard="10KB"),
        "bf16": save_base(tiny_llama(0).to(torch.bfloat16), root / "bf16"),
        "other": save_base(tiny_llama(1), root / "other"),
        "smaller": save_base(tiny_llama(0, layers=1), root / "smaller"),
        "narrow": save_base(tiny_llama(0, hidden=8), root / "narrow"),
    }


# ---- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_is_layout_independent_and_content_sensitive(bases, tmp_path):
    fp = base_fingerprint(bases["plain"])
    assert len(fp) == 64 and fp == base_fingerprint(bases["plain"])
    assert len(list(bases["sharded"].glob("*.safetensors"))) > 2
    assert base_fingerprint(bases["sharded"]) == fp  # same tensors, other shards
    assert base_fingerprint(bases["other"]) != fp
    assert base_fingerprint(bases["bf16"]) != fp  # dtype enters
    with pytest.raises(PatchError, match="no \\*.safetensors weights"):
        base_fingerprint(tmp_path)


def test_fingerprint_streams_raw_bytes_without_torch_loading(bases, monkeypatch):
    # the fingerprint must not materialise tensors (a 7B checkpoint would not fit)
    monkeypatch.setattr(P, "safe_open", None)
    monkeypatch.setattr("safetensors.torch.load_file", None)
    assert base_fingerprint(bases["sharded"]) == base_fingerprint(bases["plain"])


# ---- write ---------------------------------------------------------------------------------------


def test_write_patch_manifest_and_determinism(bases, tmp_path):
    m = make_patch(bases["plain"], tmp_path / "p1", names=(DOWN, UP), layers=[0, 1])
    m2 = make_patch(bases["plain"], tmp_path / "p2", names=(UP, DOWN), layers=[1, 0])
    for f in ("patch.safetensors", "base.safetensors", "patch.json"):
        assert sha_file(tmp_path / "p1" / f) == sha_file(tmp_path / "p2" / f), f  # same inputs, same bytes
    assert m == m2
    assert m["patch_id"] == sha_file(tmp_path / "p1" / "patch.safetensors")[:12]
    assert m["base"]["fingerprint"] == base_fingerprint(bases["plain"])
    assert m["base"]["config_class"] == "LlamaConfig" and m["base"]["architectures"] == ["LlamaForCausalLM"]
    assert sorted(m["tensors"]) == sorted([DOWN, UP])
    base_vals = tensor_bytes(bases["plain"])
    for n, info in m["tensors"].items():
        assert info["base_sha256"] == hashlib.sha256(base_vals[n]).hexdigest()
        assert info["sha256"] != info["base_sha256"]
        assert info["dtype"] == "F32"
    assert m["layers"] == [0, 1] and m["method"] == "neural_gate" and m["subjects"] == ["Passport"]
    assert m["gate_stats"] == {"Passport": {"strong": 3, "share": 0.25}}
    assert m["created_by"].startswith("ngguard ")
    text = (tmp_path / "p1" / "patch.json").read_text()
    assert "time" not in text and "date" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p1", "p2"]  # no temp folders left


def test_patch_keeps_base_dtype(bases, tmp_path):
    m = make_patch(bases["bf16"], tmp_path / "p")
    assert m["tensors"][DOWN]["dtype"] == "BF16"
    with safe_open(str(tmp_path / "p" / "patch.safetensors"), "pt") as fh:
        t = fh.get_tensor(DOWN)
    assert t.dtype == torch.bfloat16
    expect = edited(bases["bf16"])[DOWN].to(torch.bfloat16)
    assert torch.equal(t, expect)


def test_write_patch_refuses_bad_input(bases, tmp_path):
    base = bases["plain"]
    common = dict(base_dir=base, recipe_hash="x", layers=[1], method="no_gate", gate_stats={}, subjects=[])
    with pytest.raises(PatchError, match=r"tensor nope\.weight is not in the base checkpoint .*pass model="):
        write_patch(tmp_path / "a", {"nope.weight": torch.zeros(1)}, **common)
    with pytest.raises(PatchError, match=r"shape \[2, 2\] does not match the base's \[16, 32\]"):
        write_patch(tmp_path / "a", {DOWN: torch.zeros(2, 2)}, **common)
    bad = edited(base)[DOWN]
    bad[0, 0] = float("nan")
    with pytest.raises(PatchError, match="non-finite"):
        write_patch(tmp_path / "a", {DOWN: bad}, **common)
    with pytest.raises(PatchError, match="cannot store object in patch.json"):
        write_patch(tmp_path / "a", edited(base), **dict(common, gate_stats={"x": object()}))
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []


# ---- apply / revert --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "sharded"])
def test_apply_changes_only_patched_tensors_and_revert_is_byte_exact(bases, tmp_path, kind):
    base = bases[kind]
    m = make_patch(base, tmp_path / "patch", names=(DOWN, UP), layers=[0, 1])
    out = tmp_path / "patched"
    r = apply_patch(base, tmp_path / "patch", out)
    assert r["patch_id"] == m["patch_id"]

    before, after = tensor_bytes(base), tensor_bytes(out)
    assert before.keys() == after.keys()
    new = edited(base, (DOWN, UP))
    for name in before:
        if name in (DOWN, UP):
            assert after[name] != before[name]
            assert after[name] == P._tensor_bytes(new[name])
        else:
            assert after[name] == before[name], name
    # non-weight files and untouched shards are byte-identical copies; the rest only differ in tensor bytes
    touched = {P._locate(base)[n].file.name for n in (DOWN, UP)}
    for f in sorted(p for p in base.rglob("*") if p.is_file()):
        g = out / f.relative_to(base)
        assert g.is_file(), g
        assert (sha_file(f) == sha_file(g)) == (f.name not in touched), f.name
        assert f.stat().st_size == g.stat().st_size
    if kind == "sharded":
        assert len(touched) < len(list(base.glob("*.safetensors")))
    assert base_fingerprint(out) == m["patched_fingerprint"]

    # the output is an ordinary checkpoint
    from transformers import LlamaForCausalLM

    loaded = LlamaForCausalLM.from_pretrained(out)
    assert torch.equal(loaded.state_dict()[DOWN], new[DOWN])

    back = tmp_path / "reverted"
    revert_patch(out, tmp_path / "patch", back)
    for f in sorted(p for p in base.rglob("*") if p.is_file()):
        assert sha_file(f) == sha_file(back / f.relative_to(base)), f.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patch", "patched", "reverted"]


def test_corrupted_patch_is_refused(bases, tmp_path):
    make_patch(bases["plain"], tmp_path / "patch")
    f = tmp_path / "patch" / "patch.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # a bit inside the tensor data
    f.write_bytes(bytes(data))
    msg = f"checksum mismatch for tensor {DOWN}: patch file corrupted"
    with pytest.raises(PatchError) as ei:
        apply_patch(bases["plain"], tmp_path / "patch", tmp_path / "out")
    assert str(ei.value) == msg
    with pytest.raises(PatchError, match=msg):
        verify_patch(tmp_path / "patch")
    assert not (tmp_path / "out").exists()


def test_corrupted_base_values_and_header_are_refused(bases, tmp_path):
    make_patch(bases["plain"], tmp_path / "patch")
    b = tmp_path / "patch" / "base.safetensors"
    data = bytearray(b.read_bytes())
    data[-1] ^= 0x80
    b.write_bytes(bytes(data))
    with pytest.raises(PatchError, match=f"checksum mismatch for base tensor {DOWN}: base.safetensors corrupted"):
        verify_patch(tmp_path / "patch")
    f = tmp_path / "patch" / "patch.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(PatchError, match="unreadable safetensors file"):
        verify_patch(tmp_path / "patch")
    (tmp_path / "patch" / "patch.json").write_text("{not json")
    with pytest.raises(PatchError, match="unreadable manifest"):
        verify_patch(tmp_path / "patch")
    with pytest.raises(PatchError, match=r"not a patch folder \(no patch.json\)"):
        verify_patch(bases["plain"])


def test_patch_for_another_base_is_refused(bases, tmp_path):
    m = make_patch(bases["plain"], tmp_path / "patch")
    fp_other = base_fingerprint(bases["other"])
    expected = f"patch {m['patch_id']} was made for base {m['base']['fingerprint'][:12]}, this base is {fp_other[:12]}"
    with pytest.raises(PatchError) as ei:
        apply_patch(bases["other"], tmp_path / "patch", tmp_path / "out")
    assert str(ei.value) == expected
    with pytest.raises(PatchError, match="was made for base"):
        verify_patch(tmp_path / "patch", bases["other"])
    # missing tensor / other shape
    with pytest.raises(PatchError, match=f"tensor {DOWN} is not in"):
        apply_patch(bases["smaller"], tmp_path / "patch", tmp_path / "out")
    with pytest.raises(PatchError, match=r"is F32\[16, 32\] in the patch but F32\[8, 16\] in"):
        apply_patch(bases["narrow"], tmp_path / "patch", tmp_path / "out")
    with pytest.raises(PatchError, match=r"is F32\[16, 32\] in the patch but BF16\[16, 32\] in"):
        apply_patch(bases["bf16"], tmp_path / "patch", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_killed_apply_leaves_nothing(bases, tmp_path, monkeypatch):
    make_patch(bases["sharded"], tmp_path / "patch")
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise RuntimeError("killed")

    monkeypatch.setattr(P, "_copy_range", boom)
    with pytest.raises(RuntimeError, match="killed"):
        apply_patch(bases["sharded"], tmp_path / "patch", tmp_path / "out")
    assert calls  # it did get midway
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patch"]  # no out_dir, no .tmp-*


def test_existing_output_needs_overwrite(bases, tmp_path):
    make_patch(bases["plain"], tmp_path / "patch")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(PatchError, match="already exists .*overwrite"):
        apply_patch(bases["plain"], tmp_path / "patch", out)
    assert (out / "stale.txt").exists()
    apply_patch(bases["plain"], tmp_path / "patch", out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "patch"]
    with pytest.raises(PatchError, match="must not be, contain or lie inside"):
        apply_patch(bases["plain"], tmp_path / "patch", bases["plain"], overwrite=True)
    with pytest.raises(PatchError, match="already exists"):
        make_patch(bases["plain"], tmp_path / "patch")


def test_revert_refusals(bases, tmp_path):
    make_patch(bases["plain"], tmp_path / "patch")
    m = make_patch(bases["plain"], tmp_path / "nobase", include_base=False)
    assert not (tmp_path / "nobase" / "base.safetensors").exists()
    apply_patch(bases["plain"], tmp_path / "nobase", tmp_path / "patched")
    with pytest.raises(PatchError, match=f"patch {m['patch_id']} holds no base values"):
        revert_patch(tmp_path / "patched", tmp_path / "nobase", tmp_path / "out")
    # the base itself is not patched
    with pytest.raises(PatchError, match=f"holds the base values of {DOWN}: it is not patched"):
        revert_patch(bases["plain"], tmp_path / "patch", tmp_path / "out")
    # a patched folder where another tensor was changed too
    make_patch(bases["plain"], tmp_path / "up", names=(UP,), layers=[0])
    with pytest.raises(PatchError, match="was made for base"):  # patches do not stack on a patched folder
        apply_patch(tmp_path / "patched", tmp_path / "up", tmp_path / "twice")
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tmp_path / "patched")
    with torch.no_grad():
        model.state_dict(keep_vars=True)[UP].add_(1.0)
    model.save_pretrained(tmp_path / "tampered")
    with pytest.raises(PatchError, match="other tensors differ"):
        revert_patch(tmp_path / "tampered", tmp_path / "patch", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_verify_report(bases, tmp_path):
    m = make_patch(bases["sharded"], tmp_path / "patch")
    r = verify_patch(tmp_path / "patch")
    assert r["ok"] and r["patch_id"] == m["patch_id"] and r["revertible"] and not r["base_checked"]
    assert r["tensors"] == [DOWN]
    r = verify_patch(tmp_path / "patch", bases["plain"])  # same weights, other sharding: fine
    assert r["base_checked"]
    apply_patch(bases["sharded"], tmp_path / "patch", tmp_path / "patched")
    with pytest.raises(PatchError, match="already holds this patch"):
        verify_patch(tmp_path / "patch", tmp_path / "patched")


# ---- in-place swap on a loaded model, with LLaVA's checkpoint/model name differences ---------------


def test_llava_names_and_state_dict_swap(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from tests.tiny_models import tiny_llava

    model, processor = tiny_llava()
    base = tmp_path / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    key = "model.language_model.layers.1.mlp.down_proj.weight"  # the model's name
    ckpt = "language_model.model.layers.1.mlp.down_proj.weight"  # the name on disk (transformers 5)
    assert key in model.state_dict() and ckpt in P._locate(base)
    assert checkpoint_to_model_names(model, [ckpt]) == {ckpt: key}
    # every checkpoint name maps to a model parameter
    mapping = checkpoint_to_model_names(model, P._locate(base))
    assert len(mapping) == len(P._locate(base))

    new = model.state_dict()[key].clone() + 0.25
    common = dict(base_dir=base, recipe_hash="h", layers=[1], method="neural_gate", gate_stats={}, subjects=["x"])
    with pytest.raises(PatchError, match="pass model="):
        write_patch(tmp_path / "patch", {key: new}, **common)
    m = write_patch(tmp_path / "patch", {key: new}, model=model, **common)
    assert list(m["tensors"]) == [ckpt] and m["base"]["config_class"] == "LlavaConfig"

    out = tmp_path / "patched"
    apply_patch(base, tmp_path / "patch", out)
    others = [f for f in base.rglob("*") if f.is_file() and f.suffix != ".safetensors"]
    assert any("tokenizer" in f.name for f in others) and len(others) >= 4
    for f in others:  # processor, tokenizer, chat template, configs: copied as they are
        assert sha_file(f) == sha_file(out / f.relative_to(base)), f.name
    loaded = LlavaForConditionalGeneration.from_pretrained(out)
    assert torch.equal(loaded.state_dict()[key], new)

    fresh = LlavaForConditionalGeneration.from_pretrained(base)
    orig = fresh.state_dict()[key].clone()
    assert patch_state_dict(fresh, tmp_path / "patch") == [key]
    assert torch.equal(fresh.state_dict()[key], new)
    with pytest.raises(PatchError, match="already holds the patched values"):
        patch_state_dict(fresh, tmp_path / "patch")
    assert patch_state_dict(fresh, tmp_path / "patch", reverse=True) == [key]
    assert torch.equal(fresh.state_dict()[key], orig)
    with pytest.raises(PatchError, match="already holds the base values"):
        patch_state_dict(fresh, tmp_path / "patch", reverse=True)
    # a model of another base is refused
    other, _ = tiny_llava(seed=1)
    with pytest.raises(PatchError, match="neither the base nor the patched values"):
        patch_state_dict(other, tmp_path / "patch")
    # a model loaded in another dtype: values are cast
    half = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.bfloat16)
    patch_state_dict(half, tmp_path / "patch")
    assert torch.equal(half.state_dict()[key], new.to(torch.bfloat16))


def test_half_precision_patch_checks_a_wider_model(tmp_path):
    """An fp16 checkpoint loaded as fp32 (as the organism is): the before-values are still checked
    (cast back to fp16, exactly), so a patch for another base is refused, not silently applied."""
    from transformers import LlavaForConditionalGeneration
    from tiny_models import tiny_llava
    bases = {}
    for seed in (0, 1):
        model, processor = tiny_llava(seed=seed)
        bases[seed] = tmp_path / f"base{seed}"
        model.to(torch.float16).save_pretrained(bases[seed])
        processor.save_pretrained(bases[seed])
    model = LlavaForConditionalGeneration.from_pretrained(bases[0], dtype=torch.float16)
    key = next(k for k in model.state_dict() if k.endswith("layers.1.mlp.down_proj.weight"))
    new = model.state_dict()[key].clone() + 0.25
    write_patch(tmp_path / "patch", {key: new}, model=model, base_dir=bases[0], recipe_hash="h", layers=[1],
                method="neural_gate", gate_stats={}, subjects=["x"])
    wide = LlavaForConditionalGeneration.from_pretrained(bases[0], dtype=torch.float32)
    assert patch_state_dict(wide, tmp_path / "patch") == [key]
    assert torch.equal(wide.state_dict()[key], new.float())
    other = LlavaForConditionalGeneration.from_pretrained(bases[1], dtype=torch.float32)
    with pytest.raises(PatchError, match="neither the base nor the patched values"):
        patch_state_dict(other, tmp_path / "patch")


# ---- CLI ---------------------------------------------------------------------------------------------


def test_cli_patch(bases, tmp_path, capsys):
    make_patch(bases["plain"], tmp_path / "patch")
    ns = argparse.Namespace
    assert cli_patch(ns(patch_command="verify", patch=tmp_path / "patch", base=bases["plain"], json=False)) == 0
    assert "OK" in capsys.readouterr().out
    assert cli_patch(ns(patch_command="apply", base=bases["plain"], patch=tmp_path / "patch",
                        out=tmp_path / "out", overwrite=False)) == 0
    assert cli_patch(ns(patch_command="revert", patched=tmp_path / "out", patch=tmp_path / "patch",
                        out=tmp_path / "back", overwrite=False)) == 0
    assert base_fingerprint(tmp_path / "back") == base_fingerprint(bases["plain"])
    capsys.readouterr()
    assert cli_patch(ns(patch_command="verify", patch=tmp_path / "patch", base=None, json=True)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["revertible"] and not report["base_checked"]
    with pytest.raises(PatchError, match="was made for base"):  # the CLI prints it as one line, exit 2
        cli_patch(ns(patch_command="verify", patch=tmp_path / "patch", base=bases["other"], json=False))


def test_name_translation_fallback_without_transformers_api(monkeypatch):
    """If transformers' internal renaming API moves, LLaVA names still translate."""
    import sys

    from tests.tiny_models import tiny_llava

    model, _ = tiny_llava()
    monkeypatch.setitem(sys.modules, "transformers.core_model_loading", None)  # import fails
    ckpt = "language_model.model.layers.1.mlp.down_proj.weight"
    assert checkpoint_to_model_names(model, [ckpt, "lm_head.weight", "nope"]) == {
        ckpt: "model.language_model.layers.1.mlp.down_proj.weight", "lm_head.weight": "lm_head.weight"}
