"""MiniGPT-4 (v1) -> a transformers ``Blip2ForConditionalGeneration`` folder (safetensors).

MiniGPT-4 v1 = EVA ViT-g (+ ``ln_vision``) + the BLIP-2 Q-Former with 32 query tokens + ONE linear
projection ``llama_proj`` + a frozen LLaMA-2-chat / Vicuna language model. That is exactly the shape of
``Blip2ForConditionalGeneration`` with a ``LlamaConfig`` text config (transformers 5 builds
``LlamaForCausalLM`` for it), so the conversion is a renaming, no new module:

=================================  ===========================================================
where it comes from                 where it goes (Blip2ForConditionalGeneration keys)
=================================  ===========================================================
MiniGPT-4 .pth ``llama_proj.*``     ``language_projection.*``                      (required)
BLIP-2 HF folder (safetensors)      ``vision_model.*``, ``qformer.*``, ``query_tokens`` (as is)
LLaMA HF folder (safetensors)       ``model.*`` -> ``language_model.model.*``,
                                    ``lm_head.weight`` -> ``language_model.lm_head.weight``
=================================  ===========================================================

The released MiniGPT-4 checkpoints (``pretrained_minigpt4*.pth``, ``{"model": state_dict}``) hold only
``llama_proj``: MiniGPT-4 trains nothing else and takes the ViT + Q-Former from BLIP-2's
``blip2_pretrained_flant5xxl.pth`` -- the checkpoint the HF folder ``Salesforce/blip2-flan-t5-xxl`` was
converted from -- and the LM from the LLaMA folder. A .pth may also hold those parts in MiniGPT-4's
ORIGINAL layout (a full ``state_dict()``); they then override the folders, as MiniGPT-4's own loading
does (its checkpoint is loaded last). Original-layout renames (those of transformers' BLIP-2 conversion
script; EVA's separate ``q_bias``/``v_bias`` become the HF ``qkv.bias`` = [q_bias, 0, v_bias]):

    visual_encoder.cls_token / pos_embed            -> vision_model.embeddings.class_embedding / position_embedding
    visual_encoder.patch_embed.proj.*               -> vision_model.embeddings.patch_embedding.*
    visual_encoder.blocks.N.norm1|norm2.*           -> vision_model.encoder.layers.N.layer_norm1|layer_norm2.*
    visual_encoder.blocks.N.attn.qkv.weight         -> vision_model.encoder.layers.N.self_attn.qkv.weight
    visual_encoder.blocks.N.attn.q_bias + v_bias    -> vision_model.encoder.layers.N.self_attn.qkv.bias
    visual_encoder.blocks.N.attn.proj.*             -> vision_model.encoder.layers.N.self_attn.projection.*
    visual_encoder.blocks.N.mlp.fc1|fc2.*           -> vision_model.encoder.layers.N.mlp.fc1|fc2.*
    ln_vision.*                                     -> vision_model.post_layernorm.*
    query_tokens                                    -> query_tokens
    Qformer.bert.embeddings.LayerNorm.*             -> qformer.layernorm.*
    Qformer.bert.encoder.layer.N.(cross)attention.self.*  -> qformer.encoder.layer.N.(cross)attention.attention.*
    Qformer.bert.encoder.layer.N.<rest>             -> qformer.encoder.layer.N.<rest>  (output, *_query)
    llama_model.model.* / llama_model.lm_head.*     -> language_model.model.* / language_model.lm_head.*

Derived buffers (``Qformer.bert.embeddings.position_ids``, ``rotary_emb.inv_freq``) are skipped and
listed in the report. Any other key -- in the .pth, the BLIP-2 folder or the LLaMA folder -- is refused
with one line listing the keys; so is any weight the model needs and no source provides, and any shape
mismatch. The BLIP-2 folder's own language model and projection (OPT/Flan-T5 ``language_model.*``,
``language_projection.*``) are replaced by design; their key count is in the report.

Tokens: MiniGPT-4 marks the image with "<ImageHere>" inside "<Img>...</Img>". The LLaMA tokenizer gets
"<ImageHere>" as a special token (its ``image_token``); when that id is past the embedding matrix, one
row is appended (embedding: mean of the others; ``lm_head``: zeros, and the id is in
``generation_config.suppress_tokens`` so it is never generated). The image token's embedding is never
used (the Q-Former outputs replace it). A missing pad token is set to eos, as MiniGPT-4 v1 does.

Prompt: ``MINIGPT4_CHAT_TEMPLATE`` (MiniGPT-4's LLaMA-2 conversation: system text, then
"<s>[INST] <Img><ImageHere></Img> {question} [/INST]"). Image preprocessing: MiniGPT-4's eval
transform (resize to image_size x image_size, bicubic, CLIP mean/std) as a ``BlipImageProcessor``.
``Blip2Processor`` only prepends query tokens; ``Blip2Adapter`` expands the placeholder in place.

Output: written into a temp folder next to ``out_dir`` and renamed (atomic); holds config.json,
generation_config.json, sharded model*.safetensors (+ index), the processor/tokenizer files and
``minigpt4_conversion.json`` (sources, sha256 of the .pth, key counts per source, what was skipped).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, GenerationConfig
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from ngguard.adapters.blip2 import MINIGPT4_CHAT_TEMPLATE, MINIGPT4_IMAGE_TOKEN
from ..atomic import atomic_dir, sha256_file


class ConversionError(ValueError):
    """A checkpoint that cannot be converted (one line, naming what is wrong)."""


# ---- key mapping (original MiniGPT-4 layout -> Blip2ForConditionalGeneration) ------------------------

_QF = r"Qformer\.bert\.encoder\.layer\.(\d+)\."
_VE = r"visual_encoder\.blocks\.(\d+)\."
_PTH_RULES: list[tuple[re.Pattern, str]] = [(re.compile(p + r"\Z"), r) for p, r in [
    (r"llama_proj\.(weight|bias)", r"language_projection.\1"),
    (r"query_tokens", "query_tokens"),
    (r"ln_vision\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
    (_VE + r"norm([12])\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (_VE + r"attn\.qkv\.weight", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (_VE + r"attn\.proj\.(weight|bias)", r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
    (_VE + r"mlp\.(fc1|fc2)\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.layernorm.\1"),
    (_QF + r"(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.attention.\3.\4"),
    (_QF + r"(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.output.\3.\4"),
    (_QF + r"intermediate_query\.dense\.(weight|bias)", r"qformer.encoder.layer.\1.intermediate_query.dense.\2"),
    (_QF + r"output_query\.(dense|LayerNorm)\.(weight|bias)", r"qformer.encoder.layer.\1.output_query.\2.\3"),
    (r"llama_model\.model\.(.+)", r"language_model.model.\1"),
    (r"llama_model\.lm_head\.weight", "language_model.lm_head.weight"),
]]
# EVA attention biases: q and v are separate parameters, HF keeps one qkv bias [q, 0 (k), v]
_QV_BIAS = re.compile(_VE + r"attn\.(q|v)_bias\Z")
# buffers recomputed by the model, not weights: skipped (and reported)
_DERIVED = re.compile(r"(Qformer\.bert\.embeddings\.position_ids|.*rotary_emb\.inv_freq)\Z")

REQUIRED_FROM_CKPT = ("llama_proj.weight", "llama_proj.bias")
_BLIP2_USED = re.compile(r"(vision_model\.|qformer\.|query_tokens\Z)")
_BLIP2_REPLACED = re.compile(r"(language_model\.|language_projection\.)")
_MAX_LISTED = 40


def map_minigpt4_key(key: str) -> str | None:
    """The ``Blip2ForConditionalGeneration`` key of an original MiniGPT-4 key; None if unknown. EVA's
    ``attn.q_bias`` / ``attn.v_bias`` both map to ``self_attn.qkv.bias`` (concatenated with zeros)."""
    m = _QV_BIAS.match(key)
    if m:
        return f"vision_model.encoder.layers.{m.group(1)}.self_attn.qkv.bias"
    for pattern, repl in _PTH_RULES:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return None


def _listing(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


# ---- sources ---------------------------------------------------------------------------------------

Loader = Callable[[], torch.Tensor]


@dataclass
class _Src:
    """Where one output tensor comes from (loaded lazily)."""

    label: str                     # "ckpt:<key>", "blip2:<key>" or "llm:<key>" (+ notes)
    load: Loader
    shape: tuple[int, ...]
    dtype: torch.dtype


def _load_pth(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict of a MiniGPT-4 .pth (``{"model": sd, ...}`` or a bare sd) + the ignored top-level
    entries (training state next to "model")."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling problem in one line
        raise ConversionError(f"{path}: cannot read with torch.load(weights_only=True): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state dict (a mapping), got {type(obj).__name__}")
    ignored: list[str] = []
    if "model" in obj and isinstance(obj["model"], Mapping):
        ignored = sorted(str(k) for k in obj if k != "model")
        obj = obj["model"]
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: entries that are not tensors: {_listing(bad)}")
    return {str(k): v for k, v in obj.items()}, ignored


def _weight_files(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{what} folder {folder} has no .safetensors weights (only safetensors are read)")
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{what} folder {folder} has no config.json")
    return files


def _index_folder(folder: Path, what: str) -> dict[str, tuple[Path, tuple[int, ...], torch.dtype]]:
    """key -> (file, shape, dtype) of every tensor in the folder's safetensors files (headers only)."""
    out: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}
    for f in _weight_files(folder, what):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                if k in out:
                    raise ConversionError(f"{what} folder {folder}: tensor {k} is in both {out[k][0].name} "
                                          f"and {f.name}")
                sl = fh.get_slice(k)
                out[k] = (f, tuple(sl.get_shape()), _st_dtype(sl.get_dtype()))
    return out


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _st_dtype(name: str) -> torch.dtype:
    return _ST_DTYPES.get(name, torch.float32)


def _file_loader(path: Path, key: str) -> Loader:
    def load() -> torch.Tensor:
        with safe_open(str(path), "pt") as fh:
            return fh.get_tensor(key)
    return load


# ---- processor pieces (also used to build tiny MiniGPT-4-shaped models in the tests) ----------------------


def minigpt4_tokenizer(llm_dir: str | os.PathLike):
    """The LLaMA folder's tokenizer with MiniGPT-4's image placeholder "<ImageHere>" as its special
    ``image_token`` (added if new), pad = eos if it has no pad token, and the MiniGPT-4 chat template."""
    tok = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True,
                                        extra_special_tokens={"image_token": MINIGPT4_IMAGE_TOKEN})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.chat_template = MINIGPT4_CHAT_TEMPLATE
    return tok


def minigpt4_image_processor(image_size: int = 224):
    """MiniGPT-4's eval transform (``Blip2ImageEvalProcessor``): resize to image_size x image_size
    (bicubic), scale to [0, 1], normalise with the CLIP mean/std."""
    from transformers import BlipImageProcessor  # here, not on top: importing it warns when torchvision is missing

    return BlipImageProcessor(size={"height": image_size, "width": image_size}, resample=PILImageResampling.BICUBIC,
                              do_rescale=True, do_normalize=True, image_mean=list(OPENAI_CLIP_MEAN),
                              image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True)


def minigpt4_processor(tokenizer, image_processor, num_query_tokens: int):
    """A ``Blip2Processor`` carrying the MiniGPT-4 tokenizer, image processor and chat template."""
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
    processor.chat_template = MINIGPT4_CHAT_TEMPLATE
    return processor


# ---- the conversion ------------------------------------------------------------------------------------


def _expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor ``save_pretrained`` would write for ``config`` (built on the meta
    device: no memory). Tied weights appear once, non-persistent buffers not at all."""
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    all_params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    out = {n: tuple(p.shape) for n, p in model.named_parameters()}  # deduplicated: tied weights once
    for k, v in model.state_dict().items():
        if k not in all_params:  # persistent buffers
            out[k] = tuple(v.shape)
    return out


def convert_minigpt4(ckpt_pth: str | os.PathLike, llm_dir: str | os.PathLike, blip2_dir: str | os.PathLike,
                     out_dir: str | os.PathLike, *, overwrite: bool = False, dtype: str | torch.dtype | None = None,
                     max_shard_bytes: int = 4 << 30) -> Path:
    """Convert MiniGPT-4 (v1) into a ``Blip2ForConditionalGeneration`` folder at ``out_dir``.

    ``ckpt_pth``: the MiniGPT-4 checkpoint (``llama_proj`` at least; original key layout).
    ``llm_dir``: the LLaMA-2-chat / Vicuna HF folder it was trained with (safetensors, tokenizer).
    ``blip2_dir``: an HF BLIP-2 folder for the ViT + Q-Former (``Salesforce/blip2-flan-t5-xxl``).
    ``dtype``: cast floating tensors to it (e.g. "float16"); None keeps each source's dtype.
    Returns ``out_dir``. Raises ``ConversionError`` (one line) for unknown, missing or misshapen keys."""
    ckpt_pth, llm_dir, blip2_dir, out_dir = (Path(p).expanduser() for p in (ckpt_pth, llm_dir, blip2_dir, out_dir))
    if not ckpt_pth.is_file():
        raise FileNotFoundError(f"MiniGPT-4 checkpoint not found: {ckpt_pth}")
    if out_dir.exists() and not overwrite:
        raise ConversionError(f"{out_dir.absolute()} already exists (pass overwrite=True / --overwrite to replace it)")
    o = out_dir.resolve()
    for other in (ckpt_pth, llm_dir, blip2_dir):
        r = other.resolve()
        if o == r or r in o.parents or o in r.parents:
            raise ConversionError(f"output folder {out_dir} must not be, contain or lie inside the input {other}")
    cast = None
    if dtype is not None:
        cast = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."), None)
        if not isinstance(cast, torch.dtype) or not cast.is_floating_point:
            raise ConversionError(f"unknown dtype {dtype!r} (use float32, float16 or bfloat16)")

    # 1. the MiniGPT-4 checkpoint, original layout
    pth, pth_ignored = _load_pth(ckpt_pth)
    missing_req = [k for k in REQUIRED_FROM_CKPT if k not in pth]
    if missing_req:
        raise ConversionError(f"{ckpt_pth}: missing MiniGPT-4 keys: {_listing(missing_req)} "
                              f"(found: {_listing(pth) if pth else 'nothing'})")
    sources: dict[str, _Src] = {}  # target key -> its source
    unknown, derived, qv = [], [], {}
    for k, v in pth.items():
        if _DERIVED.match(k):
            derived.append(k)
            continue
        m = _QV_BIAS.match(k)
        if m:
            qv.setdefault(map_minigpt4_key(k), {})[m.group(2)] = (k, v)
            continue
        target = map_minigpt4_key(k)
        if target is None:
            unknown.append(k)
        else:
            sources[target] = _Src(f"ckpt:{k}", (lambda v=v: v), tuple(v.shape), v.dtype)
    if unknown:
        raise ConversionError(f"{ckpt_pth}: keys unknown to MiniGPT-4 v1: {_listing(unknown)}")
    for target, parts in qv.items():
        if set(parts) != {"q", "v"}:
            have = next(iter(parts.values()))[0]
            raise ConversionError(f"{ckpt_pth}: {have} has no matching "
                                  f"{'v_bias' if 'q' in parts else 'q_bias'} (EVA needs both)")
        q, v = parts["q"][1], parts["v"][1]
        if q.shape != v.shape:
            raise ConversionError(f"{ckpt_pth}: {parts['q'][0]} {list(q.shape)} and {parts['v'][0]} "
                                  f"{list(v.shape)} differ")
        sources[target] = _Src(f"ckpt:{parts['q'][0]}+{parts['v'][0]}",
                               (lambda q=q, v=v: torch.cat([q, torch.zeros_like(v), v])), (q.shape[0] * 3,), q.dtype)

    # 2. BLIP-2 folder: ViT + Q-Former + query tokens (HF layout)
    _weight_files(blip2_dir, "BLIP-2")
    blip2_config = AutoConfig.from_pretrained(blip2_dir, local_files_only=True)
    if type(blip2_config).__name__ != "Blip2Config":
        raise ConversionError(f"{blip2_dir} is not a BLIP-2 folder (config class {type(blip2_config).__name__})")
    blip2 = _index_folder(blip2_dir, "BLIP-2")
    replaced = [k for k in blip2 if _BLIP2_REPLACED.match(k)]
    unknown = [k for k in blip2 if not _BLIP2_USED.match(k) and not _BLIP2_REPLACED.match(k)]
    if unknown:
        raise ConversionError(f"{blip2_dir}: keys that are not BLIP-2 ViT / Q-Former / language model: "
                              f"{_listing(unknown)}")
    from_blip2 = 0
    for k, (f, shape, dt) in blip2.items():
        if _BLIP2_USED.match(k) and k not in sources:
            sources[k] = _Src(f"blip2:{k}", _file_loader(f, k), shape, dt)
            from_blip2 += 1

    # 3. LLaMA folder: the language model
    _weight_files(llm_dir, "LLaMA")
    llm_config = AutoConfig.from_pretrained(llm_dir, local_files_only=True)
    if type(llm_config).__name__ != "LlamaConfig":
        raise ConversionError(f"{llm_dir}: MiniGPT-4 v1 uses a LLaMA/Vicuna language model, "
                              f"got config class {type(llm_config).__name__}")
    llm = _index_folder(llm_dir, "LLaMA")
    unknown = []
    from_llm = 0
    for k, (f, shape, dt) in llm.items():
        if _DERIVED.match(k):
            derived.append(f"llm:{k}")
            continue
        if k.startswith("model."):
            target = "language_model." + k
        elif k == "lm_head.weight":
            target = "language_model.lm_head.weight"
        else:
            unknown.append(k)
            continue
        if target not in sources:
            sources[target] = _Src(f"llm:{k}", _file_loader(f, k), shape, dt)
            from_llm += 1
    if unknown:
        raise ConversionError(f"{llm_dir}: keys that are not LlamaForCausalLM weights: {_listing(unknown)}")

    # 4. tokenizer + image token; vocabulary rows for it
    tokenizer = minigpt4_tokenizer(llm_dir)
    image_token_id = int(tokenizer.convert_tokens_to_ids(MINIGPT4_IMAGE_TOKEN))
    emb_key, head_key = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
    if emb_key not in sources:
        raise ConversionError(f"{llm_dir}: missing the token embeddings model.embed_tokens.weight")
    vocab = sources[emb_key].shape[0]
    new_vocab = max(vocab, len(tokenizer), image_token_id + 1)
    extended = new_vocab - vocab
    if extended:
        for key, how in ((emb_key, "mean"), (head_key, "zeros")):
            if key in sources:
                src = sources[key]
                sources[key] = _Src(f"{src.label} + {extended} new row(s) ({how})",
                                    (lambda load=src.load, how=how: _append_rows(load(), extended, how)),
                                    (new_vocab, *src.shape[1:]), src.dtype)

    # 5. the BLIP-2 config of MiniGPT-4 and the tensors it needs
    n_query = int(pth["query_tokens"].shape[1]) if "query_tokens" in pth else int(blip2_config.num_query_tokens)
    text_config = llm_config.to_dict()
    text_config["vocab_size"] = new_vocab
    if cast is not None:
        text_config["dtype"] = str(cast).removeprefix("torch.")
    if text_config.get("pad_token_id") is None:
        text_config["pad_token_id"] = tokenizer.pad_token_id
    config = Blip2Config(
        vision_config=blip2_config.vision_config.to_dict(),
        qformer_config=blip2_config.qformer_config.to_dict(),
        text_config=text_config,
        num_query_tokens=n_query,
        image_token_index=image_token_id,
    )
    if not config.use_decoder_only_language_model:
        raise ConversionError("internal: the LLaMA text config did not give a decoder-only BLIP-2 model")
    llm_dtype = getattr(llm_config, "dtype", None) or getattr(llm_config, "torch_dtype", None)
    if cast is not None or llm_dtype is not None:
        config.dtype = cast or llm_dtype
    expected = _expected_tensors(config)
    if head_key in sources and head_key not in expected:  # tied LM head: the embeddings serve
        derived.append(f"{sources.pop(head_key).label} (tied to the embeddings)")
    missing = [k for k in expected if k not in sources]
    extra = [k for k in sources if k not in expected]
    if missing:
        raise ConversionError(f"weights MiniGPT-4 needs that no source provides: {_listing(missing)}")
    if extra:
        raise ConversionError(f"weights with no place in the converted model: "
                              f"{_listing(sources[k].label for k in extra)}")
    wrong = [f"{sources[k].label} {list(sources[k].shape)} (expected {list(expected[k])} for {k})"
             for k in expected if tuple(sources[k].shape) != tuple(expected[k])]
    if wrong:
        raise ConversionError(f"shape mismatches: {_listing(wrong)}")

    # 6. write
    generation = GenerationConfig.from_pretrained(llm_dir, local_files_only=True) \
        if (llm_dir / "generation_config.json").is_file() else GenerationConfig()
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.suppress_tokens = sorted(set(generation.suppress_tokens or []) | {image_token_id})
    processor = minigpt4_processor(tokenizer, minigpt4_image_processor(int(config.vision_config.image_size)), n_query)
    report = {
        "format": "ngguard.minigpt4_conversion/1",
        "sources": {"ckpt": str(ckpt_pth), "ckpt_sha256": sha256_file(ckpt_pth), "llm": str(llm_dir),
                    "blip2": str(blip2_dir)},
        "model_class": "Blip2ForConditionalGeneration",
        "tensors": len(expected),
        "from_ckpt": {k: v.label.removeprefix("ckpt:") for k, v in sorted(sources.items())
                      if v.label.startswith("ckpt:")},
        "from_blip2": from_blip2,
        "from_llm": from_llm,
        "blip2_language_model_replaced": len(replaced),
        "skipped_derived_buffers": sorted(derived),
        "ckpt_top_level_ignored": pth_ignored,
        "image_token": MINIGPT4_IMAGE_TOKEN,
        "image_token_id": image_token_id,
        "vocab": {"llm": vocab, "converted": new_vocab, "rows_added": extended},
        "num_query_tokens": n_query,
        "dtype": str(cast) if cast is not None else "as in the sources",
    }
    with atomic_dir(out_dir, overwrite=overwrite, error=ConversionError) as tmp:
        _write_shards(tmp, sources, expected, cast, max_shard_bytes)
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "minigpt4_conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    return out_dir


def _append_rows(t: torch.Tensor, n: int, how: str) -> torch.Tensor:
    new = t.float().mean(0, keepdim=True).expand(n, -1).to(t.dtype) if how == "mean" else t.new_zeros((n, *t.shape[1:]))
    return torch.cat([t, new])


def _write_shards(folder: Path, sources, expected, cast, max_bytes: int) -> None:
    """Write the tensors in ``expected`` order into shards of at most ``max_bytes`` (one shard:
    model.safetensors; several: model-0000i-of-0000n.safetensors + model.safetensors.index.json).
    Only one shard's tensors are held in memory."""
    def nbytes(k):
        n = 1
        for d in expected[k]:
            n *= d
        dt = sources[k].dtype
        return n * (cast.itemsize if cast is not None and dt.is_floating_point else dt.itemsize)

    groups: list[list[str]] = [[]]
    size = 0
    for k in expected:
        b = nbytes(k)
        if groups[-1] and size + b > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += b
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map, total = {}, 0
    for name, keys in zip(names, groups):
        tensors = {}
        for k in keys:
            t = sources[k].load()
            if cast is not None and t.is_floating_point():
                t = t.to(cast)
            tensors[k] = t.contiguous()
            total += t.numel() * t.element_size()
            weight_map[k] = name
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
