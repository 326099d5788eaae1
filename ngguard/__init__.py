"""ngguard: Neural Gate privacy editing for vision-language models.

The public API, a handful of names (imported lazily, so ``import ngguard`` stays cheap)::

    from ngguard import load_recipe, run_recipe      # the offline editor (== `ngguard edit`)
    from ngguard import load_adapter, evaluate       # any supported model; RtA / EtA / leak metrics
    from ngguard import ProtectedLVLM                # serving: base model + protection patch
    from ngguard import ServingOptions               # how it is served (the options of `ngguard serve`)
"""
import importlib

__version__ = "0.1.0"

_API = {
    "load_recipe": "ngguard.recipe",
    "run_recipe": "ngguard.pipeline",
    "load_adapter": "ngguard.adapters",
    "evaluate": "ngguard.evaluate",
    "ProtectedLVLM": "ngguard.guard",
    "ServingOptions": "ngguard.serving.options",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:  # the module behind the name is imported on first use (torch, transformers)
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'ngguard' has no attribute {name!r}")
