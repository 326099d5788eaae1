"""A patch as a PEFT LoRA adapter: the delta of each edited matrix, truncated SVD.

    ngguard patch export-lora PATCH --rank 16 --out DIR [--base BASE]

For each edited matrix ``W`` (``[out, in]``) the patch gives ``Delta = W_patched - W_base``
(float32). With ``Delta = U S V^T`` the rank-``r`` adapter is ``B = U_r sqrt(S_r)`` (``[out, r]``)
and ``A = sqrt(S_r) V_r^T`` (``[r, in]``), and ``lora_alpha = r`` so PEFT's scaling
``lora_alpha / r`` is 1: ``W_base + B A`` is the best rank-``r`` approximation of the patched
matrix (Eckart-Young). ``--rank full`` keeps every singular value (``min(out, in)``).

``DIR`` holds what PEFT's ``save_pretrained`` writes and vLLM reads:

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight / .lora_B.weight (float32)
    ngguard-lora.json            patch id, rank, share of the delta's energy kept per matrix

``target_modules`` are the loaded model's module paths of the edited matrices (e.g.
``model.language_model.layers.1.mlp.down_proj`` for LLaVA in transformers 5), derived from the
patch's checkpoint names through the base model's own renaming rules
(``ngguard.patch.checkpoint_to_model_names``, on a model built on the meta device from the base's
``config.json``): exact paths, so PEFT touches only the edited matrices (a bare ``down_proj`` would
match every layer). Energy kept = ``sum(S_r^2) / sum(S^2)``. Load with
``PeftModel.from_pretrained(base_model, DIR)``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from .adapters import _adapter_class, resolve_model_path
from .atomic import atomic_dir
from .patch import PatchError, _check_out, _locate, checkpoint_to_model_names, load_patch_tensors

__all__ = ["export_lora", "parse_rank", "lora_factors", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INFO = "ngguard-lora.json"


def parse_rank(value: str | int) -> int | None:
    """A rank: a positive integer, or "full" (None = every singular value)."""
    if isinstance(value, str) and value.strip().lower() == "full":
        return None
    try:
        rank = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--rank must be a positive integer or 'full', got {value!r}") from None
    if rank < 1 or isinstance(value, bool):
        raise ValueError(f"--rank must be a positive integer or 'full', got {value!r}")
    return rank


def lora_factors(delta: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [r, in], B [out, r], share of energy kept) with ``B @ A`` the best rank-``r``
    approximation of ``delta`` [out, in] (float32; ``rank`` None = full)."""
    delta = delta.detach().to(torch.float32)
    if delta.dim() != 2:
        raise ValueError(f"a LoRA needs a matrix, got a tensor of shape {list(delta.shape)}")
    full = min(delta.shape)
    r = full if rank is None else rank
    if r > full:
        raise ValueError(f"rank {r} exceeds the largest rank of a {delta.shape[0]}x{delta.shape[1]} matrix ({full}); "
                         f"use --rank full")
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)  # float64: exact full-rank reconstruction
    total = float((s**2).sum())
    kept = float((s[:r] ** 2).sum()) / total if total > 0 else 1.0
    root = s[:r].sqrt()
    b = (u[:, :r] * root).to(torch.float32).contiguous()  # [out, r]
    a = (root[:, None] * vh[:r]).to(torch.float32).contiguous()  # [r, in]
    return a, b, kept


def _meta_model(base: Path):
    """The base model's class built on the meta device from its config.json (no weights read)."""
    config = AutoConfig.from_pretrained(base, local_files_only=True)
    cls = _adapter_class(type(config).__name__)
    model_class = getattr(transformers, cls.model_classes[type(config).__name__])
    with torch.device("meta"):
        return model_class(config), type(config).__name__


def export_lora(patch_dir: str | os.PathLike, out_dir: str | os.PathLike, *, rank: int | None,
                base: str | os.PathLike = "organism", overwrite: bool = False, key: bytes | None = None) -> dict:
    """Write the PEFT LoRA adapter of ``patch_dir`` (see the module docstring) to ``out_dir``
    (atomically). ``base``: the checkpoint the patch was made for (its config.json names the
    modules; its weights are read only when the patch holds no base values). Returns the
    ``ngguard-lora.json`` record. ``key``: the operator's patch key (a valid signature is then required)."""
    patch_dir, out_dir = Path(patch_dir), Path(out_dir)
    base_dir = resolve_model_path(base)
    _check_out(out_dir, overwrite, patch_dir)
    manifest, new, old = load_patch_tensors(patch_dir, key=key)
    pid = manifest["patch_id"]
    if not (base_dir / "config.json").is_file():
        raise PatchError(f"{base_dir}: no config.json (pass --base, the checkpoint folder the patch was made for)")
    model, config_class = _meta_model(base_dir)
    want_class = manifest["base"].get("config_class")
    if want_class and want_class != config_class:
        raise PatchError(f"patch {pid} was made for a {want_class} model, {base_dir} is a {config_class}")
    if old is None:  # base values from the base checkpoint itself
        locs = _locate(base_dir)
        old = {}
        for name in new:
            if name not in locs:
                raise PatchError(f"patch {pid}: tensor {name} is not in {base_dir}")
            with safe_open(str(locs[name].file), framework="pt") as fh:
                old[name] = fh.get_tensor(name)
    to_model = checkpoint_to_model_names(model, new)
    weights: dict[str, torch.Tensor] = {}
    targets, tensors = [], {}
    for name in sorted(new):
        key = to_model.get(name)
        if key is None:
            raise PatchError(f"patch {pid}: tensor {name} has no counterpart in a {config_class} model")
        module_name, _, attr = key.rpartition(".")
        if attr != "weight" or not isinstance(model.get_submodule(module_name), torch.nn.Linear):
            raise PatchError(f"patch {pid}: {key} is not the weight of a Linear layer (a LoRA needs one)")
        delta = new[name].to(torch.float32) - old[name].to(torch.float32)  # [out, in]
        a, b, kept = lora_factors(delta, rank)
        weights[f"base_model.model.{module_name}.lora_A.weight"] = a
        weights[f"base_model.model.{module_name}.lora_B.weight"] = b
        err = float((b.double() @ a.double() - delta.double()).abs().max())
        targets.append(module_name)
        tensors[module_name] = {"checkpoint_name": name, "shape": list(delta.shape), "rank": a.shape[0],
                                "energy_kept": kept, "max_abs_error": err,
                                "delta_norm": float(delta.double().norm())}
    r = max(t["rank"] for t in tensors.values())
    config = {
        "peft_type": "LORA", "task_type": None, "auto_mapping": None, "inference_mode": True,
        "base_model_name_or_path": None if str(base) == "organism" else str(base),
        "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": targets, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "revision": None,
    }
    info = {"format": "ngguard-lora", "patch_id": pid, "config_class": config_class,
            "rank": "full" if rank is None else rank, "energy_kept": min(t["energy_kept"] for t in tensors.values()),
            "tensors": tensors}
    with atomic_dir(out_dir, overwrite=overwrite, error=PatchError) as tmp:
        save_file({k: weights[k] for k in sorted(weights)}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        os.chmod(tmp / ADAPTER_WEIGHTS, 0o644)  # safetensors writes 0600; a server may run as another user
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    logger.info("patch {} as a rank-{} LoRA in {}: {:.1%} of the delta's energy kept", pid, r, out_dir,
                info["energy_kept"])
    return info
