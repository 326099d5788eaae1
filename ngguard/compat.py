"""Differences between transformers versions, each shim in one place with the versions it covers.

Tested with transformers 5.x (``pyproject.toml``); the fallbacks keep the 4.5x spelling working.
"""
from __future__ import annotations

import inspect

import torch
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
