"""ONNX (onnxruntime) vs torch latency of the vision tower + projector, side by side in one run.

    python bench/onnx_vs_torch.py                      # the organism (or a random organism-shaped model)
    python bench/onnx_vs_torch.py --model PATH --batches 1 32 --threads 2 --repeats 30

Both sides run fp32 on the CPU with the same number of threads; measurements alternate torch /
ONNX per repetition so that load from other processes hits both alike. Prints the median and p90
latency per batch size and the ratio torch/onnx (> 1: ONNX is faster).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def load_model(name: str):
    """(adapter, description). "organism" falls back to a random model of the organism's shape."""
    from ngguard.adapters import adapter_for, load_adapter

    if name != "organism":
        return load_adapter(name, device="cpu", dtype=torch.float32), name
    from ngguard.organism import CHECKPOINT

    if (CHECKPOINT / "config.json").is_file():
        return load_adapter(CHECKPOINT, device="cpu", dtype=torch.float32), "organism (bundled checkpoint)"
    from transformers import LlavaForConditionalGeneration

    from ngguard.organism.build import build_config, build_processor, build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(build_config(tok)).eval()
    return adapter_for(model, build_processor(tok)), "random weights, organism shape (checkpoint not built yet)"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="organism")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, default=1, help="threads for torch AND onnxruntime (default 1)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from ngguard.onnx_vision import OnnxVision, export_vision, image_features

    torch.set_num_threads(args.threads)
    adapter, desc = load_model(args.model)
    n_params = sum(t.numel() for m in (adapter.model.model.vision_tower, adapter.model.model.multi_modal_projector)
                   for t in m.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = export_vision(adapter, Path(tmp) / "vision")
        export_s = time.perf_counter() - t0
        vision = OnnxVision(out, providers=["CPUExecutionProvider"], threads=args.threads)
        shape = tuple(vision.manifest["input"]["shape"][1:])
        size_mb = (out / "vision.onnx").stat().st_size / 1e6
        print(f"model: {desc}; vision tower + projector {n_params / 1e6:.2f} M params; input {list(shape)}")
        print(f"export: {export_s:.2f} s, {size_mb:.1f} MB, parity max diff "
              f"{vision.manifest['parity']['max_abs_diff']:.2g}; threads {args.threads}; "
              f"{args.repeats} repeats (median, p90)")
        print(f"{'batch':>5} | {'torch ms':>10} {'p90':>8} | {'onnx ms':>10} {'p90':>8} | "
              f"{'torch/onnx':>10} | max diff")
        for b in args.batches:
            x = torch.randn((b, *shape), generator=torch.Generator().manual_seed(b))
            for _ in range(args.warmup):
                image_features(adapter.model, x)
                vision(x)
            tt, to = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                ref = image_features(adapter.model, x)
                tt.append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                got = vision(x)
                to.append((time.perf_counter() - t) * 1e3)
            diff = (got - ref).abs().max().item()
            mt, mo = statistics.median(tt), statistics.median(to)
            print(f"{b:>5} | {mt:>10.2f} {pct(tt, .9):>8.2f} | {mo:>10.2f} {pct(to, .9):>8.2f} | "
                  f"{mt / mo:>10.2f} | {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
