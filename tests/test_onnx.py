"""ONNX export of vision tower + projector: parity, refusal, manifest/checksum, answers equal torch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from tiny_models import tiny_image, tiny_llava  # noqa: E402

from ngguard.adapters import adapter_for  # noqa: E402
from ngguard.onnx_vision import (  # noqa: E402
    OnnxParityError,
    OnnxVision,
    OnnxVisionError,
    default_providers,
    export_vision,
    image_features,
    vision_fingerprint,
)

TEXTS = ["What is the passport number of the Passport in the image?", "What colour is the card?", "hi"]


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_llava(seed=0, template="text_first")
    return adapter_for(model, processor)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "vision"
    export_vision(tiny, out)
    return out


def _pixels(adapter, n: int) -> torch.Tensor:
    return adapter.encode([tiny_image(i) for i in range(n)], ["x"] * n).inputs["pixel_values"]


def test_export_writes_manifest_and_features_match_torch(tiny, exported):
    assert sorted(p.name for p in exported.iterdir()) == ["manifest.json", "vision.onnx"]
    m = json.loads((exported / "manifest.json").read_text())
    assert m["opset"] == 17
    assert m["input"] == {"name": "pixel_values", "shape": ["batch", 3, 32, 32], "dtype": "float32"}
    assert m["output"]["shape"] == ["batch", 16, 32]
    assert m["model"]["config_class"] == "LlavaConfig"
    assert m["model"]["vision_fingerprint"] == vision_fingerprint(tiny.model)
    assert 0 <= m["parity"]["max_abs_diff"] <= 1e-4 and m["parity"]["batches"] == [1, 3]
    assert (m["parity"]["atol"], m["parity"]["rtol"]) == (1e-4, 1e-5)
    assert m["versions"]["onnxruntime"]
    vision = OnnxVision(exported, threads=1)
    for n in (1, 5):  # 5: the batch axis is dynamic, not fixed to the traced size
        x = _pixels(tiny, n)
        got, want = vision(x), image_features(tiny.model, x)
        assert got.shape == want.shape == (n, 16, 32)
        assert (got - want).abs().max().item() <= 1e-4


def test_answers_equal_torch(tiny, exported):
    vision = OnnxVision(exported, threads=1)
    images = [tiny_image(i) for i in range(3)]
    want = tiny.generate(images, TEXTS, max_new_tokens=12)
    assert vision.generate(tiny, images, TEXTS, max_new_tokens=12) == want
    assert any(want)  # not trivially empty


def test_parity_failure_writes_nothing(tiny, tmp_path, monkeypatch):
    import ngguard.onnx_vision as ov

    real = ov._ReferenceFeatures.forward
    monkeypatch.setattr(ov._ReferenceFeatures, "forward", lambda self, x: real(self, x) + 1e-2)
    out = tmp_path / "vision"
    with pytest.raises(OnnxParityError, match=r"by 0.01 > atol 0.0001 \+ rtol 1e-05 .*nothing written"):
        export_vision(tiny, out)
    assert list(tmp_path.iterdir()) == []  # no output, no temp folder left behind


def test_tolerance_scales_with_the_features(exported, tmp_path):
    """Scaling the projector's output by 2**16 is exact in fp32, so the torch/ONNX difference scales
    exactly too: the relative part of the bound accepts it, a purely absolute bound refuses it."""
    base_diff = json.loads((exported / "manifest.json").read_text())["parity"]["max_abs_diff"]
    if base_diff == 0:
        pytest.skip("onnxruntime reproduces torch bit-exactly here: nothing to scale")
    model, processor = tiny_llava(seed=0, template="text_first")
    with torch.no_grad():
        for p in model.model.multi_modal_projector.linear_2.parameters():
            p.mul_(2.0 ** 16)
    adapter = adapter_for(model, processor)
    with pytest.raises(OnnxParityError, match="nothing written"):
        export_vision(adapter, tmp_path / "abs", atol=base_diff * 2.0 ** 15, rtol=0)
    assert not (tmp_path / "abs").exists()
    m = json.loads((export_vision(adapter, tmp_path / "rel") / "manifest.json").read_text())["parity"]
    assert m["max_abs_diff"] == pytest.approx(base_diff * 2.0 ** 16)
    assert m["max_abs_diff"] <= m["bound"] == pytest.approx(1e-4 + 1e-5 * m["max_abs_feature"])


def test_refuses_existing_folder_and_bad_args(tiny, exported, tmp_path):
    with pytest.raises(OnnxVisionError, match="already exists"):
        export_vision(tiny, exported)
    with pytest.raises(OnnxVisionError, match="atol"):
        export_vision(tiny, tmp_path / "x", atol=0)
    with pytest.raises(OnnxVisionError, match="expected a model folder"):
        export_vision(42, tmp_path / "y")


def test_other_families_refused(tmp_path):
    import tiny_models

    if not hasattr(tiny_models, "tiny_llava_next"):
        pytest.skip("no tiny LLaVA-NeXT in tests/tiny_models.py")
    model, processor = tiny_models.tiny_llava_next()
    with pytest.raises(OnnxVisionError, match="supports LlavaConfig models only, not LlavaNextConfig"):
        export_vision(adapter_for(model, processor), tmp_path / "z")
    assert not (tmp_path / "z").exists()


def test_checksum_and_manifest_checked(exported, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "vision.onnx").write_bytes((exported / "vision.onnx").read_bytes() + b"\0")
    (bad / "manifest.json").write_text((exported / "manifest.json").read_text())
    with pytest.raises(OnnxVisionError, match="does not match the manifest"):
        OnnxVision(bad)
    with pytest.raises(OnnxVisionError, match="no manifest.json"):
        OnnxVision(tmp_path)
    with pytest.raises(OnnxVisionError, match="not found"):
        OnnxVision(tmp_path / "missing")


def test_wrong_model_and_wrong_shape_refused(exported):
    vision = OnnxVision(exported, threads=1)
    other, _ = tiny_llava(seed=1, template="text_first")
    with pytest.raises(OnnxVisionError, match="exported from another model"):
        vision.check_model(other)
    with pytest.raises(OnnxVisionError, match=r"pixel_values must be \[batch, 3, 32, 32\]"):
        vision(torch.zeros(1, 3, 16, 16))


def test_provider_choice(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert default_providers() == ["CPUExecutionProvider"]


def test_export_does_not_touch_the_model(tmp_path):
    model, processor = tiny_llava(seed=2, template="text_first")
    adapter = adapter_for(model.to(torch.bfloat16), processor)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_vision(adapter, tmp_path / "v", atol=1e-4)
    after = model.state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], v) for k, v in before.items())


def test_organism_export(tmp_path):
    from ngguard.organism import CHECKPOINT

    if not (CHECKPOINT / "config.json").is_file():
        pytest.skip("bundled organism checkpoint not built yet")
    from ngguard.adapters import load_adapter

    adapter = load_adapter("organism", dtype=torch.float32)
    out = export_vision(adapter, tmp_path / "org")
    m = json.loads((Path(out) / "manifest.json").read_text())
    assert m["input"]["shape"] == ["batch", 3, 48, 48]
    vision = OnnxVision(out, threads=1)
    x = adapter.encode([tiny_image(0, 48), tiny_image(1, 48)], ["x", "y"]).inputs["pixel_values"]
    want = image_features(adapter.model, x)
    assert (vision(x) - want).abs().max().item() <= 1e-4 + 1e-5 * want.abs().max().item()
    texts = ["What is the passport number of the Passport in the image?", "What shape is shown in the image?"]
    images = [tiny_image(0, 48), tiny_image(1, 48)]
    assert vision.generate(adapter, images, texts, max_new_tokens=16) == adapter.generate(images, texts,
                                                                                          max_new_tokens=16)


def test_cuda_requested_but_not_usable_falls_back_to_cpu_with_one_warning(exported, monkeypatch):
    import onnxruntime as ort
    from loguru import logger

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])  # a CPU build
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    try:
        explicit = OnnxVision(exported, providers=["CUDAExecutionProvider"])
        assert explicit.providers == ["CPUExecutionProvider"]
        assert len(lines) == 1 and "CUDA" in lines[0] and "CPUExecutionProvider" in lines[0]
        assert "\n" not in lines[0].rstrip("\n")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # torch has a GPU, onnxruntime no CUDA
        default = OnnxVision(exported)
        assert default.providers == ["CPUExecutionProvider"] and len(lines) == 2
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(default(x), explicit(x))  # it runs
    finally:
        logger.remove(sink)
    with pytest.raises(OnnxVisionError, match="not available"):  # other unknown providers still refused
        OnnxVision(exported, providers=["TensorrtExecutionProvider"])
