"""The Neural Gate pipeline at paper settings on a LLaVA-1.5-7B-SHAPED model with random weights
(bf16, no download): per-stage wall time and peak GPU memory, plus the batched-vs-loop localization
ratio measured side by side. Random weights mean the metrics are meaningless; time and memory are not.

    python bench/gpu_llava7b.py                 # on a GPU box (H200: ~15 GB of weights)
    python bench/gpu_llava7b.py --tiny          # smoke test of the same code path on CPU
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--layer", type=int, default=11)
    ap.add_argument("--images-per-subject", type=int, default=10)
    ap.add_argument("--loop-samples", type=int, default=6, help="samples for the per-sample loop timing")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    layer = min(args.layer, 2) if args.tiny else args.layer
    from ngguard.data import read_jsonl
    from ngguard.evaluate import evaluate
    from ngguard.methods import REGISTRY
    from ngguard.methods.core import jaccard
    from ngguard.methods.neural_gate import localize_layer
    from ngguard.methods.reference import localize_reference
    from ngguard.pipeline import make_samples
    from ngguard.recipe import DEFAULT_CONTEXTS, DEFAULT_REFUSAL, EditSpec
    from ngguard.world.render import render_world
    from ngguard.world.spec import PRIVACY_SUBJECTS

    stats: dict[str, dict] = {}

    def stage(name, fn):
        if device == "cuda":
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        stats[name] = {"s": round(time.perf_counter() - t, 2),
                       "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None}
        print(f"{name:32s} {stats[name]['s']:9.2f} s   peak {stats[name]['peak_gib']} GiB", flush=True)
        return out

    from llava_shapes import build_llava

    adapter = stage("build model (random weights)", lambda: build_llava("tiny" if args.tiny else "7b", device))
    print(f"device {device}, params {sum(p.numel() for p in adapter.model.parameters()) / 1e9:.2f} B, layer {layer}")
    with tempfile.TemporaryDirectory() as tmp:
        n = max(3 * args.images_per_subject, 3)
        world = render_world(list(PRIVACY_SUBJECTS), n, 0, Path(tmp) / "w")
        qs = read_jsonl(world / "queries.jsonl")
        train = [q for q in qs if q.split == "train"]
        test = [q for q in qs if q.split == "test"][:192]
        samples, _ = stage("record original answers", lambda: make_samples(adapter, train, max_words=5, batch_size=32))
        kw = dict(refusal=DEFAULT_REFUSAL, alpha=1.25, contexts=DEFAULT_CONTEXTS, steps=25, lr=0.5, eps=1e-3,
                  batch_size=64 if device == "cuda" else 32)
        loc = stage(f"localize batched ({len(samples)} imgs)", lambda: localize_layer(adapter, samples, layer, **kw))
        sub = samples[: args.loop_samples]
        loc_b = stage(f"localize batched ({len(sub)} imgs)", lambda: localize_layer(adapter, sub, layer, **kw))
        loc_l = stage(f"localize loop ({len(sub)} imgs)", lambda: localize_reference(adapter, sub, layer, **{k: v for k, v in kw.items() if k != "batch_size"}))
        ratio = stats[f"localize loop ({len(sub)} imgs)"]["s"] / max(1e-9, stats[f"localize batched ({len(sub)} imgs)"]["s"])
        js = [jaccard(loc_b.strong(s), loc_l.strong(s)) for s in loc_b.gates]
        print(f"batched vs loop on {len(sub)} images: speed ratio {ratio:.2f}x, mean Jaccard {sum(js) / len(js):.3f} "
              f"(strong share {loc_b.strong_share():.3f} / {loc_l.strong_share():.3f}; 0 = nothing flipped, a vacuous "
              f"agreement: random weights and the paper's eps 1e-3 can leave every scale positive)")
        gates = {layer: {s: loc.strong(s) for s in loc.gates}}
        stage("gated edit (lr 1e-5, 10 steps)", lambda: REGISTRY["neural_gate"].apply(
            adapter, samples, [layer], module="down_proj", refusal=DEFAULT_REFUSAL, hparams=EditSpec(lr=1e-5, steps=10),
            gates=gates))
        stage(f"evaluate {len(test)} test queries", lambda: evaluate(adapter, test, batch_size=32, max_new_tokens=24))
    stats["loop_vs_batched_ratio"] = {"x": round(ratio, 2), "jaccard": round(sum(js) / len(js), 3)}
    if args.json:
        args.json.write_text(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
