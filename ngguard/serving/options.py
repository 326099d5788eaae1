"""The serving options, defined once: ``SERVING`` holds the defaults of the wrapper
(``ProtectedLVLM``, ``ProtectedLVLM.from_pretrained``), the CLI (``ngguard serve``) and
``python -m serve.app``; both parsers are built by ``add_serve_arguments`` (argparse only: importing
this stays light). So an application calling ``guard.chat`` from many threads gets what the server
gets: per-row protection and the request batcher."""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class ServingOptions:
    """How a protected model is served. ``protection``: "rows" (the base weights + the patch applied
    per batch row, so base and protected answers share batches; without a patch: merged) or "merged"
    (the patched weights in the model, toggled under a lock); ``max_batch``: requests generated
    together by the request batcher (1: none); ``batch_wait_ms``: how long an idle batcher waits for
    the next request; ``decode``: "fast" (``GreedyDecoder``) or "generate"; ``vision_cache``: image
    features kept (images); ``prefix_cache_mb``: prompt-prefix keys/values kept (MB); ``dedup``:
    identical rows of a batch generated once."""

    protection: str = "rows"
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    decode: str = "fast"
    vision_cache: int = 256
    prefix_cache_mb: float = 64.0
    dedup: bool = True


SERVING = ServingOptions()

from ngguard.device_maps import AUTO_MAPS as _DEVICE_MAPS  # torch-free; = ngguard.devices.AUTO_MAPS


def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``ngguard serve`` options to ``p``; returns ``p``."""
    p.add_argument("--model", default="organism", help="model folder (HF checkpoint) or 'organism' (default)")
    p.add_argument("--patch", default=None,
                   help="protection patch folder (default: the bundled one when serving the organism)")
    p.add_argument("--no-patch", action="store_true", help="serve the model unprotected")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 in Docker)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--vision", choices=("torch", "onnx"), default="torch", help="image features from torch or ONNX")
    p.add_argument("--onnx-dir", default=None, help="an export-onnx folder (default: export once into the cache)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--device-map", default=None, choices=_DEVICE_MAPS,
                   help="spread a model larger than one device over the GPUs (accelerate; --device is then unused)")
    p.add_argument("--dtype", default=None,
                   help="e.g. float32, bfloat16 (default: float32 on CPU, else the checkpoint's)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for generation (default: torch's choice: $OMP_NUM_THREADS if set, else "
                        "the number of cores); 1 on a machine whose cores other jobs share")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--protection", choices=("rows", "merged"), default=SERVING.protection,
                   help="rows (default): base weights + the patch applied per batch row, so base and protected "
                        "answers share batches; merged: the patched weights in the model, toggled under a lock")
    p.add_argument("--max-batch", type=int, default=SERVING.max_batch,
                   help=f"requests generated together by the request batcher (default {SERVING.max_batch}; "
                        "1 = no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=SERVING.batch_wait_ms,
                   help="how long an idle batcher waits for the next request before it starts a batch; it keeps "
                        f"collecting while requests keep coming, at most 10x this since the first (default "
                        f"{SERVING.batch_wait_ms:g} ms)")
    p.add_argument("--decode", choices=("fast", "generate"), default=SERVING.decode,
                   help="fast (default): serving's greedy loop, finished rows leave the batch (checked against "
                        "transformers' generate on the first batch; models it does not cover use generate); "
                        "generate: transformers' generate only")
    p.add_argument("--vision-cache", type=int, default=SERVING.vision_cache,
                   help=f"image features kept by image content, for images seen again (default {SERVING.vision_cache} "
                        "images; 0 = off)")
    p.add_argument("--prefix-cache-mb", type=float, default=SERVING.prefix_cache_mb,
                   help="keys/values of prompt prefixes up to the image (a question about an image asked about "
                        "before, several questions about one image in a batch) kept by image content and "
                        f"protection state, at most this many MB (default {SERVING.prefix_cache_mb:g}; 0 = off; "
                        "with --decode fast)")
    p.add_argument("--dedup", choices=("on", "off"), default="on" if SERVING.dedup else "off",
                   help="on (default): requests of one batch with the same image content, question and protection "
                        "state are generated once")
    p.add_argument("--concurrency", type=int, default=None,
                   help="worker slots per event (default: max(2, --max-batch))")
    p.add_argument("--max-queue", type=int, default=64, help="queued requests before new ones are refused")
    p.add_argument("--expose-base", choices=("auto", "on", "off"), default="auto",
                   help="serve the unprotected base model too (the Compare tab, /chat with protected=False): "
                        "auto = on for a loopback --host, off otherwise; 'on' is the demo mode")
    p.add_argument("--trusted-proxies", default="", metavar="ADDRS",
                   help="comma-separated IP addresses or networks (CIDR) of reverse proxies whose X-Forwarded-For is "
                        "believed for the login back-off (default: none; the client is the TCP peer)")
    p.add_argument("--key-file", default=None,
                   help="patch signing key file (default: $NGGUARD_PATCH_KEY); with a key, the patch must carry "
                        "a valid patch.sig")
    return p
