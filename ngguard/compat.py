"""Differences between transformers versions, each shim in one place with the versions it covers.

Tested with transformers 5.x (``pyproject.toml``); the fallbacks keep the 4.5x spelling working.
"""
from __future__ import annotations

import copy
import inspect
from typing import Iterable, Mapping, Sequence

import torch
from loguru import logger
from transformers import DynamicCache


def forward_features(model) -> tuple[str | None, bool]:
    """Name of the forward's KV-cache argument and whether it takes ``logits_to_keep``.

    transformers >= 5.x (recent minor versions) call the argument ``cache``; 4.x and early 5.x
    ``past_key_values``; None when the forward takes neither. ``logits_to_keep`` exists since 4.50
    (``num_logits_to_keep`` before, not supported here: the shortcut is then skipped)."""
    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    return name, "logits_to_keep" in params


def output_cache(result):
    """The KV cache a forward returned: ``result.cache`` (recent 5.x) or ``result.past_key_values``."""
    return getattr(result, "cache", None) or getattr(result, "past_key_values", None)


def cache_from_kv(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A ``DynamicCache`` holding (keys, values) [B, heads, T, d_head] per layer, in layer order.
    ``ddp_cache_data`` is the constructor argument for pre-filled layers in 4.56+ and 5.x."""
    return DynamicCache(ddp_cache_data=kv)


def cache_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer of a ``DynamicCache`` (``cache.layers[i]`` since 4.56; 5.x)."""
    return cache.layers[layer].keys, cache.layers[layer].values


def cache_layers(cache) -> int:
    return len(cache.layers)


# ---- weight names: checkpoint (save_pretrained) <-> loaded model --------------------------------
# The mapping is asked from transformers itself (its private conversion API, 5.x). Where that API is
# absent, ``fallback`` -- a family's (saved prefix, loaded prefix) pairs, ``Adapter.checkpoint_renames`` --
# is used; in 4.x checkpoint and model names are the same (no prefix of transformers 5's layout matches).
Renames = Sequence[tuple[str, str]]


def saved_key(model: torch.nn.Module, key: str, fallback: Renames = ()) -> str:
    """The key ``save_pretrained`` writes for the loaded model's parameter ``key``."""
    try:  # transformers 5.x: the reverse of the renaming applied on load
        # imported here, inside the try: a private API that other versions lack (then: the fallback)
        from transformers.core_model_loading import revert_weight_conversion

        out = revert_weight_conversion(model, {key: model.get_parameter(key)})
        if len(out) == 1:
            return next(iter(out))
    except Exception:  # noqa: BLE001 - private API; fall back to the family's renaming
        pass
    for old, new in fallback:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def checkpoint_renames(model: torch.nn.Module, names: Iterable[str], state: Mapping[str, torch.Tensor],
                       fallback: Renames = ()) -> dict[str, str]:
    """Checkpoint name -> ``state`` (the model's state dict) name, for the ``names`` that
    ``from_pretrained`` renames (transformers 5.x weight-conversion rules; else ``fallback``)."""
    out: dict[str, str] = {}
    names = list(names)
    try:  # transformers' internal API (5.x): mirror what from_pretrained does
        # imported here, inside the try: a private API that other versions lack (then: the fallback)
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        conversions = getattr(model, "_weight_conversions", None)
        if conversions is None:
            conversions = get_model_conversion_mapping(model)
        conversions = copy.deepcopy(conversions)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        prefix = getattr(model, "base_model_prefix", None)
        for n in sorted(names, key=dot_natural_key):
            new, pattern = rename_source_key(n, renamings, converters, prefix, state)
            if pattern is None and new in state:
                out[n] = new
    except (ImportError, AttributeError, TypeError) as e:  # pragma: no cover (other transformers versions)
        logger.warning("transformers' weight-renaming API is not usable here ({}); using the family's renaming rules", e)
        for n in names:
            for old, new in fallback:
                if n.startswith(old) and new + n[len(old):] in state:
                    out[n] = new + n[len(old):]
                    break
    return out
