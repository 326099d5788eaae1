"""The ``device_map`` strings that accelerate / transformers place by themselves, defined once.

Torch-free on purpose, so argument parsers (``ngguard serve --device-map``, ``ngguard eval
--device-map``) can offer them without importing torch; ``ngguard.devices`` re-exports them and holds
everything else about devices and maps by component."""
from __future__ import annotations

__all__ = ["AUTO_MAPS"]

AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
