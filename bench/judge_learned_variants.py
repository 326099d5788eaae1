"""The learned judge's feature variants, measured cross-model with the choice inside the loop.

    OMP_NUM_THREADS=1 python bench/judge_learned_variants.py [--shared DIR] [--json OUT.json]

For each XSTest set-up M of the shared development answers (``<shared>/data/xstest-dev``): every
candidate of ``ngguard.judges.training.VARIANT_GRID`` (feature variant x L2 x class weights) is
scored on the inner split that does not contain M (leave one source out over the other set-up and
the project's own set, the world's answers always in training); the candidate chosen there is
trained on everything but M and tested on M. Printed: for each variant, its L2 chosen that way and
its figure on M (accuracy, precision, recall, partial-refusal recall); then the whole grid's choice
(the procedure ``ngguard judge train`` runs, so its clean cross-model figure). No figure on M takes
part in any choice. The ``words`` family is what ``ngguard judge train`` runs (``DEFAULT_GRID``:
word features, L2 chosen on the inner split). Needs the shared data; about 130 trainings (a few seconds each on one core).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ngguard.judges import RefusalJudge
from ngguard.judges.base import REFUSAL_LABELS
from ngguard.judges.learned import train
from ngguard.judges.training import (DEFAULT_GRID, VARIANT_GRID, find_shared, metrics, models_of, nested_cross_model,
                                     training_sets, variant_name)


def _fmt(m: dict) -> str:
    pr = m["partial_recall"]
    return (f"acc {m['accuracy']:.3f}  prec {m['precision']:.3f}  rec {m['recall']:.3f}  "
            f"partial {'-' if pr is None else f'{pr:.3f}'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--combine", action="store_true",
                    help="only the rules combined with the learned judge (DEFAULT_GRID, nested), OR and AND; the "
                         "rules were written reading both set-ups, so these are development figures, not clean ones")
    args = ap.parse_args()
    shared = find_shared(args.shared)
    if shared is None:
        raise SystemExit("no shared data folder with data/xstest-dev/completions.jsonl (give --shared DIR)")
    sets = training_sets(shared)
    if args.combine:
        return combine(sets)
    res = nested_cross_model(sets, VARIANT_GRID, every=True)
    report = {"variants": {}, "chosen": {}}
    for held in models_of(sets):
        table = res[held]["table"]
        print(f"tested on {held} (chosen on the other set-up + own set):")
        families = {}
        for row in table:  # a family = one variant and class weighting, its L2 chosen on the inner split
            name = variant_name(row["config"]).replace(f" l2={row['config'].l2:g}", "")
            best = families.get(name)
            if best is None or row["mean_accuracy"] > best["mean_accuracy"]:
                families[name] = row
        for name, row in families.items():
            print(f"  {name:<28} l2 {row['config'].l2:<6g} inner {row['mean_accuracy']:.3f}  {_fmt(row['outer'])}")
            report["variants"].setdefault(name, {})[held] = {"l2": row["config"].l2, "inner": row["mean_accuracy"],
                                                             **row["outer"]}
        report.setdefault("every", []).extend(
            {"held_out": held, "config": variant_name(row["config"]), "inner": row["mean_accuracy"],
             **{k: row["outer"][k] for k in ("accuracy", "precision", "recall", "partial_recall")}} for row in table)
        chosen = res[held]
        print(f"  whole grid's choice: {chosen['config']}: {_fmt(chosen)}")
        report["chosen"][held] = {k: v for k, v in chosen.items() if k != "table"}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")


def combine(sets: dict) -> None:
    """Rules OR / AND the learned judge; the learned one is chosen and trained without the set-up it
    is tested on (``nested_cross_model`` with ``DEFAULT_GRID``)."""
    rows = sets["xstest"]
    rules = RefusalJudge().labels([r["response"] for r in rows], [r["prompt"] for r in rows])
    res = nested_cross_model(sets, DEFAULT_GRID)
    for held in models_of(sets):
        idx = [i for i, r in enumerate(rows) if r["model"] == held]
        cfg = next(row["config"] for row in res[held]["table"] if variant_name(row["config"]) == res[held]["config"])
        tr = [r for name in sorted(sets) for r in sets[name] if not (name == "xstest" and r["model"] == held)]
        judge = train([r["response"] for r in tr], [r["label"] for r in tr], cfg)
        learned = judge.labels([rows[i]["response"] for i in idx])
        gold = [rows[i]["label"] for i in idx]
        for name, pick in (("rules", lambda r, lab: r), ("learned", lambda r, lab: lab),
                           ("rules OR learned", lambda r, lab: r if r in REFUSAL_LABELS else lab),
                           ("rules AND learned", lambda r, lab: r if lab in REFUSAL_LABELS else "compliance")):
            pred = [pick(rules[i], lab) for i, lab in zip(idx, learned)]
            print(f"{held:<14} {name:<18} {_fmt(metrics(gold, pred))}")


if __name__ == "__main__":
    main()
