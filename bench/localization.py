"""Batched localization vs the faithful per-sample loop, side by side in one run.

The reference procedure trains one scaling vector per training image, one image at a time (its
question pairs batched), running the whole model at every step. ngguard optimises all images'
vectors in one loop and skips everything the frozen model makes constant: layers <= l are replayed
from one recorded forward, the prompt prefix before the subject token comes from a KV cache, each
question is run once up to its answer for all its answer-start contexts, and logits are computed
only where there are targets. Both run here on the same samples; printed: wall
time of each, the speed ratio, and the agreement of the strongly active sets (Jaccard per subject)
and of the scales.

    .venv/bin/python bench/localization.py                      # the organism (text first, 4 layers)
    .venv/bin/python bench/localization.py --shape llava-1.5 --images-per-subject 1 --steps 25
                                                                # LLaVA-1.5 geometry, random weights (~13 min)

``--shape llava-1.5``: a random LlavaForConditionalGeneration with LLaVA-1.5's geometry (576 image
tokens before the question, 32 decoder layers, its prompt, layer 11) and widths cut to 32, so that
the work per token is tiny but its layout is the real one. Random weights: the gates mean nothing,
their agreement between the two procedures does.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from ngguard.adapters import load_adapter
from ngguard.methods.reference import localize_reference
from ngguard.data import read_jsonl
from ngguard.methods.core import jaccard
from ngguard.methods.neural_gate import localize_layer
from ngguard.pipeline import make_samples
from ngguard.recipe import DEFAULT_CONTEXTS, DEFAULT_REFUSAL
from ngguard.world.render import render_world
from ngguard.world.spec import PRIVACY_SUBJECTS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=("organism", "llava-1.5"), default="organism")
    ap.add_argument("--model", default="organism", help="with --shape organism: a model folder or 'organism'")
    ap.add_argument("--layer", type=int, default=None, help="default: 1 (organism recipe), 11 (LLaVA-1.5)")
    ap.add_argument("--images-per-subject", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="optimiser steps (organism recipe: 10; paper: at most 25)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eps", type=float, default=1e-8, help="Adam eps (organism recipe: 1e-8; paper: 1e-3)")
    ap.add_argument("--top-k", type=float, default=10.0, help="gate = top k%% dims by M (organism recipe)")
    args = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    if args.shape == "organism":
        adapter = load_adapter(args.model, dtype="float32")
        layer = 1 if args.layer is None else args.layer
    else:
        from llava_shapes import build_llava

        adapter = build_llava("narrow")
        layer = 11 if args.layer is None else args.layer
    with tempfile.TemporaryDirectory() as tmp:
        world = render_world(list(PRIVACY_SUBJECTS), max(3 * args.images_per_subject, 3), 1, Path(tmp) / "w")
        train = [q for q in read_jsonl(world / "queries.jsonl") if q.split == "train"]
        samples, _ = make_samples(adapter, train, max_words=5, batch_size=64)
        kw = dict(refusal=DEFAULT_REFUSAL, alpha=1.25, contexts=DEFAULT_CONTEXTS, steps=args.steps, lr=0.5,
                  eps=args.eps, batch_size=args.batch_size)
        t = time.perf_counter()
        batched = localize_layer(adapter, samples, layer, **kw)
        t_batched = time.perf_counter() - t
        t = time.perf_counter()
        loop = localize_reference(adapter, samples, layer, **{k: v for k, v in kw.items() if k != "batch_size"})
        t_loop = time.perf_counter() - t
    print(f"shape {args.shape}: {adapter.num_layers} decoder layers; samples: {len(samples)} images ({len(set(s.subject for s in samples))} subjects), layer {layer}, "
          f"threads {torch.get_num_threads()}")
    print(f"per-sample loop (reference): {t_loop:8.2f} s")
    print(f"batched + shortcuts (ngguard):{t_batched:7.2f} s")
    print(f"speed ratio loop/batched:    {t_loop / t_batched:8.2f}x")
    js = {s: jaccard(batched.strong(s, top_k=args.top_k), loop.strong(s, top_k=args.top_k)) for s in batched.gates}
    print("Jaccard of strongly active sets: " + ", ".join(f"{s}: {v:.3f}" for s, v in js.items())
          + f"; mean {sum(js.values()) / len(js):.3f}")
    print(f"max |scale difference|: {(batched.scales - loop.scales).abs().max().item():.2e}; "
          f"strong share (top {args.top_k}%) batched {batched.strong_share(top_k=args.top_k):.3f} / "
          f"loop {loop.strong_share(top_k=args.top_k):.3f}")


if __name__ == "__main__":
    main()
