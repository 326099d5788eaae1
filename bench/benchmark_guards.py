"""The benchmark for the methods that edit no weights (base, keyword_filter, privacy_probe, refusal_steering), every test
split, several seeds, side by side in one run: mean ± 95% interval, paired differences, and a
per-subject table of the unseen subjects (issue 27). The same worlds, splits and judge as
``ngguard edit`` (``pipeline.build_sets``, ``evaluate_sets``, ``stats``), without the edit: the
guards are fitted on training-role data and rescore the unedited model's answers (a steering guard,
``refusal_steering``, generates the questions it gates again under its hook).

    OMP_NUM_THREADS=1 .venv/bin/python bench/benchmark_guards.py recipes/organism.yaml \\
        --methods keyword_filter,privacy_probe --seeds 0,1,2 --json runs/guards.json
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from ngguard.adapters import load_adapter
from ngguard.evaluate import rescore_with_guard
from ngguard.judges import make_judge
from ngguard.methods import REGISTRY
from ngguard.pipeline import build_sets, evaluate_sets
from ngguard.recipe import load_recipe
from ngguard.stats import HEADLINE, LOWER_IS_BETTER, aggregate, mean_ci, paired_differences


def _ci(c) -> str:
    if not c or c["mean"] is None:
        return "—"
    return f"{c['mean']:.3f}" + ("" if c["ci95"] is None else f" ± {c['ci95']:.3f}")


def _strip(res: dict) -> dict:
    """A split's results without the per-response records."""
    return {k: {kk: vv for kk, vv in v.items() if kk != "responses"} for k, v in res.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe", type=Path)
    p.add_argument("--methods", default="keyword_filter,privacy_probe")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    r = load_recipe(a.recipe, overrides=a.overrides)
    methods = a.methods.split(",")
    bad = [m for m in methods if m not in REGISTRY or REGISTRY[m].edits_weights]
    if bad:
        raise SystemExit(f"benchmark_guards: {bad[0]!r} is not a registered method that edits no weights")
    adapter = load_adapter(r.model.path, dtype=r.model.dtype, device="cpu")
    judge = make_judge(r.judge)
    per_seed, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in a.seeds.split(",")]:
            torch.manual_seed(seed)
            random.seed(seed)
            sets = build_sets(r, Path(tmp), world_seed=r.data.world.seed + seed, world_name=f"world-seed{seed}").splits
            t = time.time()
            before = evaluate_sets(adapter, sets, r, f"seed {seed} base")
            seconds[f"seed {seed} base"] = time.time() - t
            res = {}
            for m in methods:
                t = time.time()
                e = REGISTRY[m]
                guard, fields = e.guard(sets["train"], r.edit.refusal, adapter=adapter, sets=sets, recipe=r) \
                    if e.guard_needs_model else e.guard(sets["train"], r.edit.refusal)
                res[m] = {"after": {name: rescore_with_guard(v, guard, judge, adapter=adapter, batch_size=r.evaluation.batch_size,
                                                             max_new_tokens=r.evaluation.max_new_tokens)
                                    for name, v in before.items()}}
                seconds[f"seed {seed} {m}"] = time.time() - t
            per_seed[seed] = {"before": before, "methods": res}
            if a.json:  # each seed as it ends, so that a cut run keeps what it measured
                a.json.with_suffix(".partial.json").write_text(json.dumps(
                    {s: {"before": _strip(v["before"]), "methods": {m: _strip(x["after"]) for m, x in v["methods"].items()}}
                     for s, v in per_seed.items()}, indent=1, default=str))
    agg = aggregate(per_seed)
    names = ["base", *methods]
    lines = [f"| split: metric | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for split, key, label in HEADLINE:
        cells = [_ci(agg.get(n, {}).get(split, {}).get(key)) for n in names]
        if any(c != "—" for c in cells):
            lines.append(f"| {label}{' (↓)' if (split, key) in LOWER_IS_BETTER else ''} | " + " | ".join(cells) + " |")
    main_m = methods[-1]
    lines += ["", f"paired differences ({main_m} - other), mean ± 95% interval over seeds:", "",
              f"| metric | " + " | ".join(f"{main_m} - {o}" for o in ["base", *methods[:-1]]) + " |",
              "|---|" + "---|" * len(methods)]
    pairs = {o: paired_differences(per_seed, main_m, o) for o in ["base", *methods[:-1]]}
    for split, key, label in HEADLINE:
        k = f"{split}.{key}"
        if any(k in v for v in pairs.values()):
            lines.append(f"| {label} | " + " | ".join(_ci(pairs[o].get(k)) for o in pairs) + " |")
    lines += ["", "per subject, unseen subjects (RtA on private ones' sensitive questions, over-refusal on look-alikes):", "",
              "| subject | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for split, key in (("heldout_subjects", "rta_sensitive"), ("overrefusal_unseen", "rta_benign"),
                       ("awareness", "benign_accuracy")):
        subjects = list(dict.fromkeys(s for run in per_seed.values() for s in run["before"].get(split, {}).get("per_subject", {})))
        for s in subjects:
            def get(run, n):
                res = run["before"] if n == "base" else run["methods"][n]["after"]
                return res.get(split, {}).get("per_subject", {}).get(s, {}).get(key)
            lines.append(f"| {s} ({split}: {key}) | " +
                         " | ".join(_ci(mean_ci(get(run, n) for run in per_seed.values())) for n in names) + " |")
    text = "\n".join(lines)
    print(text)
    if a.json:
        a.json.write_text(json.dumps({"aggregate": agg, "paired": pairs, "seconds": seconds, "table": text,
                                      "per_seed": {s: {"before": _strip(v["before"]),
                                                       "methods": {m: _strip(x["after"]) for m, x in v["methods"].items()}}
                                                   for s, v in per_seed.items()}}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
