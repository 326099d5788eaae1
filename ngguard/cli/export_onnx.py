"""``ngguard export-onnx``: the vision tower + projector as ONNX (``ngguard.onnx_vision``)."""
from __future__ import annotations

import argparse

from .common import Subparsers, common, out_folder

# The handlers import the library inside themselves: `ngguard --help` stays fast, without torch (cli/__init__.py).


def add(sub: Subparsers) -> None:
    p = sub.add_parser("export-onnx", parents=[common()], help="export the vision tower + projector to ONNX",
                       description="Export vision tower + projector to OUT/vision.onnx (+ manifest.json) with a "
                                   "parity check against torch (batches 1 and 3); nothing is written if it fails.")
    p.add_argument("--model", required=True, help="model folder (HF checkpoint), or 'organism' for the bundled model")
    out_folder(p, "output folder", overwrite="replace an existing output folder")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--atol", type=float, default=1e-4, help="absolute part of the allowed difference")
    p.add_argument("--rtol", type=float, default=1e-5, help="relative part (times max abs feature)")
    p.set_defaults(func=cli_export_onnx)


def cli_export_onnx(args: argparse.Namespace) -> int:
    """``ngguard export-onnx --model PATH --out DIR [--opset N] [--atol X] [--rtol X] [--overwrite]``.
    Errors propagate as ``OnnxVisionError`` (a ValueError)."""
    from ngguard.onnx_vision import ONNX_FILE, export_vision, read_manifest

    out = export_vision(args.model, args.out, opset=getattr(args, "opset", 17), atol=getattr(args, "atol", 1e-4),
                        rtol=getattr(args, "rtol", 1e-5), overwrite=getattr(args, "overwrite", False))
    m = read_manifest(out)
    par = m["parity"]
    print(f"wrote {out / ONNX_FILE} (max abs diff {par['max_abs_diff']:.2g}, allowed {par['bound']:.2g}, "
          f"on batches {par['batches']}; opset {m['opset']})")
    return 0
