"""Devices: which one "auto" means, a checked device name, and models spread over several devices
(accelerate ``device_map``): where a module runs, what is offloaded.

The one place that asks torch what this machine has: ``auto_device`` ("cuda" when torch sees a GPU,
else "cpu"), ``pick_device`` (None / "auto" -> ``auto_device()``, anything else as given) and
``resolve_device`` (a usable ``torch.device``, checked; one-line ValueError otherwise).

A model loaded with a ``device_map`` (``load_adapter(..., device_map=...)``) carries accelerate's
``AlignDevicesHook``s: each module's inputs are moved to its execution device at forward time, and
an offloaded module (``"cpu"`` next to GPUs, or ``"disk"``) keeps its weights on the ``meta`` device
and has them copied in from a weights map for each forward. The algorithm only needs four answers,
all here so nothing else inspects hooks:

- ``input_device(model)``: where inputs go and where the outputs come back (the main device).
- ``module_device(module)``: where a module computes (scaling vectors, gates, fp32 deltas and
  recorded states of a layer are kept there).
- ``offload_kind(module)``: "disk" / "cpu" when its weights are offloaded, else None. An edit writes
  the real weights, so an edited layer must not be offloaded (``check_editable``).
- ``real_tensor(model, name)``: a parameter's values, read from the offload map when it is on meta.

Recipes and ``ProtectedLVLM.from_pretrained`` name model parts by COMPONENT, never by module path:
``vision`` (everything outside the language model), ``embed``, ``layers.N`` / ``layers.A-B``,
``norm`` (the rest of the language model: final norm, rotary embedding), ``lm_head``, and ``default``
(whatever no other key names). ``component_device_map`` turns that into accelerate's module-path map.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from .device_maps import AUTO_MAPS, COMPONENT_NAMES, device_value, parse_component  # torch-free: defined there

__all__ = ["auto_device", "gpu_available", "pick_device", "resolve_device", "AUTO_MAPS", "COMPONENT_NAMES",
           "component_device_map", "device_value", "input_device", "module_device", "offload_kind", "real_tensor",
           "check_editable", "edited_offload", "parse_component", "OffloadedError"]


def gpu_available() -> bool:
    """Whether torch sees a CUDA GPU."""
    return torch.cuda.is_available()


def auto_device() -> str:
    """What device "auto" means: "cuda" when torch sees a GPU, else "cpu"."""
    return "cuda" if gpu_available() else "cpu"


def pick_device(device: str | torch.device | None) -> str | torch.device:
    """None / "auto" -> ``auto_device()``; any other device as given (unchecked: ``resolve_device``)."""
    return auto_device() if device is None or device == "auto" else device


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A usable torch device: None / "auto" = cuda if available, else cpu. ValueError (one line) for
    an unknown name or a CUDA device this machine does not have (instead of torch's AssertionError
    deep inside ``model.to``)."""
    if device is None or device == "auto":
        return torch.device(auto_device())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)[:40]!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not gpu_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r}: MPS is not available on this machine (use cpu or auto)")
    elif dev.type != "cpu":
        raise ValueError(f"device {str(device)!r}: only cpu, cuda and mps are supported")
    return dev


class OffloadedError(ValueError):
    """An edited / patched weight whose layer is offloaded (one line)."""


def _hooks(module: torch.nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # a SequentialHook holds several


def _exec_device(module: torch.nn.Module) -> torch.device | None:
    for h in _hooks(module):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    return None


def _first_real(module: torch.nn.Module) -> torch.device | None:
    """The device of ``module``'s first real (non-meta) parameter; None when all are on meta."""
    return next((p.device for p in module.parameters() if p.device.type != "meta"), None)


def input_device(model: torch.nn.Module) -> torch.device:
    """The device inputs are placed on: the main device of a dispatched model, else that of its first
    real (non-meta) parameter."""
    return _exec_device(model) or _first_real(model) or torch.device("cpu")


def module_device(module: torch.nn.Module, model: torch.nn.Module | None = None) -> torch.device:
    """Where ``module`` computes: its own accelerate hook's execution device, else the device of its
    first real parameter, else (a module whose weights are all offloaded, without a hook of its own)
    that of its first submodule with a hook, else ``input_device(model)``."""
    dev = _exec_device(module) or _first_real(module)
    if dev is not None:
        return dev
    for sub in module.modules():
        dev = _exec_device(sub)
        if dev is not None:
            return dev
    return input_device(model) if model is not None else torch.device("cpu")


def _offloaded_in(module: torch.nn.Module) -> tuple[torch.nn.Module, str, Any] | None:
    """(leaf module, parameter name, its hook) of the first offloaded parameter under ``module``."""
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            if p.device.type == "meta":
                hook = next((h for h in _hooks(sub) if getattr(h, "weights_map", None) is not None), None)
                return sub, name, hook
    return None


def offload_kind(module: torch.nn.Module) -> str | None:
    """"disk" or "cpu" when (part of) ``module``'s weights are offloaded (kept out of the device and
    copied in at each forward), else None."""
    found = _offloaded_in(module)
    if found is None:
        return None
    _, name, hook = found
    if hook is None:
        return "meta"  # weights never loaded (no offload map): as unusable as offloaded
    wm = hook.weights_map
    data, key = getattr(wm, "dataset", wm), f"{getattr(wm, 'prefix', '')}{name}"
    index, state = getattr(data, "index", None), getattr(data, "state_dict", None)
    if isinstance(state, Mapping) and key in state:
        return "cpu"
    if isinstance(index, Mapping) and key in index:
        return "disk"
    return "cpu" if isinstance(data, Mapping) else "disk"


def real_tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    """Values of parameter ``name`` (a ``named_parameters`` key): the parameter itself, or, when it is
    offloaded (on meta), its copy in the accelerate weights map (loaded from disk if need be)."""
    p = model.get_parameter(name)
    if p.device.type != "meta":
        return p
    owner, _, attr = name.rpartition(".")
    sub = model.get_submodule(owner) if owner else model
    for h in _hooks(sub):
        wm = getattr(h, "weights_map", None)
        if wm is not None:
            return wm[attr]
    raise OffloadedError(f"parameter {name} is on the meta device and no offload map holds its values")


# ---- component maps ---------------------------------------------------------------------------------


def _path_of(model: torch.nn.Module, target: torch.nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, m in model.named_modules():
        if m is target:
            return name
    return None


def component_device_map(adapter, spec: Mapping[str, Any]) -> dict[str, int | str]:
    """accelerate's ``device_map`` (module path or parameter name -> device) for a map by component
    (see the module docstring), on ``adapter``'s model (a model on the meta device is enough).
    Every parameter must be covered: ValueError (one line) naming what is missing otherwise."""
    model = adapter.model
    n = adapter.num_layers
    lm = adapter.language_model if hasattr(adapter, "language_model") else None
    parts: dict[str, str | None] = {
        "embed": _path_of(model, model.get_input_embeddings()),
        "lm_head": _path_of(model, model.get_output_embeddings()),
    }
    layer_paths = [_path_of(model, adapter.layers[i]) for i in range(n)]
    lm_path = _path_of(model, lm) if lm is not None else None
    if lm_path is None:  # the decoder stack's owner: the longest common prefix of the layer paths' parent
        lm_path = layer_paths[0].rsplit(".", 2)[0] if layer_paths and layer_paths[0].count(".") >= 2 else ""
    layers_list = layer_paths[0].rpartition(".")[0]
    norm_paths = [f"{lm_path}.{c}" if lm_path else c for c, _ in (lm.named_children() if lm is not None else [])]
    norm_paths = [p for p in norm_paths if p not in (layers_list, parts["embed"], parts["lm_head"])]
    # vision: the largest modules / direct parameters outside the language model and the output head
    inside = [lm_path] if lm_path else []
    inside += [p for p in (parts["lm_head"], parts["embed"]) if p]

    def outside(prefix: str, module: torch.nn.Module) -> list[str]:
        out = []
        for name, _ in module.named_parameters(recurse=False):
            out.append(f"{prefix}{name}")
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if any(path == i or i.startswith(f"{path}.") for i in inside):
                if not any(path == i for i in inside):
                    out += outside(f"{path}.", child)
            elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                out.append(path)
        return out

    vision_paths = outside("", model)
    chosen: dict[str, int | str] = {}
    default = None
    for key, value in spec.items():
        name, rng = parse_component(key, n)
        dev = device_value(value)
        if name == "default":
            default = dev
        elif name == "layers":
            for i in rng:
                chosen[layer_paths[i]] = dev
        elif name == "vision":
            chosen.update({p: dev for p in vision_paths})
        elif name == "norm":
            chosen.update({p: dev for p in norm_paths})
        elif parts.get(name):
            chosen[parts[name]] = dev
    everything = {**{p: "vision" for p in vision_paths}, **{p: "norm" for p in norm_paths},
                  **{p: f"layers.{i}" for i, p in enumerate(layer_paths)},
                  **{p: k for k, p in parts.items() if p}}
    missing = [c for p, c in everything.items() if p not in chosen]
    if missing and default is None:
        names = list(dict.fromkeys(missing))
        raise ValueError(f"device map: no device for {', '.join(names[:6])}{' ...' if len(names) > 6 else ''} "
                         f"(name them or add a default)")
    return {**chosen, **{p: default for p in everything if p not in chosen}}


def edited_offload(adapter, layers: Iterable[int], module: str) -> tuple[int, str] | None:
    """(layer, kind) of the first of ``layers`` whose ``module`` is offloaded, else None."""
    for layer in layers:
        kind = offload_kind(adapter.component(layer, module))
        if kind is not None:
            return layer, kind
    return None


def check_editable(adapter, layers: Iterable[int], module: str, what: str = "the edit") -> None:
    """OffloadedError (one line) when ``module`` of one of ``layers`` is offloaded."""
    found = edited_offload(adapter, layers, module)
    if found is not None:
        layer, kind = found
        raise OffloadedError(f"layer {layer} ({module}) is offloaded to the {kind}: {what} writes its real weights; "
                             f"place that layer on a device in the device map (offload only layers that are not edited)")
