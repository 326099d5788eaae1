"""Model adapters: the only place that knows model families. Chosen by the HF config class name.

    adapter = load_adapter("path/to/checkpoint")        # or load_adapter("organism")
    adapter = adapter_for(model, processor)             # already loaded objects
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import transformers
from transformers import AutoConfig

from ..devices import AUTO_MAPS, component_device_map, resolve_device
from .. import organism
from .base import Adapter, Batch, VisionExport, find_subject_span, subject_candidates
from .blip2 import Blip2Adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_vl import Qwen2VLAdapter

ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Register ``cls`` under each of its ``config_classes`` (usable as a class decorator)."""
    for name in cls.config_classes:
        ADAPTERS[name] = cls
    return cls


register_adapter(LlavaAdapter)
register_adapter(LlavaNextAdapter)
register_adapter(Qwen2VLAdapter)
register_adapter(Blip2Adapter)


def _adapter_class(config_class: str) -> type[Adapter]:
    try:
        return ADAPTERS[config_class]
    except KeyError:
        raise ValueError(
            f"unsupported model family {config_class}; supported config classes: {', '.join(sorted(ADAPTERS))}"
        ) from None


def adapter_class(model: torch.nn.Module) -> type[Adapter] | None:
    """The adapter class registered for ``model``'s config class; None for an unknown family (what a
    family declares as data, e.g. ``vision_export``, ``checkpoint_renames``, is read from it)."""
    return ADAPTERS.get(type(getattr(model, "config", None)).__name__)


def adapter_for(model: torch.nn.Module, processor) -> Adapter:
    """Wrap an already loaded model + processor in the adapter registered for its config class."""
    config = getattr(model, "config", None)
    return _adapter_class(type(config).__name__)(model, processor)


def _torch_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (use e.g. float32, float16, bfloat16, auto)")
    return value


def resolve_model_path(path: str | Path) -> Path:
    """A model folder; the name "organism" means the bundled checkpoint."""
    if str(path) == "organism":
        return organism.checkpoint_path()  # looked up on the module at call time (tests point it elsewhere)
    return Path(path).expanduser()


def load_adapter(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    device_map: str | Mapping | None = None,
    max_memory: Mapping | None = None,
    offload_folder: str | Path | None = None,
) -> Adapter:
    """Load a local HF checkpoint folder (safetensors weights only) and wrap it in its adapter.

    ``path``: a folder with config.json, *.safetensors and the processor files, or "organism" for the
    bundled checkpoint. ``dtype``: torch dtype or its name; None = transformers' default.
    The model is moved to ``device`` and put in eval mode.

    ``device_map`` (needs accelerate): spread the model over several devices instead: "auto" (or
    "balanced", "balanced_low_0", "sequential"; with ``max_memory`` = {0: "20GiB", "cpu": "60GiB"}
    per device), or a map by component ({"layers.0-15": 0, "layers.16-31": 1, "default": 0}, see
    ``ngguard.devices``); "cpu" next to GPUs and "disk" (in ``offload_folder``) offload the weights
    through accelerate's hooks. ``device`` is then ignored."""
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ValueError("max_memory and offload_folder need a device_map")
    device = resolve_device(device) if device_map is None else None
    path = resolve_model_path(path)
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not path.is_dir():
        raise ValueError(f"not a model folder: {path}")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"no safetensors weights in {path} (only .safetensors checkpoints are loaded)")

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    name = type(config).__name__
    cls = _adapter_class(name)
    model_class = getattr(transformers, cls.model_classes[name])
    kwargs = {"config": config, "use_safetensors": True, "local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = _torch_dtype(dtype)
    processor = cls.load_processor(path, trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs.update(_placement(cls, model_class, config, processor, device_map, max_memory, offload_folder))
        model = model_class.from_pretrained(path, **kwargs).eval()
    else:
        model = model_class.from_pretrained(path, **kwargs)
        model.to(device).eval()
    return cls(model, processor)


def _placement(cls: type[Adapter], model_class, config, processor, device_map, max_memory, offload_folder) -> dict:
    """from_pretrained's placement arguments; a map by component is translated to module paths on a
    model built on the meta device (no memory)."""
    try:
        import accelerate  # noqa: F401  # optional: only a device_map needs it
    except ImportError:
        raise ValueError("device_map needs accelerate: pip install accelerate") from None

    out: dict = {}
    if isinstance(device_map, str):
        if device_map not in AUTO_MAPS:
            raise ValueError(f"device_map {device_map!r}: expected one of {', '.join(AUTO_MAPS)} or a map by component")
        out["device_map"] = device_map
    elif isinstance(device_map, Mapping):
        with torch.device("meta"):
            skeleton = model_class._from_config(config)
        out["device_map"] = component_device_map(cls(skeleton, processor), device_map)
    else:
        raise ValueError(f"device_map: expected a string or a map by component, got {type(device_map).__name__}")
    if max_memory is not None:
        out["max_memory"] = {int(k[5:]) if isinstance(k, str) and k.startswith("cuda:") else k: v
                             for k, v in max_memory.items()}
    if offload_folder is not None:
        out["offload_folder"] = str(offload_folder)
    return out


__all__ = [
    "ADAPTERS",
    "Adapter",
    "Batch",
    "Blip2Adapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "Qwen2VLAdapter",
    "VisionExport",
    "adapter_class",
    "adapter_for",
    "find_subject_span",
    "load_adapter",
    "register_adapter",
    "resolve_device",
    "subject_candidates",
]
