"""Models spread by an accelerate device map (issue 14, section 2), on a CPU: a tiny LLaVA with
non-edited layers offloaded to disk (transformers' device_map) and to the CPU (accelerate's
cpu_offload hooks) must localize and edit exactly as the single-device model, write the same patch,
and every offloaded edited layer is refused with one line."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ngguard.adapters import adapter_for, load_adapter
from ngguard.devices import OffloadedError, component_device_map, offload_kind, real_tensor
from ngguard.methods import REGISTRY
from ngguard.methods.core import Sample
from ngguard.methods.neural_gate import localize_layer
from ngguard.methods.memit import MemitHParams, apply_memit
from ngguard.patch import PatchError, write_patch
from ngguard.recipe import EditSpec, RecipeError, check_placement, recipe_from_dict
from tiny_models import tiny_image, tiny_llava, tiny_minigpt4, tiny_patch, tiny_qwen2_vl

accelerate = pytest.importorskip("accelerate")

REFUSAL = "I am sorry."
EDITED = 2  # layers 0 (cpu offload) and 3 (disk) are offloaded; 1 and 2 stay on the device


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llava")
    model, processor = tiny_llava(0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _single(saved):
    return load_adapter(saved, device="cpu")


def _split(saved, tmp_path):
    """layer 3 on disk (through from_pretrained's device_map), layer 0 offloaded to the CPU by
    accelerate's hooks (weights on meta, copied in at each forward), the rest on the CPU."""
    adapter = load_adapter(saved, device_map={"layers.3": "disk", "default": "cpu"}, offload_folder=tmp_path / "off")
    accelerate.cpu_offload(adapter.component(0, "layer"), execution_device=torch.device("cpu"))
    assert [offload_kind(adapter.component(i, "down_proj")) for i in range(4)] == ["cpu", None, None, "disk"]
    assert adapter.component(3, "down_proj").weight.device.type == "meta"
    return adapter


def _samples(n=3):
    return [Sample(tiny_image(i), subject, [f"what is the number of the {subject} in this image?"],
                   [(f"what colour is the {subject}?", "blue")], key=f"{subject}{i}")
            for i in range(n) for subject in ("passport",)]


def test_component_map_covers_every_parameter_of_each_family():
    for build in (tiny_llava, tiny_qwen2_vl, tiny_minigpt4):
        adapter = adapter_for(*build(0))
        n = adapter.num_layers
        dm = component_device_map(adapter, {"vision": "cpu", "embed": 0, f"layers.0-{n - 2}": 0,
                                            f"layers.{n - 1}": 1, "norm": 1, "lm_head": "disk"})
        params = [name for name, _ in adapter.model.named_parameters()]
        owner = {name: next(dev for path, dev in dm.items() if name == path or name.startswith(f"{path}."))
                 for name in params}  # StopIteration = a parameter without a device
        assert owner[adapter.state_dict_key(n - 1, "down_proj")] == 1
        assert owner[adapter.state_dict_key(0, "down_proj")] == 0
        head = next(p for p, m in adapter.model.named_modules() if m is adapter.model.get_output_embeddings())
        assert dm[head] == "disk"
        with pytest.raises(ValueError, match=r"^device map: no device for .*layers\.1.*\(name them or add a default\)$"):
            component_device_map(adapter, {"layers.0": 0})
        with pytest.raises(ValueError, match="module paths never go in a device map"):
            component_device_map(adapter, {"model.language_model.layers.0": 0, "default": 0})


def test_localization_on_a_split_model_equals_the_single_device_run(saved, tmp_path):
    single, split = _single(saved), _split(saved, tmp_path)
    samples = _samples()
    for layer, shortcuts in ((1, True), (EDITED, False)):
        kw = dict(refusal=REFUSAL, steps=4, stop_loss=0.0, contexts=("I am an AI.",), shortcuts=shortcuts)
        a = localize_layer(single, samples, layer, **kw)
        b = localize_layer(split, samples, layer, **kw)
        assert (a.scales - 1).abs().max() > 1e-3  # the vectors moved
        torch.testing.assert_close(b.scales, a.scales, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.gates["passport"], b.gates["passport"])


def test_gated_edit_and_patch_on_a_split_model_equal_the_single_device_run(saved, tmp_path):
    single, split = _single(saved), _split(saved, tmp_path)
    samples = _samples()
    loc = localize_layer(single, samples, EDITED, refusal=REFUSAL, steps=4, contexts=())
    gates = {EDITED: {"passport": loc.strong("passport", 0.3)}}
    results = []
    for adapter in (single, split):
        results.append(REGISTRY["neural_gate"].apply(adapter, samples, [EDITED], module="down_proj", refusal=REFUSAL,
                                                     hparams=EditSpec(lr=1e-2, steps=3, stop_loss=0.0), gates=gates))
    (name, d0), = results[0].deltas.items()
    assert d0.abs().max() > 0
    torch.testing.assert_close(results[1].deltas[name], d0, atol=1e-6, rtol=1e-5)
    key = split.state_dict_key(EDITED, "down_proj")
    torch.testing.assert_close(split.model.get_parameter(key), single.model.get_parameter(key))  # written in place
    # the patch written from the dispatched model is the single-device one (same tensors, same hashes)
    ms = [write_patch(tmp_path / f"patch{i}", r.weights, base_dir=saved, recipe_hash="t", layers=[EDITED],
                      method="neural_gate", gate_stats={}, subjects=["passport"]) for i, r in enumerate(results)]
    assert ms[0]["tensors"] == ms[1]["tensors"]


def test_memit_on_a_split_model_equals_the_single_device_run(saved, tmp_path):
    hp = MemitHParams(v_steps=3, v_lr=0.5, v_weight_decay=0.0, clamp_norm_factor=4.0, contexts=("I am an AI.",),
                      cov_samples=8, cov_max_tokens=16, batch_size=16, cache_dir=str(tmp_path / "stats"))
    samples = _samples(2)
    single, split = _single(saved), _split(saved, tmp_path)
    # separate caches: the split run computes its own key statistics and target values
    a = apply_memit(single, samples, [1, EDITED], refusal=REFUSAL, hparams=hp)
    b = apply_memit(split, samples, [1, EDITED], refusal=REFUSAL,
                    hparams=dataclasses.replace(hp, cache_dir=str(tmp_path / "stats2")))
    assert set(a.deltas) == set(b.deltas)
    for k in a.deltas:
        assert a.deltas[k].abs().max() > 0
        torch.testing.assert_close(b.deltas[k], a.deltas[k], atol=1e-5, rtol=1e-4)
    # the cache keys read the offloaded weights' real values: the split run names the same files
    names = [sorted(f.name for f in (tmp_path / d).iterdir()) for d in ("stats", "stats2")]
    assert names[0] == names[1] and len([n for n in names[0] if n.startswith("cov-")]) == 2


def test_offloaded_edited_layers_are_refused_with_one_line(saved, tmp_path):
    split = _split(saved, tmp_path)
    samples = _samples(1)
    gates = {i: {"passport": torch.ones(split.hidden_size, dtype=torch.bool)} for i in range(4)}
    for layer, kind in ((3, "disk"), (0, "cpu")):
        with pytest.raises(OffloadedError, match=rf"^layer {layer} \(down_proj\) is offloaded to the {kind}: [^\n]*$"):
            REGISTRY["neural_gate"].apply(split, samples, [layer], module="down_proj", refusal=REFUSAL,
                                          hparams=EditSpec(steps=1), gates=gates)
    with pytest.raises(OffloadedError, match=r"^layer 3 \(down_proj\) is offloaded to the disk: memit"):
        apply_memit(split, samples, [3], refusal=REFUSAL, hparams=MemitHParams(cache_dir=str(tmp_path / "s")))
    torch.testing.assert_close(real_tensor(split.model, split.state_dict_key(3, "down_proj")),
                               _single(saved).component(3, "down_proj").weight)
    # a recipe whose (auto-placed) edited layer ended up offloaded: refused after loading, one line
    r = recipe_from_dict({"model": {"path": "organism", "device_map": "auto"}, "method": "neural_gate",
                          "data": {"world": {}}, "layers": [3]})
    with pytest.raises(RecipeError, match=r"^<recipe>: model\.device_map: edited layer 3 \(down_proj\) was offloaded "
                                          r"to the disk: [^\n]*$"):
        check_placement(r, split)
    check_placement(dataclasses.replace(r, layers=(EDITED,)), split)  # a resident layer passes


def _recipe(model: dict, layers=(11,)):
    return recipe_from_dict({"model": {"path": "organism", **model}, "method": "neural_gate", "data": {"world": {}},
                             "layers": list(layers)})


def test_recipe_device_map_validation():
    ok = _recipe({"device_map": {"layers.0-10": 0, "layers.11-31": 1, "vision": 0, "default": "disk"},
                  "max_memory": {0: "20GiB", "cuda:1": 10**9, "cpu": "60GiB"}, "offload_folder": "off"})
    assert ok.model.placement()["device_map"]["layers.11-31"] == 1
    assert ok.model.placement()["max_memory"] == {0: "20GiB", "cuda:1": 10**9, "cpu": "60GiB"}
    assert ok.model.placement()["offload_folder"].endswith("off")
    assert recipe_from_dict(ok.to_dict()) == ok
    assert _recipe({"device_map": "auto"}).model.placement() == {"device_map": "auto", "max_memory": None,
                                                                "offload_folder": None}
    cases = [
        # an edited layer offloaded to disk: one line naming the layer
        ({"device_map": {"layers.8-13": "disk", "default": 0}, "offload_folder": "off"}, (11,),
         r"^<recipe>: model\.device_map\.layers\.8-13: edited layer 11 is offloaded to the disk: [^\n]*layer 11"),
        ({"device_map": {"layers.0-3": 0, "default": "disk"}, "offload_folder": "off"}, (11,),
         r"^<recipe>: model\.device_map\.default: edited layer 11 is offloaded to the disk"),
        # the layer search edits its candidates: the whole scan must be resident
        ({"device_map": {"layers.5": "disk", "default": 0}, "offload_folder": "off"}, {"search": {"scan": [3, 8]}},
         r"edited layer 5 is offloaded to the disk"),
        # "cpu" next to GPUs is accelerate's CPU offload
        ({"device_map": {"layers.11": "cpu", "default": 0}}, (11,), r"edited layer 11 is offloaded to the CPU"),
        ({"device_map": {"layers.3": "disk", "default": 0}}, (11,), r"model\.offload_folder: required"),
        ({"device_map": "auto", "device": "cuda"}, (11,), r"model\.device: must be auto with model\.device_map"),
        ({"device_map": "everywhere"}, (11,), r"model\.device_map: unknown value 'everywhere'"),
        ({"device_map": {"model.layers.0": 0}}, (11,), r"model\.device_map\.model\.layers\.0: component"),
        ({"device_map": {"layers.4-2": 0}}, (11,), r"range start 4 is after its end 2"),
        ({"device_map": {"default": "gpu0"}}, (11,), r"model\.device_map\.default: device 'gpu0'"),
        ({"device_map": "auto", "max_memory": {"gpu": "1GiB"}}, (11,), r"model\.max_memory\.gpu: expected a GPU index"),
        ({"device_map": "auto", "max_memory": {0: "lots"}}, (11,), r"model\.max_memory\.0: expected a size"),
        ({"max_memory": {0: "1GiB"}}, (11,), r"model\.max_memory: only used with model\.device_map"),
    ]
    for model, layers, pattern in cases:
        with pytest.raises(RecipeError, match=pattern) as e:
            if isinstance(layers, dict):
                recipe_from_dict({"model": {"path": "organism", **model}, "method": "neural_gate",
                                  "data": {"world": {}}, "layers": layers})
            else:
                _recipe(model, layers)
        assert "\n" not in str(e.value)
    # CPU-only maps: "cpu" is a device there, not an offload
    assert _recipe({"device_map": {"layers.11": "cpu", "layers.3": "disk", "default": "cpu"},
                    "offload_folder": "off"}).model.device_map is not None


def test_protected_lvlm_on_a_split_model(saved, tmp_path):
    from ngguard.guard import ProtectedLVLM
    from ngguard.serving.options import SERVING

    adapter = _single(saved)
    patch = tiny_patch(adapter, tmp_path / "p", layer=EDITED)
    base = saved  # the same weights as p/base (which holds no processor files)
    q = "What is the passport number of the Passport in the image?"
    one = ProtectedLVLM.from_pretrained(base, patch, device="cpu",
                                        serving=SERVING.replace(protection="merged", max_batch=1))
    split = ProtectedLVLM.from_pretrained(base, patch,
                                          device_map={"layers.3": "disk", "default": "cpu"},
                                          offload_folder=tmp_path / "off",
                                          serving=SERVING.replace(protection="merged", max_batch=1))
    assert offload_kind(split.adapter.component(3, "layer")) == "disk"
    img = tiny_image(0)
    assert split.chat(img, q, max_new_tokens=6) == one.chat(img, q, max_new_tokens=6)
    split.protected = False
    one.protected = False
    assert split.chat(img, q, max_new_tokens=6) == one.chat(img, q, max_new_tokens=6)
    rows = ProtectedLVLM.from_pretrained(base, patch,
                                         device_map={"layers.3": "disk", "default": "cpu"},
                                         offload_folder=tmp_path / "off3",
                                         serving=SERVING.replace(protection="rows"))
    one.protected = True
    assert rows.chat_batch([img, img], [q, q], max_new_tokens=6, protected=[True, False]) == [
        one.chat(img, q, max_new_tokens=6), one.chat(img, q, max_new_tokens=6, protected=False)]
    bad = tiny_patch(adapter, tmp_path / "q", layer=3)
    with pytest.raises(PatchError, match=r"is offloaded \(accelerate device map\): the patch writes the real weights"):
        ProtectedLVLM.from_pretrained(base, bad,
                                      device_map={"layers.3": "disk", "default": "cpu"},
                                      offload_folder=tmp_path / "off2",
                                      serving=SERVING.replace(protection="merged", max_batch=1))


def test_cli_device_map_choices_match_the_library():
    from ngguard.cli import serve as cli
    from ngguard.devices import AUTO_MAPS

    assert cli.DEVICE_MAPS == AUTO_MAPS
    p = cli.add_serve_arguments(__import__("argparse").ArgumentParser())
    assert p.parse_args(["--device-map", "auto"]).device_map == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["--device-map", "cuda:0"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: accelerate's real CPU offload next to it")
def test_gpu_with_cpu_and_disk_offload_equals_one_gpu(saved, tmp_path):
    """On a GPU box: "cpu" next to a GPU is accelerate's CPU offload (weights copied in per forward),
    inputs and outputs on the GPU; the same scales and edit as the whole model on that GPU."""
    one = load_adapter(saved, device="cuda")
    split = load_adapter(saved, device_map={"layers.0": "cpu", "layers.3": "disk", "default": 0},
                         offload_folder=tmp_path / "off")
    assert [offload_kind(split.component(i, "down_proj")) for i in range(4)] == ["cpu", None, None, "disk"]
    assert split.device.type == "cuda" and split.layer_device(0).type == "cuda"
    samples = _samples()
    kw = dict(refusal=REFUSAL, steps=4, stop_loss=0.0, contexts=("I am an AI.",))
    a, b = (localize_layer(x, samples, EDITED, **kw) for x in (one, split))
    torch.testing.assert_close(b.scales, a.scales, atol=1e-4, rtol=1e-4)
    gates = {EDITED: {"passport": a.strong("passport", 0.3)}}
    hp = EditSpec(lr=1e-2, steps=3, stop_loss=0.0)
    ra, rb = (REGISTRY["neural_gate"].apply(x, samples, [EDITED], module="down_proj", refusal=REFUSAL, hparams=hp,
                                            gates=gates) for x in (one, split))
    (name, d0), = ra.deltas.items()
    torch.testing.assert_close(rb.deltas[name], d0, atol=1e-5, rtol=1e-4)
    with pytest.raises(RecipeError, match="edited layer 0 .* offloaded to the CPU"):
        recipe_from_dict({"model": {"path": "organism", "device_map": {"layers.0": "cpu", "default": 0}},
                          "method": "neural_gate", "data": {"world": {}}, "layers": [0]})
