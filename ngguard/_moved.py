"""Old import paths of moved modules: ``alias(old, new)`` makes ``import old`` give the module ``new``
itself (same object: attributes, monkeypatching and ``isinstance`` keep working), with a DeprecationWarning."""
import importlib
import sys
import warnings


def alias(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and goes in a later release: import {new}", DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
