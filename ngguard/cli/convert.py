"""``ngguard convert minigpt4``: original (non-HF) checkpoints -> HF model folders (``ngguard.convert``)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import Subparsers, command_group, common, out_folder

# The handlers import the library inside themselves: `ngguard --help` stays fast, without torch (cli/__init__.py).


def add(sub: Subparsers) -> None:
    csub = command_group(sub, "convert", "convert an original (non-HF) checkpoint into an HF model folder",
                         ["minigpt4"])
    m = csub.add_parser("minigpt4", parents=[common()],
                        help="MiniGPT-4 v1 (.pth + LLaMA + BLIP-2 folders) -> Blip2ForConditionalGeneration folder")
    m.add_argument("--ckpt", type=Path, required=True,
                   help="MiniGPT-4 checkpoint (.pth, original layout; read with torch.load(weights_only=True))")
    m.add_argument("--llm", type=Path, required=True,
                   help="HF folder of the LLaMA-2-chat / Vicuna model it was trained with (safetensors + tokenizer)")
    m.add_argument("--blip2", type=Path, required=True,
                   help="HF BLIP-2 folder for the ViT + Q-Former (e.g. Salesforce/blip2-flan-t5-xxl, safetensors)")
    out_folder(m, "output model folder (written atomically)")
    m.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="cast the weights (default: keep each source's dtype)")
    m.set_defaults(func=cli_convert)


def cli_convert(args: argparse.Namespace) -> int:
    """Handler of ``ngguard convert minigpt4 --ckpt PTH --llm DIR --blip2 DIR --out DIR [--dtype D]
    [--overwrite]``."""
    from ngguard.convert import ConversionError, convert_minigpt4

    which = getattr(args, "convert_command", "minigpt4")
    if which != "minigpt4":
        raise ConversionError(f"unknown conversion {which!r}; available: minigpt4")
    out = convert_minigpt4(args.ckpt, args.llm, args.blip2, args.out, overwrite=getattr(args, "overwrite", False),
                           dtype=getattr(args, "dtype", None))
    report = json.loads((Path(out) / "minigpt4_conversion.json").read_text())
    print(f"wrote {out}: {report['tensors']} tensors ({len(report['from_ckpt'])} from the checkpoint, "
          f"{report['from_blip2']} from BLIP-2, {report['from_llm']} from the LLaMA folder); "
          f"image token {report['image_token']} = id {report['image_token_id']}")
    return 0
