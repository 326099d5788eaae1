"""The ``device_map`` strings that accelerate / transformers place by themselves, and the syntax of a
map by component (``parse_component``, ``device_value``), defined once.

Torch-free on purpose, so argument parsers (``ngguard serve --device-map``, ``ngguard eval
--device-map``) and the recipe checks can use them without importing torch; ``ngguard.devices``
re-exports them and holds everything else about devices and maps by component."""
from __future__ import annotations

import re
from typing import Any

__all__ = ["AUTO_MAPS", "COMPONENT_NAMES", "MAX_LAYERS", "parse_component", "device_value"]

AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

COMPONENT_NAMES = ("vision", "embed", "layers.N", "layers.A-B", "norm", "lm_head", "default")
# layer indices a device map may name before the model is loaded (then: the model's own count)
MAX_LAYERS = 10_000
_LAYERS = re.compile(r"layers\.(\d+)(?:-(\d+))?")
_DEVICE = re.compile(r"(cuda|xpu|npu|mps)(:\d+)?|cpu|disk")


def parse_component(key: Any, num_layers: int | None = None) -> tuple[str, range | None]:
    """("layers", range) for ``layers.N`` / ``layers.A-B``, (name, None) for the other components.
    ValueError (one line) for anything else."""
    if not isinstance(key, str):
        raise ValueError(f"component {key!r}: expected one of {', '.join(COMPONENT_NAMES)}")
    m = _LAYERS.fullmatch(key)
    if m:
        a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if a > b:
            raise ValueError(f"component {key!r}: range start {a} is after its end {b}")
        if num_layers is not None and b >= num_layers:
            raise ValueError(f"component {key!r}: the model has {num_layers} layers (0..{num_layers - 1})")
        if b >= MAX_LAYERS:  # before the model is known: no model has that many (a range is never expanded)
            raise ValueError(f"component {key!r}: layer {b} is beyond any model (layer indices are below {MAX_LAYERS})")
        return "layers", range(a, b + 1)
    if key in ("vision", "embed", "norm", "lm_head", "default"):
        return key, None
    raise ValueError(f"component {key!r}: expected one of {', '.join(COMPONENT_NAMES)} (module paths never go in a "
                     f"device map: name components)")


def device_value(value: Any) -> int | str:
    """A device map value: int (GPU index), "cuda:N", "cpu", "disk", ... ValueError (one line) else."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"device {value!r}: expected a GPU index, cuda:N, cpu or disk")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"device {value}: a GPU index is >= 0")
        return value
    if not _DEVICE.fullmatch(value):
        raise ValueError(f"device {value!r}: expected a GPU index, cuda:N, cpu or disk")
    return value
