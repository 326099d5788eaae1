"""Key statistics for MEMIT and AlphaEdit: C = E[k k^T] of the edited module's input over a text
corpus run through the model, and AlphaEdit's null-space projector of C. Both cached as safetensors.

Every corpus text is posed as one user turn with a flat grey image of the training images' size (an
LVLM always sees an image); only the text positions count (not the image tokens, not the padding).
All layers' statistics come from one pass with the ORIGINAL weights, the layers above the highest
edited one skipped.

Cache key (sha256, also stored in the file's metadata): the model fingerprint (sha256 over the config
and every parameter that can reach the layer's input: all but the decoder layers above it), the layer,
the module, the corpus hash (the texts actually used), the token cap, the image size and the prompt
template. The projector's key adds the threshold. Anything else = a fresh computation.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from loguru import logger
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..adapters.base import Adapter
from ..atomic import atomic_file
from ..devices import real_tensor
from .fastpath import record_layer_output
from ..world.corpus import corpus_hash, load_corpus

FORMAT = 1  # bump when the statistic's definition changes


def default_cache_dir() -> Path:
    root = os.environ.get("NGGUARD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ngguard"
    return Path(root) / "stats"


def _plain_config(obj):
    """The config without paths and version stamps (the same weights in two folders: one fingerprint)."""
    if isinstance(obj, dict):
        return {k: _plain_config(v) for k, v in obj.items() if not str(k).startswith("_") and k != "transformers_version"}
    if isinstance(obj, (list, tuple)):
        return [_plain_config(v) for v in obj]
    return obj


def _digest(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + raw).digest()


def model_fingerprints(adapter: Adapter, layers: Sequence[int]) -> dict[int, str]:
    """Per layer l: sha256 over the config and the parameters that can change l's input (everything
    except the decoder layers above l)."""
    in_layer = {id(p): j for j in range(adapter.num_layers) for p in adapter.layers[j].parameters()}
    base = hashlib.sha256(json.dumps(_plain_config(adapter.model.config.to_dict()), sort_keys=True,
                                     default=str).encode())
    per_layer: dict[int, list[bytes]] = {j: [] for j in range(adapter.num_layers)}
    for name, p in adapter.model.named_parameters():
        d = name.encode() + _digest(real_tensor(adapter.model, name) if p.device.type == "meta" else p)
        if id(p) in in_layer:
            per_layer[in_layer[id(p)]].append(d)
        else:
            base.update(d)
    out, h = {}, base.copy()
    for j in range(max(layers) + 1):
        for d in per_layer[j]:
            h.update(d)
        if j in layers:
            out[j] = h.copy().hexdigest()
    return out


def _key(**fields) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _load(path: Path, key: str) -> torch.Tensor | None:
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        if (fh.metadata() or {}).get("key") != key:
            return None
        return fh.get_tensor("value")


def _save(path: Path, value: torch.Tensor, meta: dict) -> None:
    """Atomic (``atomic.atomic_file``: a temp file in the same folder, then rename)."""
    with atomic_file(path) as tmp:
        save_file({"value": value.contiguous()}, str(tmp), metadata={k: str(v) for k, v in meta.items()})


@torch.no_grad()
def _accumulate(adapter: Adapter, layers: Sequence[int], module: str, texts: Sequence[str], *, max_tokens: int,
                image_size: tuple[int, int], batch_size: int) -> tuple[dict[int, torch.Tensor], int]:
    """Sum of k k^T (float64) per layer over the text positions of ``texts``, and the token count."""
    tok = adapter.tokenizer
    grey = Image.new("RGB", image_size, (128, 128, 128))
    sums: dict[int, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}

    def hook(layer):
        def fn(_m, inputs):
            k = inputs[0][mask["m"].to(inputs[0].device)].float()            # [tokens, d_k]
            prod = (k.T @ k).double()
            sums[layer] = prod if layer not in sums else sums[layer] + prod.to(sums[layer].device)
        return fn

    handles = [adapter.component(l, module).register_forward_pre_hook(hook(l)) for l in layers]
    count = 0
    try:
        for i in tqdm(range(0, len(texts), batch_size), desc=f"key statistics L{','.join(map(str, layers))}",
                      unit="batch"):
            chunk = [tok.decode(tok(t, add_special_tokens=False)["input_ids"][:max_tokens]) for t in texts[i:i + batch_size]]
            chunk = [t if t.strip() else "." for t in chunk]
            batch = adapter.encode([grey] * len(chunk), chunk, targets=[""] * len(chunk)).to(adapter.device)
            ids = batch.inputs["input_ids"]
            # prompt text only: no image tokens, no padding, no (empty) answer / end-of-turn token
            mask["m"] = (batch.inputs["attention_mask"] != 0) & (ids != adapter.image_token_id) & (batch.labels == -100)
            count += int(mask["m"].sum())
            record_layer_output(adapter, max(layers), batch.inputs)
    finally:
        for h in handles:
            h.remove()
    return sums, count


def covariances(adapter: Adapter, layers: Sequence[int], module: str, *, corpus: str, n_samples: int,
                max_tokens: int, image_size: tuple[int, int], batch_size: int = 16,
                cache_dir: str | os.PathLike | None = None) -> dict[int, torch.Tensor]:
    """C_l = E[k k^T] (float32, on CPU, [d_k, d_k]) per layer, from the cache when the key matches."""
    layers = sorted(set(layers))
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    texts = load_corpus(corpus, n_samples)
    t = time.time()
    fps = model_fingerprints(adapter, layers)
    logger.debug(f"key statistics: model fingerprinted in {time.time() - t:.1f}s")
    common = dict(format=FORMAT, module=module, corpus=corpus_hash(texts), n_texts=len(texts), max_tokens=max_tokens,
                  image_size=list(image_size), prompt=adapter.chat_prompt("{text}"), adapter=type(adapter).__name__)
    keys = {l: _key(kind="cov", fingerprint=fps[l], layer=l, **common) for l in layers}
    paths = {l: cache / f"cov-L{l}-{module}-{keys[l][:20]}.safetensors" for l in layers}
    out = {l: v for l in layers if (v := _load(paths[l], keys[l])) is not None}
    todo = [l for l in layers if l not in out]
    if out:
        logger.info(f"key statistics: layers {sorted(out)} from the cache ({cache})")
    if todo:
        logger.info(f"key statistics: {len(texts)} corpus texts through layers <= {max(todo)} for layers {todo}")
        sums, count = _accumulate(adapter, todo, module, texts, max_tokens=max_tokens, image_size=image_size,
                                  batch_size=batch_size)
        if count == 0:
            raise ValueError("key statistics: the corpus gave no text tokens")
        for l in todo:
            out[l] = (sums[l] / count).float().cpu()
            _save(paths[l], out[l], {"key": keys[l], "layer": l, "tokens": count, **common, "fingerprint": fps[l]})
    return {l: out[l] for l in layers}


def null_space_projectors(covs: dict[int, torch.Tensor], module: str, *, threshold: float, cache_dir: str | os.PathLike | None = None) -> dict[int, torch.Tensor]:
    """AlphaEdit's P_l = U U^T over the eigenvectors of C_l with eigenvalue < ``threshold`` (float32,
    CPU). Cached under the covariance's content hash and the threshold."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = {}
    for l in sorted(covs):
        cov_id = hashlib.sha256(_digest(covs[l])).hexdigest()
        key = _key(kind="nullspace", cov=cov_id, threshold=threshold, format=FORMAT)
        path = cache / f"proj-L{l}-{module}-{key[:20]}.safetensors"
        p = _load(path, key)
        if p is None:
            evals, evecs = torch.linalg.eigh(covs[l].double())                   # ascending, [d_k], [d_k, d_k]
            u = evecs[:, evals < threshold]                                     # [d_k, null dims]
            p = (u @ u.T).float()
            logger.info(f"AlphaEdit layer {l}: null space {u.shape[1]} of {u.shape[0]} dims (eigenvalue < {threshold})")
            _save(path, p, {"key": key, "layer": l, "threshold": threshold, "null_dims": u.shape[1]})
        out[l] = p
    return out


def target_values_key(adapter: Adapter, samples, requests, layer: int, *, refusal: str, hparams) -> str:
    """Cache key of compute_vs's target values: the whole model's fingerprint (the values depend on
    every layer), the layer, the requests (image content, question, the benign KL question), the
    refusal and compute_vs's settings. MEMIT and AlphaEdit with the same settings share it."""
    fp = model_fingerprints(adapter, [adapter.num_layers - 1])[adapter.num_layers - 1]
    images = {}
    for r in requests:
        if r.sample not in images:
            images[r.sample] = hashlib.sha256(np.asarray(samples[r.sample].image).tobytes()).hexdigest()
    reqs = [[images[r.sample], r.question, list(samples[r.sample].benign)] for r in requests]
    hp = {k: getattr(hparams, k) for k in ("v_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor",
                                           "stop_loss", "contexts")}
    return _key(kind="values", format=FORMAT, fingerprint=fp, layer=layer, refusal=refusal,
                requests=hashlib.sha256(json.dumps(reqs).encode()).hexdigest(), prompt=adapter.chat_prompt("{text}"),
                hparams={k: list(v) if isinstance(v, tuple) else v for k, v in hp.items()})


def cached_target_values(key: str, layer: int, cache_dir: str | os.PathLike | None) -> tuple[Path, torch.Tensor | None]:
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"values-L{layer}-{key[:20]}.safetensors"
    return path, _load(path, key)


def save_target_values(path: Path, key: str, zs: torch.Tensor, layer: int) -> None:
    _save(path, zs.float().cpu(), {"key": key, "layer": layer, "n": zs.shape[0]})

