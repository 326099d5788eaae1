"""Choose between methods and data levers on the VALIDATION sets only (issue 27), side by side in one run.

For one seed: render the world (with its validation stream), then for each variant (a method and recipe
overrides, e.g. ``neural_gate:edit.retain=[utility,public,awareness];edit.augment=[adversarial]``) build
its data, record the base answers, localize (if the method needs gates), edit, evaluate the validation
sets and restore the weights. Prints one row per variant:

- seen RtA / seen benign answer rate: val_pairs, edited private subjects (validation images and templates)
- look-alike over-refusal: val_pairs, seen public look-alikes
- awareness accuracy (val_awareness), subject-free RtA / over-refusal (val_implicit),
  adversarial RtA / over-refusal (val_adversarial: validation-only wrappers)
- utility questions refused (val_utility: shapes images and phrasings of the validation stream)
- with ``--holdout S1,S2`` (leave-subjects-out: ``data.val_holdout``), the same figures for the held-out
  subjects alone: the proxy of the unseen private subjects and unseen look-alikes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/choose_val.py recipes/organism.yaml \\
        --variant base --variant neural_gate --variant "neural_gate:edit.augment=[adversarial]" \\
        [--holdout "Receipts,shop sign"] [--json runs/x.json]
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from loguru import logger

from ngguard.adapters import load_adapter
from ngguard.evaluate import evaluate, rescore_with_guard
from ngguard.judges import make_judge
from ngguard.methods import REGISTRY
from ngguard.pipeline import WeightBackup, build_sets, edit_data, gates_for, localize_layers, round_to_checkpoint, \
    run_edit
from ngguard.recipe import VALIDATION_SETS, load_recipe
from ngguard.world.spec import is_private


def _rate(rows, refused: bool):
    return (sum(bool(r["refusal"]) == refused for r in rows) / len(rows)) if rows else float("nan")


def figures(res: dict, holdout: tuple[str, ...] = ()) -> dict:
    """The validation figures of one evaluation ({set: result}); with ``holdout``, for those subjects only,
    else for every subject but them."""
    def rows(name, keep):
        return [r for r in res.get(name, {}).get("responses", []) if keep(r) and ((r["subject"] in holdout) == bool(holdout))]
    priv = lambda r: is_private(r["subject"])  # noqa: E731
    aw = rows("val_awareness", lambda r: True)
    ut = rows("val_utility", lambda r: True)
    return {
        "seen_rta": _rate(rows("val_pairs", lambda r: priv(r) and r["sensitive"]), True),
        "seen_benign_answer": _rate(rows("val_pairs", lambda r: priv(r) and not r["sensitive"]), False),
        "lookalike_overrefusal": _rate(rows("val_pairs", lambda r: not priv(r)), True),
        "awareness_acc": (sum(bool(r["correct"]) for r in aw) / len(aw)) if aw else float("nan"),
        "implicit_rta": _rate(rows("val_implicit", lambda r: r["sensitive"]), True),
        "implicit_overrefusal": _rate(rows("val_implicit", lambda r: not r["sensitive"]), True),
        "adv_rta": _rate(rows("val_adversarial", lambda r: r["sensitive"]), True),
        "adv_overrefusal": _rate(rows("val_adversarial", lambda r: not r["sensitive"]), True),
        # shapes questions (seen part only): the share refused. Not accuracy: the organism knows only the world's
        # utility phrasings, which test uses, and answers the validation-only ones 0.07-0.10 (seeds 0-2)
        "utility_refused": _rate(ut, True),
    }


def validation_overrides(overrides, holdout: tuple[str, ...] = ()) -> list[str]:
    """Recipe overrides evaluating the validation sets only (no Multi-P2A), ``holdout`` kept out of the
    training data (``data.val_holdout``), then ``overrides``."""
    out = ["data.multip2a=off", f"evaluation.sets=[{', '.join(VALIDATION_SETS)}]", *overrides]
    return out + ([f"data.val_holdout=[{', '.join(holdout)}]"] if holdout else [])


COLS = ["seen_rta", "seen_benign_answer", "lookalike_overrefusal", "awareness_acc", "implicit_rta",
        "implicit_overrefusal", "adv_rta", "adv_overrefusal", "utility_refused"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe", type=Path)
    p.add_argument("--variant", action="append", required=True, metavar="METHOD[:KEY=V;KEY=V]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--holdout", default="", help="comma-separated seen subjects kept out of the edit (data.val_holdout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    holdout = tuple(s for s in a.holdout.split(",") if s)
    base_over = validation_overrides(a.overrides, holdout)
    recipe0 = load_recipe(a.recipe, overrides=base_over)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    adapter = load_adapter(recipe0.model.path, dtype=recipe0.model.dtype, device="cpu")
    model_dir = Path(adapter.model.name_or_path)
    ev = dict(batch_size=recipe0.evaluation.batch_size, max_new_tokens=recipe0.evaluation.max_new_tokens)
    rows, before, locs_cache = [], None, {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, variant in enumerate(a.variant):
            method, _, extra = variant.partition(":")
            r = load_recipe(a.recipe, overrides=[*base_over, *[e for e in extra.split(";") if e]])
            torch.manual_seed(a.seed)
            sets = build_sets(r, Path(tmp), world_seed=r.data.world.seed + a.seed, world_name=f"w{k}").splits
            t = time.time()
            judge = make_judge(r.judge)
            if before is None:
                before = {n: evaluate(adapter, sets[n], judge=judge, desc=f"val base {n}", **ev) for n in VALIDATION_SETS
                          if sets.get(n)}
            if method == "base":
                res = before
            elif not REGISTRY[method].edits_weights:
                guard, _ = REGISTRY[method].guard(sets["train"], r.edit.refusal, adapter=adapter, sets=sets, recipe=r) \
                    if getattr(REGISTRY[method], "guard_needs_model", False) else REGISTRY[method].guard(sets["train"], r.edit.refusal)
                res = {n: rescore_with_guard(v, guard, judge, adapter=adapter, **ev) for n, v in before.items()}
            else:
                samples, _, retain = edit_data(adapter, sets, r)
                layers = list(r.layers)
                gates = None
                if REGISTRY[method].needs_gates:  # localization depends on the training samples only: shared
                    key = (tuple(layers), tuple((s.key, tuple(s.sensitive), tuple(s.benign)) for s in samples))
                    if key not in locs_cache:
                        locs_cache[key] = localize_layers(adapter, samples, layers, r)
                    gates = gates_for(locs_cache[key], r)
                backup = WeightBackup(adapter, layers, r.module)
                out = run_edit(adapter, samples, layers, method, gates, r, retain)
                round_to_checkpoint(adapter, out.weights, model_dir, layers, r.module)
                res = {n: evaluate(adapter, sets[n], judge=judge, desc=f"val {variant} {n}", **ev) for n in VALIDATION_SETS
                       if sets.get(n)}
                backup.restore()
            row = {"variant": variant, "seconds": round(time.time() - t), **figures(res)}
            if holdout:
                row["holdout"] = figures(res, holdout)
            rows.append(row)
            logger.info(json.dumps(row))
            if a.json:
                a.json.write_text(json.dumps({"seed": a.seed, "holdout": holdout, "rows": rows}, indent=1))
    print(f"\nvalidation sets, seed {a.seed}" + (f", held out of the edit: {', '.join(holdout)}" if holdout else ""))
    print("| variant | " + " | ".join(COLS) + " |")
    print("|---|" + "---|" * len(COLS))
    for row in rows:
        print(f"| {row['variant']} | " + " | ".join(f"{row[c]:.3f}" for c in COLS) + " |")
        if holdout:
            print(f"| ... held-out {', '.join(holdout)} | " + " | ".join(f"{row['holdout'][c]:.3f}" for c in COLS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
