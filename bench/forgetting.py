"""Does a later subject's edit undo an earlier one's? Per-subject refusal on the VALIDATION split after
each subject's edit, in the recipe's order (one seed; never the test split).

    OMP_NUM_THREADS=2 .venv/bin/python bench/forgetting.py recipes/organism.yaml [--set edit.passes=1] \
        [--set "edit.retain=[utility]"] [--seed 0]

Localizes once, then edits one subject at a time (``REGISTRY[method]`` on that subject's samples, the
weights carried over; the same sequence as one edit with ``passes: 1``, except that the retention
batches restart at each subject) and prints, after the base model and after each subject, per validation
subject: refused / sensitive questions and answered / benign questions, and the validation EtA.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from ngguard.adapters import load_adapter
from ngguard.evaluate import evaluate
from ngguard.pipeline import RETAIN_SETS, build_sets, gates_for, localize_layers, make_samples, run_edit
from ngguard.recipe import load_recipe


def per_subject(adapter, val, tag: str, ev: dict) -> tuple[str, list[str]]:
    res = evaluate(adapter, val, desc=tag, **ev)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # refused, sensitive, answered, benign
    for q, r in zip(val, res["responses"]):
        c = counts[q.subject]
        if q.sensitive:
            c[0], c[1] = c[0] + bool(r["refusal"]), c[1] + 1
        else:
            c[2], c[3] = c[2] + (not r["refusal"]), c[3] + 1
    cells = " | ".join(f"{c[0]}/{c[1]}, {c[2]}/{c[3]}" for c in counts.values())
    return f"| {tag} | {cells} | {res['eta']:.3f} |", list(counts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seed", type=int, default=0, help="the run seed (world seed = data.world.seed + seed)")
    a = p.parse_args(argv)
    recipe = load_recipe(a.recipe, overrides=a.overrides)
    method = recipe.edit_method  # the recipe's weight edit (its method, or the one compared beside a guard)
    if method is None:
        print("forgetting: error: the recipe runs no weight edit", file=sys.stderr)
        return 2
    if recipe.data.world is None or not isinstance(recipe.layers, (list, tuple)):
        print("forgetting: error: needs a synthetic world (data.world) and fixed layers", file=sys.stderr)
        return 2
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    adapter = load_adapter(recipe.model.path, dtype=recipe.model.dtype, device=recipe.model.device)
    ev = dict(batch_size=recipe.evaluation.batch_size, max_new_tokens=recipe.evaluation.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        data = build_sets(recipe, Path(tmp), world_seed=recipe.data.world.seed + a.seed)
        sets, subjects = data.splits, data.edit_subjects
        val = sets["val"]
        first, names = per_subject(adapter, val, "base", ev)
        lines = [first]
        mw, bs = recipe.edit.max_answer_words, recipe.evaluation.batch_size
        samples, _ = make_samples(adapter, sets["train"], max_words=mw, batch_size=bs)
        retain_q = [q for name in recipe.edit.retain for q in sets.get(RETAIN_SETS[name], [])]
        retain = make_samples(adapter, retain_q, max_words=mw, batch_size=bs, benign_only=True)[0] if retain_q else []
        layers = list(recipe.layers)
        gates = gates_for(localize_layers(adapter, samples, layers, recipe), recipe) \
            if method == "neural_gate" else None
        for subject in subjects:
            run_edit(adapter, [s for s in samples if s.subject == subject], layers, method, gates, recipe, retain)
            lines.append(per_subject(adapter, val, f"after {subject}", ev)[0])
    print(f"\nvalidation split, seed {a.seed}, {method} at layers {layers}; cells: refused / sensitive, "
          f"answered / benign")
    print("| after | " + " | ".join(names) + " | EtA |")
    print("|---" * (len(names) + 2) + "|")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
