"""The image features (vision tower + projector) of a model as ONNX, with a parity check.

    export_vision("organism", "out/onnx")          # or a checkpoint folder, or an Adapter
    vision = OnnxVision("out/onnx")                # picks CUDA when onnxruntime and torch both have it
    feats = vision(pixel_values)                   # [B, N, D] float32, what get_image_features returns
    answers = vision.generate(adapter, images, texts, max_new_tokens=32)   # LM stays torch

Which module computes the features, with which config arguments, and which modules are the vision
part is the family's knowledge, declared as data by its adapter (``Adapter.vision_export``, a
``VisionExport``; LLaVA's: ``model.model.get_image_features(pixel_values, vision_feature_layer=...,
vision_feature_select_strategy=...)``, vision tower + projector). Families without one fixed-size
feature block per image (LLaVA-NeXT's tiles, ...) declare none and are refused. What is exported:
exactly what that call returns, stacked to one [B, N, D] tensor (the last part's, the projector's,
output), fp32, with a dynamic batch axis, through ``torch.onnx.export(dynamo=False)``.

How generation uses it: the token embeddings are computed in torch, the ONNX image features are
scattered into the image-token positions (as e.g. ``LlavaModel.forward`` does) and ``model.generate``
is called with ``inputs_embeds`` + ``attention_mask``. That path has the same meaning in every
transformers version (4.x returned a tensor from ``get_image_features``, 5.x an output object with
a list), and nothing on the model instance is patched.

Output folder (written atomically: temp folder + rename)::

    vision.onnx     the graph (input ``pixel_values`` [batch, 3, H, W], output ``image_features``)
    manifest.json   opset, input/output names and shapes, sha256 of vision.onnx, the vision weights'
                    fingerprint, config class, max abs diff measured at export, library versions
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import transformers
from loguru import logger
from PIL import Image

from . import organism
from .adapters import ADAPTERS, Adapter, VisionExport, adapter_class, load_adapter
from .atomic import Manifest, atomic_dir, sha256_file
from .devices import gpu_available

__all__ = [
    "OnnxVisionError",
    "OnnxParityError",
    "OnnxVision",
    "export_vision",
    "image_features",
    "vision_fingerprint",
    "merge_image_features",
    "greedy_config",
    "default_providers",
]

FORMAT = "ngguard-onnx-vision"
FORMAT_VERSION = 1
ONNX_FILE = "vision.onnx"
MANIFEST = "manifest.json"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_features"
PARITY_BATCHES = (1, 3)


class OnnxVisionError(ValueError):
    """An ONNX vision problem (bad folder, checksum mismatch, wrong model), as one line."""


class OnnxParityError(OnnxVisionError):
    """The exported graph does not reproduce the torch features within tolerance: nothing was written."""


# ---- the torch reference ---------------------------------------------------------------------------


def _vision(model: torch.nn.Module) -> tuple["VisionExport", torch.nn.Module]:
    """The family's ``VisionExport`` (``Adapter.vision_export``) and the module owning the vision path."""
    family = adapter_class(model)
    spec = family.vision_export if family is not None else None
    if spec is None:
        supported = [c for c, cls in ADAPTERS.items() if cls.vision_export is not None]
        raise OnnxVisionError(f"ONNX vision export supports {', '.join(supported)} models only, "
                              f"not {type(getattr(model, 'config', None)).__name__}")
    for path in spec.owners:
        try:
            owner = model.get_submodule(path)  # "": the model itself
        except AttributeError:
            continue
        if all(hasattr(owner, a) for a in (spec.features, *spec.parts)):
            return spec, owner
    raise OnnxVisionError(f"{type(model).__name__} has no vision path {spec.features} + {', '.join(spec.parts)}")


def _feature_args(model: torch.nn.Module) -> dict[str, Any]:
    spec = _vision(model)[0]
    return {a: getattr(model.config, a) for a in spec.feature_config}


def _stack(out: Any) -> torch.Tensor:
    """The feature function's result in any transformers version (a tensor, an output object, a list
    per image) as one [B, N, D] tensor."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None and isinstance(out, (list, tuple)):
        pooled = out
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(pooled, (list, tuple)) and pooled and all(isinstance(t, torch.Tensor) for t in pooled):
        return torch.stack(list(pooled))
    raise OnnxVisionError(f"unexpected image-feature output {type(out).__name__}")


@torch.no_grad()
def image_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The torch reference: the family's feature function with its config arguments, stacked to
    [B, N, D]."""
    spec, inner = _vision(model)
    return _stack(getattr(inner, spec.features)(pixel_values=pixel_values, **_feature_args(model)))


def vision_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over (name, shape, fp32 bytes) of every parameter and buffer of the vision tower and
    the projector, sorted by name. An edit of the language model does not change it."""
    spec, inner = _vision(model)
    h = hashlib.sha256()
    for prefix, module in ((f"{name}.", getattr(inner, name)) for name in spec.parts):
        state = module.state_dict()
        for name in sorted(state):
            t = state[name].detach().to("cpu", torch.float32).contiguous()
            h.update(json.dumps([prefix + name, list(t.shape)]).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


class _VisionGraph(torch.nn.Module):
    """pixel_values -> [B, N, D]: calls the model's own feature function and returns the last vision
    part's (the projector's) output tensor (captured by a hook), so the per-image list that
    transformers 5 builds afterwards (an unbind fixed to the traced batch size) is not part of the graph."""

    def __init__(self, inner: torch.nn.Module, spec: "VisionExport", feature_args: dict[str, Any]):
        super().__init__()
        self.inner = inner
        self.spec = spec
        self.feature_args = feature_args

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        box: list[torch.Tensor] = []
        hook = getattr(self.inner, self.spec.parts[-1]).register_forward_hook(lambda m, i, o: box.append(o))
        try:
            getattr(self.inner, self.spec.features)(pixel_values=pixel_values, **self.feature_args)
        finally:
            hook.remove()
        if len(box) != 1:
            raise OnnxVisionError(f"expected one {self.spec.parts[-1]} call in {self.spec.features}, saw {len(box)}")
        return box[0]


def _cpu_fp32_vision(model: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of the module owning the vision path whose vision parts are fp32 CPU deep copies
    (the caller's model is never moved, cast or mutated; the LM is not copied)."""
    spec, inner = _vision(model)
    shim = copy.copy(inner)
    shim._modules = dict(inner._modules)  # noqa: SLF001 - own dict, so assignments stay on the shim
    shim._parameters = dict(inner._parameters)  # noqa: SLF001
    shim._buffers = dict(inner._buffers)  # noqa: SLF001
    for name in spec.parts:
        shim._modules[name] = copy.deepcopy(getattr(inner, name)).to("cpu", torch.float32).eval()  # noqa: SLF001
    return shim


# ---- export ---------------------------------------------------------------------------------------


def _resolve(model_dir_or_adapter) -> tuple["Adapter", str | None]:
    if isinstance(model_dir_or_adapter, Adapter):
        return model_dir_or_adapter, None
    if isinstance(model_dir_or_adapter, (str, os.PathLike)):
        src = str(model_dir_or_adapter)
        if src == "organism":
            src = str(organism.checkpoint_path())
        # the checkpoint's own dtype: only the vision part is used, and it is copied to fp32 below
        return load_adapter(src, device="cpu"), src
    raise OnnxVisionError(f"export_vision: expected a model folder, 'organism' or an Adapter, "
                          f"got {type(model_dir_or_adapter).__name__}")


def _image_shape(adapter: "Adapter") -> tuple[int, int, int]:
    """(C, H, W) the processor produces, measured on a blank image (no config guessing)."""
    batch = adapter.encode([Image.new("RGB", (32, 32), (127, 127, 127))], ["x"])
    pv = batch.inputs.get("pixel_values")
    if pv is None or pv.dim() != 4:
        raise OnnxVisionError("the processor produced no 4-D pixel_values; only single-image "
                              "processors are supported")
    return tuple(int(x) for x in pv.shape[1:])  # type: ignore[return-value]


def onnxruntime():
    """The ``onnxruntime`` module with its telemetry events turned off (no calls home, whatever the
    build), imported on first use (an optional dependency, heavy to import)."""
    import onnxruntime as ort

    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
    return ort


def _session(model_bytes_or_path, providers: Sequence[str], threads: int | None = None):
    ort = onnxruntime()

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes_or_path, sess_options=opts, providers=list(providers))


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parity(session, reference: torch.nn.Module, shape: tuple[int, int, int], batches: Sequence[int],
            seed: int = 0) -> tuple[float, float]:
    """(max abs difference between onnxruntime and torch, max abs torch feature) on random N(0, 1)
    pixel batches of each size (wider than any processor's normalised range)."""
    gen = torch.Generator().manual_seed(seed)
    worst = scale = 0.0
    for b in batches:
        x = torch.randn((b, *shape), generator=gen, dtype=torch.float32)
        with torch.no_grad():
            want = reference(x).float().numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != want.shape:
            raise OnnxParityError(f"ONNX output shape {list(got.shape)} != torch {list(want.shape)} at batch {b}: "
                                  f"nothing written")
        if not np.isfinite(got).all():
            raise OnnxParityError(f"ONNX output has non-finite values at batch {b}: nothing written")
        worst = max(worst, float(np.abs(got - want).max()))
        scale = max(scale, float(np.abs(want).max()))
    return worst, scale


def export_vision(model_dir_or_adapter, out_dir: str | os.PathLike, *, opset: int = 17, atol: float = 1e-4,
                  rtol: float = 1e-5, overwrite: bool = False) -> Path:
    """Export vision tower + projector to ``out_dir/vision.onnx`` (+ ``manifest.json``).

    ``model_dir_or_adapter``: a checkpoint folder, "organism", or a loaded ``Adapter`` (its model is
    not changed: the vision part is copied to CPU fp32 for the export). The graph is checked with
    onnxruntime (CPU) against torch on random batches of 1 and 3 images; a max abs difference over
    ``atol + rtol * max|torch features|`` raises ``OnnxParityError`` and nothing is written.
    ``rtol`` scales the bound with the features' magnitude: fp32 rounding differences grow with it
    (the trained organism's features reach ~500, where one fp32 ulp is 3e-5 and onnxruntime and torch
    differ by ~2e-4, i.e. 4e-7 relative); ``rtol=0`` makes the check purely absolute. Returns
    ``out_dir``."""
    if isinstance(atol, bool) or not (isinstance(atol, (int, float)) and atol > 0):
        raise OnnxVisionError(f"atol must be a positive number, got {atol!r}")
    if isinstance(rtol, bool) or not (isinstance(rtol, (int, float)) and 0 <= rtol < 1):
        raise OnnxVisionError(f"rtol must be a number in [0, 1), got {rtol!r}")
    if not (isinstance(opset, int) and 9 <= opset <= 23):
        raise OnnxVisionError(f"opset must be an integer in 9..23, got {opset!r}")
    out_dir = Path(out_dir)
    if (out_dir.exists() or out_dir.is_symlink()) and not overwrite:  # fail before the slow part
        raise OnnxVisionError(f"{out_dir.absolute()} already exists (pass overwrite=True / --overwrite to replace it)")
    ort = onnxruntime()

    adapter, source = _resolve(model_dir_or_adapter)
    model = adapter.model
    spec, _ = _vision(model)  # refuses a family without an exportable vision path
    shape = _image_shape(adapter)
    graph = _VisionGraph(_cpu_fp32_vision(model), spec, _feature_args(model)).eval()
    dummy = torch.zeros((1, *shape), dtype=torch.float32)
    with torch.no_grad():
        n_tokens, dim = (int(x) for x in graph(dummy).shape[1:])

    t0 = time.perf_counter()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
        torch.onnx.export(graph, (dummy,), buf, dynamo=False, opset_version=opset, do_constant_folding=True,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    data = buf.getvalue()
    export_s = time.perf_counter() - t0

    # parity against the model's own feature function (not the hooked graph) on CPU fp32
    reference = _ReferenceFeatures(graph.inner, spec, graph.feature_args)
    session = _session(data, ["CPUExecutionProvider"])
    max_diff, scale = _parity(session, reference, shape, PARITY_BATCHES)
    bound = atol + rtol * scale
    if max_diff > bound:
        raise OnnxParityError(f"ONNX vision features differ from torch by {max_diff:.3g} > atol {atol:g} + "
                              f"rtol {rtol:g} x max|features| {scale:.3g} = {bound:.3g} (batches "
                              f"{list(PARITY_BATCHES)}): nothing written")

    import onnx  # optional (the export extra): only an export needs it

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "onnx_file": ONNX_FILE,
        "onnx_sha256": _sha256_bytes(data),
        "onnx_bytes": len(data),
        "opset": opset,
        "exporter": "torch.onnx.export(dynamo=False)",
        "input": {"name": INPUT_NAME, "shape": ["batch", *shape], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", n_tokens, dim], "dtype": "float32"},
        "model": {
            "config_class": type(model.config).__name__,
            "source": source,
            "vision_fingerprint": vision_fingerprint(model),
            **graph.feature_args,
        },
        "parity": {"max_abs_diff": max_diff, "max_abs_feature": scale, "atol": atol, "rtol": rtol,
                   "bound": bound, "batches": list(PARITY_BATCHES), "inputs": "N(0, 1) pixels, seed 0",
                   "provider": "CPUExecutionProvider"},
        "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    with atomic_dir(out_dir, overwrite=overwrite, error=OnnxVisionError) as tmp:
        (tmp / ONNX_FILE).write_bytes(data)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if sha256_file(tmp / ONNX_FILE) != manifest["onnx_sha256"]:
            raise OnnxVisionError(f"{ONNX_FILE} does not read back as written")
    logger.info("exported vision tower + projector to {} ({:.1f} MB, {:.1f} s, opset {}, max diff {:.2g} <= {:.2g})",
                out_dir, len(data) / 1e6, export_s, opset, max_diff, bound)
    return out_dir


class _ReferenceFeatures(_VisionGraph):
    """The same call as the graph, its result taken as the model returns it (``_stack``)."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _stack(getattr(self.inner, self.spec.features)(pixel_values=pixel_values, **self.feature_args))


# ---- runtime --------------------------------------------------------------------------------------


def default_providers() -> list[str]:
    """CUDA (then CPU as fallback) when onnxruntime has the CUDA provider AND torch sees a GPU;
    otherwise CPU only (onnxruntime-gpu on a machine without a GPU logs errors for CUDA)."""
    ort = onnxruntime()

    if "CUDAExecutionProvider" in ort.get_available_providers() and gpu_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


ONNX_MANIFEST = Manifest(MANIFEST, "ONNX vision", FORMAT, FORMAT_VERSION,
                         required=("onnx_file", "onnx_sha256", "input", "output", "model"),
                         error=OnnxVisionError, hint="; create it with export_vision")
read_manifest = ONNX_MANIFEST.read  # the export folder's manifest.json, checked


class OnnxVision:
    """An onnxruntime session over an ``export_vision`` folder.

    ``providers``: onnxruntime provider names; None = CUDA when torch sees a GPU, else CPU. CUDA
    asked for but not usable (a CPU build of onnxruntime, no GPU, no CUDA libraries): one warning
    line and the CPU provider. The onnx file's
    sha256 is checked against the manifest before the session is created.
    ``threads``: onnxruntime intra-op threads (None = onnxruntime's default)."""

    def __init__(self, onnx_dir: str | os.PathLike, providers: Sequence[str] | None = None, *,
                 threads: int | None = None):
        self.dir = Path(onnx_dir)
        self.manifest = read_manifest(self.dir)
        path = self.dir / self.manifest["onnx_file"]
        if not path.is_file():
            raise OnnxVisionError(f"{self.dir}: {self.manifest['onnx_file']} is missing")
        sha = sha256_file(path)
        if sha != self.manifest["onnx_sha256"]:
            raise OnnxVisionError(f"{path}: sha256 {sha[:12]} does not match the manifest's "
                                  f"{self.manifest['onnx_sha256'][:12]} (file changed or corrupted)")
        ort = onnxruntime()

        if providers is not None:
            wanted = list(providers)
        else:  # a GPU for torch means CUDA is wanted here too (a warning below if onnxruntime cannot)
            wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu_available() else default_providers()
        available = ort.get_available_providers()
        cuda = "CUDAExecutionProvider"
        if cuda in wanted and cuda not in available:  # e.g. the CPU build of onnxruntime
            logger.warning("ONNX vision: CUDA requested but this onnxruntime has no CUDA provider (install "
                           "onnxruntime-gpu); running on CPUExecutionProvider")
            wanted = [p for p in wanted if p != cuda]
            wanted += [] if "CPUExecutionProvider" in wanted else ["CPUExecutionProvider"]
            cuda = None
        unknown = [p for p in wanted if p not in available]
        if unknown:
            raise OnnxVisionError(f"onnxruntime provider(s) {unknown} not available here; "
                                  f"available: {available}")
        self.session = _session(str(path), wanted, threads)
        self.providers = list(self.session.get_providers())
        if cuda in wanted and cuda not in self.providers:  # onnxruntime-gpu without a usable GPU / CUDA libraries
            logger.warning("ONNX vision: the CUDA provider could not start (no usable GPU or CUDA libraries); "
                           "running on {}", ", ".join(self.providers))
        self.input_name = self.manifest["input"]["name"]
        self.output_name = self.manifest["output"]["name"]
        self._shape = tuple(self.manifest["input"]["shape"][1:])
        logger.info("ONNX vision {} on {}", path, ", ".join(self.providers))

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["vision_fingerprint"]

    def __call__(self, pixel_values: torch.Tensor | np.ndarray) -> torch.Tensor:
        """[B, C, H, W] pixels -> [B, N, D] float32 features, on the input's device (CPU for numpy)."""
        device = pixel_values.device if isinstance(pixel_values, torch.Tensor) else torch.device("cpu")
        x = pixel_values.detach().to("cpu", torch.float32).numpy() if isinstance(pixel_values, torch.Tensor) \
            else np.asarray(pixel_values, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self._shape:
            raise OnnxVisionError(f"pixel_values must be [batch, {', '.join(map(str, self._shape))}], "
                                  f"got {list(x.shape)}")
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x)})[0]
        return torch.from_numpy(out).to(device)

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ``OnnxVisionError`` unless ``model``'s vision weights are the exported ones."""
        fp = vision_fingerprint(model)
        if fp != self.fingerprint:
            raise OnnxVisionError(f"{self.dir}: exported from another model (vision fingerprint "
                                  f"{self.fingerprint[:12]}, this model's is {fp[:12]}); re-export it")

    def generate_inputs(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Turn encoded inputs (input_ids, attention_mask, pixel_values) into
        {inputs_embeds, attention_mask} for ``model.generate``: token embeddings in torch, image
        features from ONNX scattered into the image-token positions."""
        if "pixel_values" not in inputs:
            raise OnnxVisionError("inputs have no pixel_values")
        feats = self(inputs["pixel_values"])
        embeds = merge_image_features(model, inputs["input_ids"], feats)
        return {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}

    @torch.no_grad()
    def generate(self, adapter: "Adapter", images: Sequence["Image.Image"], texts: Sequence[str], *,
                 max_new_tokens: int = 32) -> list[str]:
        """Like ``adapter.generate`` (same prompts: ``adapter.encode``; greedy), with ONNX image
        features. Returns the stripped answers."""
        batch = adapter.encode(images, texts).to(adapter.device)
        kwargs = self.generate_inputs(adapter.model, batch.inputs)
        out = adapter.model.generate(**kwargs, generation_config=greedy_config(adapter, max_new_tokens))
        return [s.strip() for s in adapter.tokenizer.batch_decode(out, skip_special_tokens=True)]


def merge_image_features(model: torch.nn.Module, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``inputs_embeds`` as the model's forward builds them: embed the tokens, then put the image
    features (all images' tokens in order) into the image-token positions."""
    embeds = model.get_input_embeddings()(input_ids)
    spec = _vision(model)[0]
    token_id = next(v for v in (getattr(model.config, a, None) for a in spec.image_token_config) if v is not None)
    mask = input_ids == token_id
    n_tokens = int(mask.sum())
    n_feats = features.shape[0] * features.shape[1]
    if n_tokens != n_feats:
        raise OnnxVisionError(f"image features and image tokens do not match: {n_tokens} tokens, "
                              f"{n_feats} features")
    return embeds.masked_scatter(mask.unsqueeze(-1).to(embeds.device),
                                 features.to(embeds.device, embeds.dtype))


def greedy_config(adapter: "Adapter", max_new_tokens: int):
    """The generation config ``adapter.generate`` uses (``Adapter.greedy_config``)."""
    return adapter.greedy_config(max_new_tokens)
