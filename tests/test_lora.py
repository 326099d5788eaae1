"""`ngguard patch export-lora`: the patch delta as a PEFT LoRA that PEFT loads onto the base."""
from __future__ import annotations

import json

import pytest
import torch

import tiny_models
from tiny_models import tiny_image, tiny_llava

from ngguard.adapters import adapter_for
from ngguard.cli import main
from ngguard.guard import ProtectedLVLM
from ngguard.serving.options import SERVING
from ngguard.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_lora, lora_factors, parse_rank
from ngguard.patch import PatchError, write_patch

LAYER = 1
# peft calls a transformers method deprecated in 5.x (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
TEXTS = ["What is the passport number of the Passport in the image?", "What colour is the card?"]


def _patched(tmp_path, builder=tiny_llava, seed=3, include_base=True):
    model, processor = builder(seed=seed)
    ad = adapter_for(model, processor)
    ad.model.save_pretrained(tmp_path / "base")
    key = ad.state_dict_key(LAYER, "down_proj")
    w = ad.model.get_parameter(key).detach()
    gen = torch.Generator().manual_seed(0)
    # a low-rank-ish edit plus noise: rank 2 keeps most but not all of its energy
    u, v = torch.randn(w.shape[0], 2, generator=gen), torch.randn(2, w.shape[1], generator=gen)
    new = w + 0.3 * u @ v + 0.02 * torch.randn(w.shape, generator=gen)
    write_patch(tmp_path / "patch", {key: new}, base_dir=tmp_path / "base", recipe_hash="t", layers=[LAYER],
                method="neural_gate", gate_stats={}, subjects=["Passport"], model=ad.model, include_base=include_base)
    return ad, key


def test_lora_factors_are_the_truncated_svd():
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(12, 20, generator=gen)
    s = torch.linalg.svdvals(delta.double())
    energies = []
    for r in (1, 4, 12):
        a, b, kept = lora_factors(delta, r)
        assert a.shape == (r, 20) and b.shape == (12, r)
        assert kept == pytest.approx(float((s[:r] ** 2).sum() / (s**2).sum()), rel=1e-9)
        # Eckart-Young: the error's Frobenius norm is the norm of the dropped singular values
        err = torch.linalg.norm((b @ a - delta).double())
        assert float(err) == pytest.approx(float(s[r:].norm()), abs=1e-4)
        energies.append(kept)
    assert energies[0] < energies[1] < energies[2] == pytest.approx(1.0)
    a, b, _ = lora_factors(delta, None)
    assert a.shape[0] == 12 and torch.allclose(b @ a, delta, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the largest rank"):
        lora_factors(delta, 13)
    assert parse_rank("full") is None and parse_rank("16") == 16
    for bad in ("0", "-3", "x", "1.5"):
        with pytest.raises(ValueError, match="positive integer or 'full'"):
            parse_rank(bad)


@pytest.mark.parametrize("include_base", [True, False])
def test_full_rank_lora_loads_with_peft_and_answers_as_the_patch(tmp_path, include_base):
    peft = pytest.importorskip("peft")
    ad, key = _patched(tmp_path, include_base=include_base)
    info = export_lora(tmp_path / "patch", tmp_path / "lora", rank=None, base=tmp_path / "base")
    module = key.removesuffix(".weight")
    config = json.loads((tmp_path / "lora" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == [module]
    assert config["r"] == config["lora_alpha"] == min(ad.model.get_parameter(key).shape)
    assert info["energy_kept"] == pytest.approx(1.0)

    images = [tiny_image(i) for i in range(2)]
    merged = ProtectedLVLM(adapter_for(*tiny_llava(seed=3)), tmp_path / "patch",
                           serving=SERVING.replace(protection="merged"))
    base_model, processor = tiny_llava(seed=3)
    batch = ad.encode(images, TEXTS)
    with torch.no_grad():
        want = merged.adapter.model(**batch.inputs).logits
        base_logits = base_model(**batch.inputs).logits
        lora_model = peft.PeftModel.from_pretrained(base_model, tmp_path / "lora")
        got = lora_model(**batch.inputs).logits
    wrapped = [n for n, m in lora_model.named_modules() if hasattr(m, "lora_A")]
    assert wrapped == [f"base_model.model.{module}"]  # exactly the edited matrix, nothing else
    assert not torch.allclose(base_logits, want, atol=1e-3)  # the patch matters
    assert torch.allclose(got, want, atol=1e-4)
    lora_adapter = adapter_for(lora_model.base_model.model, processor)
    assert lora_adapter.generate(images, TEXTS, max_new_tokens=8) == merged.chat_batch(images, TEXTS, max_new_tokens=8)


def test_low_rank_lora_keeps_the_reported_energy(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    ad, key = _patched(tmp_path)
    info = export_lora(tmp_path / "patch", tmp_path / "lora2", rank=2, base=tmp_path / "base")
    t = info["tensors"][key.removesuffix(".weight")]
    assert info["rank"] == 2 and 0.9 < info["energy_kept"] < 1.0 and t["rank"] == 2
    weights = load_file(str(tmp_path / "lora2" / ADAPTER_WEIGHTS))
    a = weights[f"base_model.model.{key.removesuffix('.weight')}.lora_A.weight"]
    b = weights[f"base_model.model.{key.removesuffix('.weight')}.lora_B.weight"]
    assert a.shape[0] == b.shape[1] == 2 and a.dtype == torch.float32
    assert all((tmp_path / "lora2" / f).stat().st_mode & 0o044 == 0o044 for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG))
    assert t["max_abs_error"] > 1e-3  # rank 2 of a noisy delta is not exact


@pytest.mark.parametrize("family", ["tiny_llava_next", "tiny_qwen2_vl", "tiny_minigpt4"])
def test_target_modules_come_from_the_family(tmp_path, family):
    peft = pytest.importorskip("peft")
    ad, key = _patched(tmp_path, builder=getattr(tiny_models, family))
    export_lora(tmp_path / "patch", tmp_path / "lora", rank=4, base=tmp_path / "base")
    config = json.loads((tmp_path / "lora" / ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == [key.removesuffix(".weight")]
    model, _ = getattr(tiny_models, family)(seed=3)
    lora_model = peft.PeftModel.from_pretrained(model, tmp_path / "lora")
    assert [n for n, m in lora_model.named_modules() if hasattr(m, "lora_A")] == \
        [f"base_model.model.{key.removesuffix('.weight')}"]


def test_cli_export_lora_and_its_errors(tmp_path, capsys):
    _patched(tmp_path)
    out = tmp_path / "lora"
    args = ["patch", "export-lora", str(tmp_path / "patch"), "--base", str(tmp_path / "base"), "--out", str(out)]
    assert main(args + ["--rank", "4"]) == 0
    assert "LoRA rank 4" in capsys.readouterr().out and (out / ADAPTER_WEIGHTS).is_file()
    assert main(args + ["--rank", "4"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args[:-1] + [str(tmp_path / "x"), "--rank", "big"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ngguard: error: --rank must be a positive integer") and err.count("\n") == 1
    assert main(args[:-1] + [str(tmp_path / "y"), "--rank", "1000"]) == 2
    assert "exceeds the largest rank" in capsys.readouterr().err and not (tmp_path / "y").exists()
    other = tmp_path / "other"
    tiny_models.tiny_qwen2_vl(seed=0)[0].save_pretrained(other)
    with pytest.raises(PatchError, match="was made for a LlavaConfig model"):
        export_lora(tmp_path / "patch", tmp_path / "z", rank=2, base=other)
