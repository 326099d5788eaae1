"""Forged and malformed patches (issue 15, points 5 and 6), through ``ngguard patch verify/apply``,
``ngguard serve --patch`` and the ``ProtectedLVLM`` wrapper: every one is refused with one line,
exit status 2, and nothing is written. Forgeries recompute every checksum, as an attacker would."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import tiny_llava

from ngguard.adapters import adapter_for
from ngguard.cli import main
from ngguard.guard import ProtectedLVLM
from ngguard.patch import KEY_ENV, PatchError, write_patch

LAYER = 1


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sha_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(base model folder with processor, a genuine patch folder, adapter factory)."""
    root = tmp_path_factory.mktemp("hostile-patch")
    model, processor = tiny_llava(seed=7)
    adapter = adapter_for(model, processor)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    key = adapter.state_dict_key(LAYER, "down_proj")
    w = adapter.model.get_parameter(key).detach()
    write_patch(root / "patch", {key: w + 0.25}, base_dir=root / "base", recipe_hash="h", layers=[LAYER],
                method="neural_gate", gate_stats={}, subjects=["Passport"], model=adapter.model,
                extra={"module": "down_proj"})
    return root


def forge(src: Path, dst: Path, *, tensors=None, manifest=None) -> Path:
    """Copy a patch and rewrite it: new tensors (name -> (new value, base value)), manifest fields
    replaced; then every checksum, the patch id and the file entries recomputed."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "patch.json").read_text())
    if tensors is not None:
        save_file({n: v for n, (v, _) in tensors.items()}, str(dst / "patch.safetensors"))
        save_file({n: b for n, (_, b) in tensors.items()}, str(dst / "base.safetensors"))
        m["tensors"] = {n: {"shape": list(v.shape), "dtype": {torch.float32: "F32", torch.float16: "F16"}[v.dtype],
                            "sha256": _sha_tensor(v), "base_sha256": _sha_tensor(b)} for n, (v, b) in tensors.items()}
    m.update(manifest or {})
    for f in ("patch.safetensors", "base.safetensors"):
        m["files"][f] = {"sha256": _sha(dst / f), "bytes": (dst / f).stat().st_size}
    m["patch_id"] = m["files"]["patch.safetensors"]["sha256"][:12]
    (dst / "patch.json").write_text(json.dumps(m, indent=2))
    return dst


def base_tensor(world: Path, name: str) -> torch.Tensor:
    return load_file(str(world / "base" / "model.safetensors"))[name]


def patch_name(world: Path) -> str:
    return next(iter(json.loads((world / "patch" / "patch.json").read_text())["tensors"]))


def refused(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("ngguard: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def assert_refused_everywhere(world: Path, bad: Path, expected: str, tmp_path: Path, capsys) -> None:
    """verify, verify --base, apply (nothing written), serve --patch and the wrapper all refuse."""
    assert expected in refused(["patch", "verify", str(bad)], capsys)
    assert expected in refused(["patch", "verify", str(bad), "--base", str(world / "base")], capsys)
    out = tmp_path / "applied"
    assert expected in refused(["patch", "apply", "--base", str(world / "base"), "--patch", str(bad),
                                "--out", str(out)], capsys)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert expected in refused(["serve", "--model", str(world / "base"), "--patch", str(bad), "--device", "cpu",
                                "--port", "1"], capsys)
    model, processor = tiny_llava(seed=7)
    with pytest.raises(PatchError, match=re.escape(expected)):
        ProtectedLVLM(adapter_for(model, processor), bad)


def test_the_genuine_patch_passes(world, capsys):
    assert main(["patch", "verify", str(world / "patch"), "--base", str(world / "base")]) == 0
    assert "OK" in capsys.readouterr().out
    model, processor = tiny_llava(seed=7)
    assert ProtectedLVLM(adapter_for(model, processor), world / "patch").protected


def test_a_tensor_outside_the_manifest_layers_is_refused(world, tmp_path, capsys):
    """The issue's forgery: layer 3's q_proj zeroed while the manifest says layers [1]."""
    name = patch_name(world).replace(f"layers.{LAYER}.mlp.down_proj", "layers.3.self_attn.q_proj")
    base = base_tensor(world, name)
    bad = forge(world / "patch", tmp_path / "forged", tensors={name: (torch.zeros_like(base), base)})
    assert_refused_everywhere(world, bad, "is not the down_proj weight of layer(s) [1]", tmp_path, capsys)


def test_a_manifest_that_names_the_forged_module_is_refused_too(world, tmp_path, capsys):
    name = patch_name(world).replace(f"layers.{LAYER}.mlp.down_proj", "layers.3.self_attn.q_proj")
    base = base_tensor(world, name)
    bad = forge(world / "patch", tmp_path / "forged", tensors={name: (torch.zeros_like(base), base)},
                manifest={"layers": [3], "extra": {"module": "q_proj"}})
    assert_refused_everywhere(world, bad, "is not the q_proj weight of layer(s) [3]", tmp_path, capsys)


def test_a_down_proj_of_another_layer_is_refused(world, tmp_path, capsys):
    name = patch_name(world).replace(f"layers.{LAYER}.", "layers.0.")
    base = base_tensor(world, name)
    bad = forge(world / "patch", tmp_path / "forged", tensors={name: (base + 1, base)})
    assert_refused_everywhere(world, bad, "layer(s) [1]", tmp_path, capsys)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_values_are_refused(world, tmp_path, capsys, value):
    name = patch_name(world)
    base = base_tensor(world, name)
    bad = forge(world / "patch", tmp_path / "forged", tensors={name: (torch.full_like(base, value), base)})
    assert_refused_everywhere(world, bad, "holds NaN or infinite values", tmp_path, capsys)


def test_shape_and_dtype_must_match_the_base(world, tmp_path, capsys):
    name = patch_name(world)
    base = base_tensor(world, name)
    wide = forge(world / "patch", tmp_path / "wide", tensors={name: (torch.zeros(base.shape[0], base.shape[1] + 1),
                                                                    torch.zeros(base.shape[0], base.shape[1] + 1))})
    out = tmp_path / "out"
    msg = refused(["patch", "apply", "--base", str(world / "base"), "--patch", str(wide), "--out", str(out)], capsys)
    assert "in the patch but" in msg and not out.exists()
    half = forge(world / "patch", tmp_path / "half", tensors={name: (base.half() + 1, base.half())})
    msg = refused(["patch", "verify", str(half), "--base", str(world / "base")], capsys)
    assert "F16" in msg and "F32" in msg
    model, processor = tiny_llava(seed=7)
    with pytest.raises(PatchError, match="in the model"):
        ProtectedLVLM(adapter_for(model, processor), wide)


MALFORMED = {
    "tensors-is-a-string": ({"tensors": "abc"}, "manifest field tensors: expected a mapping"),
    "layers-is-a-string": ({"layers": "1"}, "manifest field layers"),
    "layers-missing": ({"layers": None}, "manifest field layers"),
    "files-is-a-list": ({"files": []}, "manifest field files"),
    "patch-id-is-a-number": ({"patch_id": 5}, "manifest field patch_id"),
    "base-is-a-string": ({"base": "x"}, "manifest field base"),
    "module-is-a-list": ({"extra": {"module": ["down_proj"]}}, "manifest field extra.module"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifests_give_one_line(world, tmp_path, capsys, case):
    change, expected = MALFORMED[case]
    bad = tmp_path / "bad"
    shutil.copytree(world / "patch", bad)
    m = json.loads((bad / "patch.json").read_text())
    m.update(change)
    (bad / "patch.json").write_text(json.dumps(m))
    assert expected in refused(["patch", "verify", str(bad)], capsys)
    assert expected in refused(["serve", "--model", str(world / "base"), "--patch", str(bad), "--device", "cpu"],
                               capsys)


def test_a_100k_deep_manifest_gives_one_line(world, tmp_path, capsys):
    bad = tmp_path / "deep"
    shutil.copytree(world / "patch", bad)
    (bad / "patch.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in refused(["patch", "verify", str(bad)], capsys)


# ---- signatures -------------------------------------------------------------------------------------


def test_signatures_with_an_operator_key(world, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    key, other = tmp_path / "key", tmp_path / "other"
    key.write_bytes(b"k" * 32 + b"\n")
    other.write_bytes(b"o" * 32)
    signed = tmp_path / "signed"
    shutil.copytree(world / "patch", signed)
    assert "needs a key" in refused(["patch", "sign", str(signed)], capsys)
    assert not (signed / "patch.sig").exists()
    (tmp_path / "short").write_bytes(b"abc")
    assert "at least 16 bytes" in refused(["patch", "sign", str(signed), "--key-file", str(tmp_path / "short")],
                                          capsys)
    # unsigned + a key: refused everywhere; signed: accepted
    assert "not signed" in refused(["patch", "verify", str(signed), "--key-file", str(key)], capsys)
    assert main(["patch", "sign", str(signed), "--key-file", str(key)]) == 0
    assert main(["patch", "verify", str(signed), "--key-file", str(key)]) == 0
    assert "signature valid" in capsys.readouterr().out
    monkeypatch.setenv(KEY_ENV, "k" * 32)  # the same key from the environment
    assert main(["patch", "verify", str(signed)]) == 0
    monkeypatch.delenv(KEY_ENV)
    assert "bad signature" in refused(["patch", "verify", str(signed), "--key-file", str(other)], capsys)
    # a forgery with every checksum recomputed keeps the old signature: refused
    name = patch_name(world)
    base = base_tensor(world, name)
    forged = forge(signed, tmp_path / "forged", tensors={name: (base * 0, base)})
    assert (forged / "patch.sig").exists()
    out = tmp_path / "out"
    assert "bad signature" in refused(["patch", "apply", "--base", str(world / "base"), "--patch", str(forged),
                                       "--out", str(out), "--key-file", str(key)], capsys)
    assert not out.exists()
    assert main(["patch", "verify", str(forged)]) == 0  # without a key the forgery's checksums are consistent
    assert "signature not checked" in capsys.readouterr().out
    model, processor = tiny_llava(seed=7)
    with pytest.raises(PatchError, match="bad signature"):
        ProtectedLVLM(adapter_for(model, processor), forged, patch_key=b"k" * 32)
    assert ProtectedLVLM(adapter_for(*tiny_llava(seed=7)), signed, patch_key=b"k" * 32).protected
    assert "bad signature" in refused(["serve", "--model", str(world / "base"), "--patch", str(forged), "--device",
                                       "cpu", "--key-file", str(key)], capsys)
