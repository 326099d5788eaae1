"""MEMIT (Meng et al., "Mass-Editing Memory in a Transformer", ICLR 2023), adapted to refusal.

1. Requests: every sensitive question of every training image (``compute_ks.requests_of``).
2. Target values at the last edited layer L: z_r = h_r + delta_r (``compute_vs``: the refusal after
   the question and after each answer-start context; KL on the image's benign questions).
3. For each edited layer l (in order), with the weights edited so far:
       K   = keys at l (input of down_proj at the subject token)            [d_k, n]
       R   = (z - current output of L at the subject token) / (layers left)  [d, n]
       dW  = R K^T (lambda C_l + K K^T)^-1                                  (the closed form, Eq. 14)
   C_l = E[k k^T] over a text corpus (``covariance``), lambda = ``mom2_update_weight``.
AlphaEdit (``alphaedit.py``) reuses steps 1-3 with another solve.

Only ``down_proj`` of the given layers changes; the result is an ``EditResult`` like every method's.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from loguru import logger

from ..adapters.base import Adapter
from .core import EditResult, Sample
from ..devices import check_editable
from .registry import LocateEditHParams, MemitHParams
from .compute_ks import requests_of, subject_states
from .compute_vs import compute_vs
from .covariance import cached_target_values, covariances, save_target_values, target_values_key

__all__ = ["MemitHParams", "apply_memit", "memit_update", "locate_then_edit"]

# (layer, keys [d_k, n] float64, residuals [d, n] float64) -> weight change [d, d_k] float64
Update = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def memit_update(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam: float) -> torch.Tensor:
    """MEMIT's closed form: dW = R K^T (lambda C + K K^T)^-1, all [.., n] column-wise (float64)."""
    adj = torch.linalg.solve(lam * cov + keys @ keys.T, keys)               # [d_k, n]
    return resid @ adj.T                                                      # [d, d_k]


def check_module(module: str, method: str) -> None:
    if module != "down_proj":
        raise ValueError(f"{method} edits the MLP's output projection (module down_proj), got module {module!r}")


def covariances_for(adapter: Adapter, samples: Sequence[Sample], layers: Sequence[int], module: str,
                    hp: LocateEditHParams) -> dict[int, torch.Tensor]:
    return covariances(adapter, layers, module, corpus=hp.corpus, n_samples=hp.cov_samples,
                       max_tokens=hp.cov_max_tokens, image_size=samples[0].image.size, batch_size=hp.batch_size,
                       cache_dir=hp.cache_dir)


def locate_then_edit(adapter: Adapter, samples: Sequence[Sample], layers: Sequence[int], *, module: str, refusal: str,
                     hparams: LocateEditHParams, update: Update, method: str, shortcuts: bool = True) -> EditResult:
    """Steps 1-3 above with ``update`` as the solve; edits ``adapter.model`` in place."""
    check_module(module, method)
    layers = sorted(set(layers))
    check_editable(adapter, layers, module, method)
    if not samples or not any(s.sensitive for s in samples):
        raise ValueError(f"{method}: no sensitive questions to edit")
    hp = hparams
    model = adapter.model
    model.eval()
    requests = requests_of(samples)
    top = layers[-1]
    t = time.time()
    _, h = subject_states(adapter, samples, requests, key_layer=None, out_layer=top, module=module, refusal=refusal,
                          batch_size=hp.batch_size)
    key = target_values_key(adapter, samples, requests, top, refusal=refusal, hparams=hp)
    path, zs = cached_target_values(key, top, hp.cache_dir)
    if zs is not None and zs.shape == h.shape:  # e.g. MEMIT then AlphaEdit with the same settings
        log = [{"target_values": f"from the cache ({path.name})"}]
        logger.info(f"{method}: {len(requests)} target values at layer {top} from the cache ({path})")
    else:
        zs, log = compute_vs(adapter, samples, requests, top, h, refusal=refusal, contexts=hp.contexts,
                             steps=hp.v_steps, lr=hp.v_lr, weight_decay=hp.v_weight_decay,
                             clamp_norm_factor=hp.clamp_norm_factor, kl_factor=hp.kl_factor, stop_loss=hp.stop_loss,
                             batch_size=hp.batch_size, shortcuts=shortcuts)
        save_target_values(path, key, zs, top)
        logger.info(f"{method}: {len(requests)} target values at layer {top} ({time.time() - t:.1f}s; mean loss "
                    f"{sum(r['loss_first'] for r in log) / len(log):.3f} -> {sum(r['loss_last'] for r in log) / len(log):.3f})")
    zs = zs.double()
    names = {l: adapter.parameter_name(l, module) for l in layers}
    originals = {l: adapter.component(l, module).weight.detach().clone() for l in layers}
    for i, layer in enumerate(layers):
        keys, cur = subject_states(adapter, samples, requests, key_layer=layer, out_layer=top, module=module,
                                   refusal=refusal, batch_size=hp.batch_size)
        resid = (zs - cur.double().to(zs.device)).T / (len(layers) - i)      # [d, n]: spread over the layers left
        w = adapter.component(layer, module).weight
        delta = update(layer, keys.double().T.to(w.device), resid.to(w.device))  # [d, d_k]
        with torch.no_grad():
            w.copy_((w.double() + delta).to(w.dtype))
        log.append({"layer": layer, "residual_norm": resid.norm(dim=0).mean().item() * (len(layers) - i),
                    "update_norm": delta.norm().item()})
        logger.info(f"{method}: layer {layer}: mean distance to the targets {log[-1]['residual_norm']:.4f}, "
                    f"update norm {log[-1]['update_norm']:.4f}")
    _, final = subject_states(adapter, samples, requests, key_layer=None, out_layer=top, module=module, refusal=refusal,
                              batch_size=hp.batch_size)
    gap = {"start": (zs - h.double().to(zs.device)).norm(dim=-1).mean().item(),
           "end": (zs - final.double().to(zs.device)).norm(dim=-1).mean().item()}
    log.append({"target_distance": gap})  # mean ||z - output of the last edited layer||, before and after
    logger.info(f"{method}: mean distance to the target values {gap['start']:.4f} -> {gap['end']:.4f}")
    weights = {names[l]: adapter.component(l, module).weight.detach().cpu().clone() for l in layers}
    deltas = {names[l]: (weights[names[l]].float() - originals[l].cpu().float()) for l in layers}
    return EditResult(weights, deltas, log)


def apply_memit(adapter: Adapter, samples: Sequence[Sample], layers: Sequence[int], *, module: str = "down_proj",
                refusal: str, hparams: MemitHParams = MemitHParams(), gates=None, retain=(), shortcuts: bool = True) -> EditResult:
    """MEMIT on ``module`` (down_proj) of ``layers``, in place on ``adapter.model``."""
    # gates, retain: the registry's common arguments; unused (no gate; no loss to add retention to)
    check_module(module, "memit")
    covs = covariances_for(adapter, samples, layers, module, hparams)

    def update(layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        return memit_update(keys, resid, covs[layer].to(keys), hparams.mom2_update_weight)

    return locate_then_edit(adapter, samples, layers, module=module, refusal=refusal, hparams=hparams, update=update,
                            method="memit", shortcuts=shortcuts)
