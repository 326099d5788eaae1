"""One edit step and one localization step of a recipe, profiled and set against the arithmetic floor.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python bench/step_profile.py [recipes/organism.yaml]
        [--set key=value ...] [--steps 25] [--top 25] [--no-profile]

What it prints (seed 0 of the recipe's world; the first training image of the first subject, the
recipe's layers, gates, retention set and losses, exactly as ``gated_edit`` / ``localize_layer`` run):

1. the arithmetic: floating-point operations of one edit step and one localization step, forward and
   backward (``torch.utils.flop_counter.FlopCounterMode``: matrix products and attention, the rest
   is not counted), and the tokens each step runs;
2. the floor: this CPU's single-thread matrix-product rate at the shapes the organism multiplies (and
   at a large square product), so FLOPs / rate = the time a step would take if it were only its
   matrix products at that rate;
3. the measured CPU time per step (this process's CPU seconds, ``time.process_time``: on a shared
   machine the wall clock also counts the time other jobs hold the cores; the floor's rate is taken
   with the same clock) and the ratio to the floor;
4. where the time goes (``torch.profiler``: the aten ops by self time, wall-clock based, so read their
   shares, not their seconds; ``--no-profile`` skips it).

A step's own figures are taken as the difference of two runs (``steps`` and ``2 * steps``; early
stopping is switched off with ``stop_loss`` 0 for the edit) so that the one-off preparation (replayed
lower layers, packed rows) is left out. The machine's load is printed: times taken beside other jobs
are upper bounds even on the CPU clock (caches shared with other jobs); FLOPs are not affected.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from loguru import logger
from torch.utils.flop_counter import FlopCounterMode

from ngguard.adapters import load_adapter
from ngguard.layer_search import gates_for, localize_layers
from ngguard.methods.core import encode_sample
from ngguard.methods.fastpath import prepare, prepare_rows
from ngguard.methods.neural_gate import gated_edit, localize_layer, sample_rows
from ngguard.pipeline import build_sets, edit_data
from ngguard.recipe import load_recipe


def matmul_rate(m: int, k: int, n: int, seconds: float = 0.5) -> float:
    """GFLOP/s of ``[m, k] @ [k, n]`` in float32 on this thread count (best of repeated batches)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    best, reps = float("inf"), max(1, int(2e8 / (2 * m * k * n)))
    t_end = time.process_time() + seconds
    while time.process_time() < t_end:
        t = time.process_time()
        for _ in range(reps):
            a @ b
        best = min(best, (time.process_time() - t) / reps)
    return 2 * m * k * n / best / 1e9


def flops(fn) -> Counter:
    """FLOPs by aten op (matrix products; attention on CPU is not counted by ``FlopCounterMode``)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return Counter({str(k): v for k, v in fc.get_flop_counts()["Global"].items()})


def timed(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def edit_tokens(adapter, sample, retain, below: int, refusal: str) -> int:
    """Token slots one edit step runs through the decoder: the image's shared prefix (once) and its rows'
    packed remainder, and the same for one retention batch."""
    batches = [encode_sample(adapter, sample, refusal)[0]]
    if retain:
        r = retain[0]
        batches.append(adapter.encode([r.image] * len(r.benign), [q for q, _ in r.benign], targets=[t for _, t in r.benign]))
    total = 0
    for b in batches:
        pb = prepare(adapter, b.to(adapter.device), below, frozen_above=False)
        if pb.shared is not None:
            total += pb.shared.inputs["input_ids"].numel() + pb.shared.lines.inputs["input_ids"].numel()
        else:
            total += pb.inputs["input_ids"].numel()
    return total


def loc_tokens(adapter, samples, layer: int, E, L) -> int:
    """Token slots one localization step runs above ``layer`` (packed stems and tails)."""
    rows = sample_rows(samples, E.refusal, E.alpha, L.contexts)
    total = 0
    for pb, _ in prepare_rows(adapter, samples, rows, layer, batch_size=L.batch_size):
        total += (pb.packed.lines.inputs if pb.packed is not None else pb.inputs)["input_ids"].numel()
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe", nargs="?", default="recipes/organism.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=10, help="edit steps in the shorter timed run (the longer: twice)")
    p.add_argument("--loc-steps", type=int, default=1, help="localization steps in the shorter timed run")
    p.add_argument("--loc-samples", type=int, default=12,
                   help="localize this many samples (the first of each subject in turn; the step scales linearly)")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--no-profile", action="store_true")
    a = p.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    print(f"load average {os.getloadavg()}; torch threads {torch.get_num_threads()} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    recipe = load_recipe(a.recipe, overrides=a.overrides)
    torch.manual_seed(0)
    random.seed(0)
    adapter = load_adapter(recipe.model.path, dtype=recipe.model.dtype, device=recipe.model.device)
    layers = list(recipe.layers)
    with tempfile.TemporaryDirectory() as tmp:
        sets = build_sets(recipe, Path(tmp), world_seed=recipe.data.world.seed)
        samples, _, retain = edit_data(adapter, sets, recipe)
    E, L = recipe.edit, recipe.localization
    subject = samples[0].subject
    one = [s for s in samples if s.subject == subject][:1]
    gates = gates_for(localize_layers(adapter, one, layers, replace(recipe, localization=replace(L, steps=1))), recipe)
    gates = {l: {subject: g[subject]} for l, g in gates.items()}
    backup = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}

    def edit(steps: int, retain=retain):
        hp = replace(E, steps=steps, passes=1, stop_loss=0.0)
        gated_edit(adapter, one, layers, gates=gates, module=recipe.module, refusal=E.refusal, hparams=hp, retain=retain)
        with torch.no_grad():
            for n, p_ in adapter.model.named_parameters():
                p_.copy_(backup[n])

    loc_layer = layers[0]
    by_subject = [[s for s in samples if s.subject == subj] for subj in dict.fromkeys(s.subject for s in samples)]
    loc_samples = [s for group in zip(*by_subject) for s in group][:a.loc_samples]

    def localize(steps: int):
        localize_layer(adapter, loc_samples, loc_layer, refusal=E.refusal, alpha=E.alpha, contexts=L.contexts, steps=steps,
                       lr=L.lr, eps=L.eps, l1=L.l1, init=L.init, stop_loss=-1.0, batch_size=L.batch_size)

    # -- the arithmetic (difference of two runs: the preparation cancels)
    n, k = a.steps, a.loc_steps
    by_op_edit, by_op_loc = flops(lambda: edit(2 * n)), flops(lambda: localize(2 * k))
    by_op_edit.subtract(flops(lambda: edit(n)))
    by_op_loc.subtract(flops(lambda: localize(k)))
    f_edit, f_loc = by_op_edit.total() / n, by_op_loc.total() / k
    # -- the measured time per step
    edit(2)  # warm-up
    t_edit = min((timed(lambda: edit(2 * n)) - timed(lambda: edit(n))) / n for _ in range(2))
    t_loc = (timed(lambda: localize(2 * k)) - timed(lambda: localize(k))) / k
    # -- the floor
    d, i, v = adapter.hidden_size, adapter.model.config.text_config.intermediate_size, adapter.model.config.text_config.vocab_size
    tokens = 256
    rates = {f"[{tokens},{d}]x[{d},{i}]": matmul_rate(tokens, d, i), f"[{tokens},{i}]x[{i},{d}]": matmul_rate(tokens, i, d),
             f"[{tokens},{d}]x[{d},{d}]": matmul_rate(tokens, d, d), f"[{tokens},{d}]x[{d},{v}]": matmul_rate(tokens, d, v),
             "[1024,1024]x[1024,1024]": matmul_rate(1024, 1024, 1024)}
    small = rates[f"[{tokens},{d}]x[{d},{i}]"]
    print(f"\nmatrix-product rate, float32, {torch.get_num_threads()} thread(s):")
    for name, r in rates.items():
        print(f"  {name:28s} {r:7.1f} GFLOP/s")
    print(f"\n{'':24s}{'GFLOP/step':>12s}{'ms/step':>10s}{'floor ms':>10s}{'x floor':>9s}")
    for name, f, t in (("edit step", f_edit, t_edit), (f"localization step (L{loc_layer})", f_loc, t_loc)):
        floor = f / (small * 1e9)
        print(f"{name:24s}{f / 1e9:12.3f}{t * 1e3:10.1f}{floor * 1e3:10.1f}{t / floor:9.1f}")
    print(f"(edit: one image of {subject}, {len(one[0].sensitive)} sensitive + {len(one[0].benign)} benign questions "
          f"and one retention batch per step, layers {layers}; localization: all {len(loc_samples)} samples, "
          f"layer {loc_layer}; floor at the [{tokens},{d}]x[{d},{i}] rate)")
    print("FLOPs by op: edit " + ", ".join(f"{op} {v / n / 1e9:.3f} G" for op, v in by_op_edit.most_common()) +
          "; localization " + ", ".join(f"{op} {v / k / 1e9:.3f} G" for op, v in by_op_loc.most_common()))
    tok_edit, tok_loc = edit_tokens(adapter, one[0], retain, min(layers) - 1, E.refusal), loc_tokens(adapter, loc_samples, loc_layer, E, L)
    print(f"tokens per step (packed slots, padding included): edit {tok_edit}, localization {tok_loc} "
          f"({tok_loc / len(loc_samples):.0f} per sample)")
    steps_edit, scale = E.steps * E.passes * len(samples), len(samples) / len(loc_samples)
    print(f"the recipe's edit: {steps_edit} steps x {t_edit * 1e3:.0f} ms = {steps_edit * t_edit:.0f} s CPU per method and seed "
          f"(floor {steps_edit * f_edit / (small * 1e9):.0f} s); localization of all {len(samples)} samples: {L.steps} steps x "
          f"{t_loc * scale:.2f} s = {L.steps * t_loc * scale:.0f} s CPU per layer (floor {L.steps * f_loc * scale / (small * 1e9):.0f} s)")
    if a.no_profile:
        return 0
    from torch.profiler import ProfilerActivity, profile
    steps_prof = 5 * n  # the edit's preparation records every retention batch: profile as many as the steps use
    for name, fn in (("edit", lambda: edit(steps_prof, retain[:steps_prof])), ("localization", lambda: localize(k))):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n== {name}: aten ops by self time ({steps_prof if name == 'edit' else k} steps + preparation; wall-clock "
              f"based, so on a shared machine read the shares)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
