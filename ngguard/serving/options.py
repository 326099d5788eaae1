"""The serving options, defined once: ``ServingOptions`` (``SERVING``: its defaults) is what the
wrapper (``ProtectedLVLM(..., serving=...)``, ``ProtectedLVLM.from_pretrained``), the CLI
(``ngguard serve``) and ``python -m serve.app`` take; both parsers are built by
``add_serve_arguments`` and read back by ``ServingOptions.from_args`` (argparse only: importing this
stays light). So an application calling ``guard.chat`` from many threads gets what the server gets:
per-row protection and the request batcher."""
from __future__ import annotations

import argparse
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from ngguard.device_maps import AUTO_MAPS  # the one list of device-map names (torch-free)

__all__ = ["ServingOptions", "SERVING", "add_serve_arguments", "serving_with_legacy"]

PROTECTIONS = ("rows", "merged")
DECODES = ("fast", "generate")
_MAX_CACHE = 1_000_000  # vision_cache entries, prefix_cache_mb
_MAX_WAIT_MS = 10_000


@dataclass(frozen=True)
class ServingOptions:
    """How a protected model is served. ``protection``: "rows" (the base weights + the patch applied
    per batch row, so base and protected answers share batches; without a patch: merged) or "merged"
    (the patched weights in the model, toggled under a lock); ``max_batch``: requests generated
    together by the request batcher (1: none; at most the guard's ``limits.max_batch``);
    ``batch_wait_ms``: how long an idle batcher waits for the next request; ``decode``: "fast"
    (``GreedyDecoder``) or "generate"; ``vision_cache``: image features kept (images);
    ``prefix_cache_mb``: prompt-prefix keys/values kept (MB); ``dedup``: identical rows of a batch
    generated once. A bad value raises ValueError naming the option.

        ServingOptions(protection="merged", max_batch=1)   # the patched weights, one request at a time
        SERVING.replace(decode="generate")                # the defaults but one"""

    protection: str = "rows"
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    decode: str = "fast"
    vision_cache: int = 256
    prefix_cache_mb: float = 64.0
    dedup: bool = True

    def __post_init__(self) -> None:
        for name, problem in _problems(dataclasses.asdict(self)):
            raise ValueError(f"serving option {name} {problem}")

    def replace(self, **changes: Any) -> "ServingOptions":
        """A copy with ``changes`` (checked)."""
        return dataclasses.replace(self, **changes)

    def per_row(self, has_patch: bool) -> bool:
        """Whether a guard with (``has_patch``) or without a patch applies it per batch row."""
        return has_patch and self.protection == "rows"

    @classmethod
    def from_args(cls, args: argparse.Namespace | Mapping[str, Any]) -> "ServingOptions":
        """The options of parsed ``add_serve_arguments`` arguments (missing ones: the defaults). A bad
        value raises ValueError naming the flag (``--max-batch must be ...``)."""
        given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        values = {f.name: given.get(f.name, getattr(SERVING, f.name)) for f in dataclasses.fields(cls)}
        if isinstance(values["dedup"], str):  # --dedup on|off
            if values["dedup"] not in ("on", "off"):
                raise ValueError(f"--dedup must be on or off, got {values['dedup']!r}")
            values["dedup"] = values["dedup"] == "on"
        for name, problem in _problems(values):
            raise ValueError(f"--{name.replace('_', '-')} {problem}")
        return cls(**values)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _problems(v: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(option, what is wrong) for each bad value of ``v`` (the fields of ``ServingOptions``)."""
    if v["protection"] not in PROTECTIONS:
        yield "protection", f"must be rows or merged, got {v['protection']!r}"
    if not _is_int(v["max_batch"]) or v["max_batch"] < 1:
        yield "max_batch", f"must be an integer >= 1, got {v['max_batch']!r}"
    if not _is_number(v["batch_wait_ms"]) or not 0 <= v["batch_wait_ms"] <= _MAX_WAIT_MS:
        yield "batch_wait_ms", f"must be in 0..{_MAX_WAIT_MS}, got {v['batch_wait_ms']!r}"
    if v["decode"] not in DECODES:
        yield "decode", f"must be fast or generate, got {v['decode']!r}"
    if not _is_int(v["vision_cache"]) or not 0 <= v["vision_cache"] <= _MAX_CACHE:
        yield "vision_cache", f"must be in 0..{_MAX_CACHE}, got {v['vision_cache']!r}"
    if not _is_number(v["prefix_cache_mb"]) or not 0 <= v["prefix_cache_mb"] <= _MAX_CACHE:
        yield "prefix_cache_mb", f"must be in 0..{_MAX_CACHE}, got {v['prefix_cache_mb']!r}"
    if not isinstance(v["dedup"], bool):
        yield "dedup", f"must be True or False, got {v['dedup']!r}"


SERVING = ServingOptions()

# The keywords ProtectedLVLM took before ServingOptions (kept for one release, DeprecationWarning):
# keyword -> (option, value of the option for the keyword's value)
_LEGACY = {
    "per_row": ("protection", lambda v: "rows" if v else "merged"),
    "max_batch": ("max_batch", lambda v: v),
    "batch_wait_ms": ("batch_wait_ms", lambda v: v),
    "fast_decode": ("decode", lambda v: "fast" if v else "generate"),
    "vision_cache": ("vision_cache", lambda v: v),
    "prefix_cache_mb": ("prefix_cache_mb", lambda v: v),
    "dedup": ("dedup", bool),
}


def serving_with_legacy(serving: ServingOptions | None, legacy: Mapping[str, Any], where: str) -> ServingOptions:
    """``serving`` (None: ``SERVING``) with the old keywords in ``legacy`` (``per_row=False``,
    ``max_batch=1``, ``fast_decode=...``; ``per_row=None``: unchanged) mapped onto it, with a
    DeprecationWarning; a keyword that is neither raises TypeError as Python does for ``where``."""
    serving = SERVING if serving is None else serving
    if not isinstance(serving, ServingOptions):
        raise TypeError(f"{where}: serving must be a ServingOptions, got {type(serving).__name__}")
    unknown = sorted(set(legacy) - set(_LEGACY))
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}")
    changes = {_LEGACY[k][0]: _LEGACY[k][1](v) for k, v in legacy.items() if v is not None}
    if legacy:
        warnings.warn(f"{where}: the keywords {', '.join(sorted(legacy))} are deprecated; pass "
                      f"serving=ServingOptions(...) (ngguard.serving.options)", DeprecationWarning, stacklevel=3)
    return serving.replace(**changes) if changes else serving


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
    p.add_argument("--device-map", default=None, choices=AUTO_MAPS,
                   help="spread a model larger than one device over the GPUs (accelerate; --device is then unused)")
    p.add_argument("--dtype", default=None,
                   help="e.g. float32, bfloat16 (default: float32 on CPU, else the checkpoint's)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for generation (default: torch's choice: $OMP_NUM_THREADS if set, else "
                        "the number of cores); 1 on a machine whose cores other jobs share")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--protection", choices=PROTECTIONS, default=SERVING.protection,
                   help="rows (default): base weights + the patch applied per batch row, so base and protected "
                        "answers share batches; merged: the patched weights in the model, toggled under a lock")
    p.add_argument("--max-batch", type=int, default=SERVING.max_batch,
                   help=f"requests generated together by the request batcher (default {SERVING.max_batch}; "
                        "1 = no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=SERVING.batch_wait_ms,
                   help="how long an idle batcher waits for the next request before it starts a batch; it keeps "
                        f"collecting while requests keep coming, at most 10x this since the first (default "
                        f"{SERVING.batch_wait_ms:g} ms)")
    p.add_argument("--decode", choices=DECODES, default=SERVING.decode,
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
