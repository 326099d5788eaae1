"""Which decoder layer(s) to edit: the paper's layer search, and localization at the recipe level.

The search (recipe ``layers: {search: {scan: [a, b], window: r}}``; fixed layers skip it):

1. scan: localize (Eq. 1-5, ``neural_gate.localize_layer``) at every layer a..b and measure the mean
   share of strongly active neurons (Eq. 5) over the subjects; the top layer is never scanned (its
   subject-token state reaches no later token);
2. centre o = the layer with the largest share; the candidates are the layers in [o - r, o + r]
   (within the scan);
3. edit each candidate alone with the run's method (``methods.run_edit``), measure EtA on the
   validation split (a world v2 has one of its own: other images and phrasings, public look-alikes
   among the benign questions; otherwise every third training image is held out) and keep the best
   (ties: the one nearest o). The test split never takes part.

A method that declares its own choice (``Method.choose_layers``, e.g. DINM's toxic layer) uses it
instead. ``localize_layers`` and ``gates_for`` are localization with the recipe's settings, shared
by the search and the pipeline.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from loguru import logger

from .adapters.base import Adapter
from .methods.core import Sample, WeightBackup
from .data import Query
from .evaluate import evaluate
from .methods import REGISTRY, run_edit
from .methods.neural_gate import LayerLocalization, localize_layer
from .recipe import LayerSearch, Recipe
from .stage_cache import StageCache, samples_fingerprint


def localize_layers(adapter: Adapter, samples: Sequence[Sample], layers: Sequence[int],
                    recipe: Recipe, cache: StageCache | None = None) -> dict[int, LayerLocalization]:
    """Localization (steps 1-2, Eq. 1-5) at each of ``layers`` with the recipe's ``localization``
    section (the refusal and alpha are the edit's: the same in steps 1 and 3). ``cache``: reuse a
    layer's localization of the same model, samples and settings (``stage_cache``)."""
    L, E = recipe.localization, recipe.edit
    out = {}
    samples_fp = samples_fingerprint(samples) if cache is not None and cache.enabled else ""
    for layer in layers:
        t = time.time()
        key = cache.key("localization", cache.model_fingerprint(adapter), samples_fp, layer, L, E.refusal, E.alpha) \
            if cache is not None else None
        stored = cache.load_tensors(key) if cache is not None else None
        if stored is not None:
            t_, meta = stored
            out[layer] = LayerLocalization.of(layer, t_["scales"], meta["subjects"], t_["losses"], t_["steps"])
            continue
        out[layer] = localize_layer(adapter, samples, layer, refusal=E.refusal, alpha=E.alpha, contexts=L.contexts,
                                    steps=L.steps, lr=L.lr, eps=L.eps, l1=L.l1, init=L.init, stop_loss=L.stop_loss,
                                    batch_size=L.batch_size, desc=f"localize layer {layer}")
        if cache is not None:
            loc = out[layer]
            cache.save_tensors(key, {"scales": loc.scales, "losses": torch.as_tensor(loc.losses),
                                     "steps": torch.as_tensor(loc.steps)}, {"subjects": loc.subjects})
        logger.info(f"layer {layer}: strongly active share {out[layer].strong_share(L.threshold):.3f} (M > "
                    f"{L.threshold:g}, the search's criterion; the gate keeps "
                    f"{out[layer].strong_share(L.threshold, L.top_k):.3f}) ({time.time() - t:.1f}s)")
    return out


def gates_for(locs: dict[int, LayerLocalization], recipe: Recipe) -> dict[int, dict[str, torch.Tensor]]:
    """layer -> subject -> the strong dims the gate (Eq. 6) lets through (Eq. 5 with the recipe's rule)."""
    L = recipe.localization
    return {layer: {s: loc.strong(s, L.threshold, L.top_k) for s in loc.gates} for layer, loc in locs.items()}


@dataclass
class LayerChoice:
    """What ``choose_layers`` hands on: the layers to edit, what the search saw (``info``, for the
    report: the scan's shares, centre, candidates and validation EtA per candidate) and the scan's
    localizations (layer -> ``LayerLocalization``; empty for fixed layers or a method's own choice),
    reused by the pipeline instead of localizing those layers again."""

    layers: list[int]
    info: dict = field(default_factory=dict)
    locs: dict[int, LayerLocalization] = field(default_factory=dict)


def choose_layers(adapter: Adapter, samples: list[Sample], unsafe: dict[str, str], recipe: Recipe, method: str,
                  val_sets: dict[str, list[Query]], retain: Sequence[Sample] = (), cache: StageCache | None = None
                  ) -> LayerChoice:
    """The recipe's fixed layers, or the search above for ``method`` (``LayerChoice``)."""
    spec = recipe.layers
    info: dict = {}
    if not isinstance(spec, LayerSearch):
        return LayerChoice(list(spec), info)
    a, b = spec.scan
    b = min(b, adapter.num_layers - 2)  # the top layer's subject-token state reaches no later token
    scan = list(range(a, b + 1))
    if b < spec.scan[1]:
        info["top_layer_skipped"] = adapter.num_layers - 1
    own = REGISTRY[method].choose_layers
    if own is not None:
        layers, extra = own(adapter, samples, unsafe, recipe.edit.refusal, scan)
        return LayerChoice(layers, {**info, **extra})
    locs = localize_layers(adapter, samples, scan, recipe, cache)
    # with top_k every layer keeps the same share: the search then ranks layers by the threshold rule
    info["scan"] = {l: locs[l].strong_share(recipe.localization.threshold) for l in scan}
    centre = max(scan, key=lambda l: info["scan"][l])
    cands = [l for l in range(centre - spec.window, centre + spec.window + 1) if a <= l <= b]
    info["centre"], info["candidates"] = centre, cands
    if len(cands) == 1:
        return LayerChoice(cands, info, locs)
    info["validation_eta"] = scores = _validation_eta(adapter, samples, recipe, method, cands, locs, val_sets, retain)
    return LayerChoice([max(cands, key=lambda l: (scores[l], -abs(l - centre)))], info, locs)


def _validation_eta(adapter: Adapter, samples: list[Sample], recipe: Recipe, method: str, cands: list[int],
                    locs: dict[int, LayerLocalization], val_sets: dict[str, list[Query]],
                    retain: Sequence[Sample]) -> dict[int, float]:
    """Step 3: each candidate edited alone (and rolled back), its EtA on the validation split."""
    reuse = bool(val_sets.get("val"))
    if reuse:  # a validation split of its own (world v2): other images, validation phrasings
        fit, val = list(samples), val_sets["val"]
    else:  # hold out every third training image
        fit = [s for i, s in enumerate(samples) if i % 3 != 2]
        val_images = {s.key for i, s in enumerate(samples) if i % 3 == 2}
        val = [q for q in val_sets["train"] if q.image in val_images]
    scores = {}
    for layer in cands:
        backup = WeightBackup(adapter, [layer], recipe.module)
        # with its own validation split the scan already localized exactly these samples at this layer
        fit_locs = {layer: locs[layer]} if reuse else localize_layers(adapter, fit, [layer], recipe)
        gates = gates_for(fit_locs, recipe) if REGISTRY[method].needs_gates else None
        run_edit(adapter, fit, [layer], method, gates, recipe, retain)
        r = evaluate(adapter, val, batch_size=recipe.evaluation.batch_size, max_new_tokens=recipe.evaluation.max_new_tokens,
                     desc=f"search: eval layer {layer}")
        scores[layer] = r["eta"]
        backup.restore()
        logger.info(f"layer search: layer {layer} validation EtA {r['eta']:.4f}")
    return scores
