"""Choose refusal_steering's layer, alpha and direction on the VALIDATION sets only (issue 27).

One seed, with a leave-subjects-out holdout (``data.val_holdout``, as ``choose_val.py --holdout``): the
unedited model answers every validation set once; privacy_probe's guard (the recipe's ``privacy_probe``
section) is fitted once on the training-role data (the held-out subjects left out) and is the gate of every
candidate; the refusal directions of every candidate layer are computed once; then for each candidate only
the questions the gate flags are generated again under the steering hook. Prints one row per candidate
(``choose_val.figures``: the subjects the gate saw, then the held-out ones), base and privacy_probe (which
answers the gated questions with the refusal text itself) beside them, and the candidate with the best mean
of the figures (refusal rates where refusing is right, answer rates / accuracy elsewhere; ties: smaller alpha).

    OMP_NUM_THREADS=1 .venv/bin/python bench/steer_sweep.py recipes/organism.yaml --holdout "Phone no.,bus" \\
        --layers 1,2,3,4,5 --alphas 0.5,1,2,4 --directions harmful [--json runs/steer_sweep.json]
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from loguru import logger

from bench.choose_val import COLS, figures, validation_overrides
from ngguard.adapters import load_adapter
from ngguard.evaluate import evaluate, rescore_with_guard
from ngguard.judges import make_judge
from ngguard.methods.privacy_probe import fit_guard
from ngguard.methods.refusal_steering import refusal_direction, steering_guard
from ngguard.pipeline import build_sets
from ngguard.recipe import VALIDATION_SETS, load_recipe

# refusing is right for these figures; for the others answering is (over-refusal counts as 1 - x)
HIGHER = {"seen_rta", "seen_benign_answer", "awareness_acc", "implicit_rta", "adv_rta"}


def merit(row: dict) -> float:
    """The mean of every figure, seen and held-out, each oriented so that higher is better."""
    vals = [row[c] if c in HIGHER else 1 - row[c] for c in COLS]
    vals += [row["holdout"][c] if c in HIGHER else 1 - row["holdout"][c] for c in COLS if row["holdout"][c] == row["holdout"][c]]
    vals = [v for v in vals if v == v]  # a figure over an empty group is NaN
    return sum(vals) / len(vals)


class _Decided:
    """``gate``'s decisions on ``queries``, read once (the same queries are gated for every candidate)."""

    def __init__(self, gate, queries):
        self.refusal, keys = gate.refusal, list(dict.fromkeys(_key(q) for q in queries))
        by_key = {_key(q): q for q in queries}
        self.flags = dict(zip(keys, gate.blocks_queries([by_key[k] for k in keys])))

    def blocks_queries(self, queries):
        return [self.flags[_key(q)] for q in queries]


def _key(q):
    return (q.image, q.prompt)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe", type=Path)
    p.add_argument("--holdout", default="Phone no.,bus")
    p.add_argument("--layers", default="1,2,3,4,5")
    p.add_argument("--alphas", default="0.5,1,2,4")
    p.add_argument("--directions", default="harmful")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    holdout = tuple(s for s in a.holdout.split(",") if s)
    r = load_recipe(a.recipe, overrides=validation_overrides(a.overrides, holdout))
    layers = [int(x) for x in a.layers.split(",")]
    alphas = [float(x) for x in a.alphas.split(",")]
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    adapter = load_adapter(r.model.path, dtype=r.model.dtype, device="cpu")
    ev = dict(batch_size=r.evaluation.batch_size, max_new_tokens=r.evaluation.max_new_tokens)
    judge = make_judge(r.judge)
    rows = []

    def add(name: str, res: dict, t: float, **extra) -> None:
        row = {"variant": name, "seconds": round(time.time() - t, 1), **figures(res), "holdout": figures(res, holdout),
               **extra}
        row["merit"] = merit(row)
        rows.append(row)
        logger.info(json.dumps(row))
        if a.json:
            a.json.write_text(json.dumps({"seed": a.seed, "holdout": holdout, "rows": rows}, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        sets = build_sets(r, Path(tmp), world_seed=r.data.world.seed + a.seed, world_name="w").splits
        t = time.time()
        before = {n: evaluate(adapter, sets[n], judge=judge, desc=f"val base {n}", **ev) for n in VALIDATION_SETS
                  if sets.get(n)}
        add("base", before, t)
        t = time.time()
        gate, _ = fit_guard(adapter, sets, r.privacy_probe, r.edit.refusal)
        gate = _Decided(gate, [q for n in VALIDATION_SETS for q in sets.get(n) or []])  # one reading of the probes for every candidate
        add("privacy_probe", {n: rescore_with_guard(v, gate, judge) for n, v in before.items()}, t)
        for source in a.directions.split(","):
            directions = refusal_direction(adapter, sets, source, layers, batch_size=r.refusal_steering.batch_size)
            for layer in layers:
                for alpha in alphas:
                    t = time.time()
                    hp = replace(r.refusal_steering, layer=layer, alpha=alpha, direction=source)
                    guard, _ = steering_guard(gate, adapter, sets, hp, r.edit.refusal, directions=directions)
                    res = {n: rescore_with_guard(v, guard, judge, adapter=adapter, **ev) for n, v in before.items()}
                    flags = guard.blocks_queries(sets["val_pairs"])
                    was = [x["response"] for x in before["val_pairs"]["responses"]]
                    examples = [(w, x["response"]) for f, w, x in zip(flags, was, res["val_pairs"]["responses"]) if f][:3]
                    add(f"refusal_steering {source} L{layer} a{alpha:g}", res, t, layer=layer, alpha=alpha,
                        direction=source, examples=examples)  # (base answer, steered answer) of gated questions
    best = max((row for row in rows if "layer" in row), key=lambda row: (round(row["merit"], 6), -row["alpha"]))
    print(f"\nvalidation sets, seed {a.seed}, held out of the gate's training data: {', '.join(holdout)}")
    print("| variant | " + " | ".join(COLS) + " | merit |")
    print("|---|" + "---|" * (len(COLS) + 1))
    for row in rows:
        print(f"| {row['variant']} | " + " | ".join(f"{row[c]:.3f}" for c in COLS) + f" | {row['merit']:.3f} |")
        print("| ... held-out | " + " | ".join(f"{row['holdout'][c]:.3f}" for c in COLS) + " | |")
    print(f"\nchosen (best merit; ties: smaller alpha): {best['variant']} (merit {best['merit']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
