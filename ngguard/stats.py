"""Mean and 95% interval over seeds (Student's t, no SciPy), and the per-split metrics the benchmark
reports. A difference between two methods is reported as the mean of the per-seed paired differences
with its own interval: the seeds share worlds, so pairing removes the world-to-world spread."""
from __future__ import annotations

import math
from typing import Iterable

# two-sided 95% quantiles of Student's t by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    if df in _T95:
        return _T95[df]
    smaller = [k for k in _T95 if k <= df]
    return _T95[max(smaller)] if df < 30 else 1.96


def mean_ci(values: Iterable[float | None]) -> dict:
    """{"mean", "ci95" (half-width; None for one value), "n", "values"} of the non-None values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "ci95": None, "n": 0, "values": []}
    n = len(vals)
    m = sum(vals) / n
    if n == 1:
        return {"mean": m, "ci95": None, "n": 1, "values": vals}
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    return {"mean": m, "ci95": t95(n - 1) * sd / math.sqrt(n), "n": n, "values": vals}


# (split, metric key of evaluate's result, label). "rta_benign" on a split of benign questions is its
# over-refusal rate; "rta_sensitive" on the harmful split is the harmful-request refusal rate.
HEADLINE = [
    ("test", "eta", "EtA test"),
    ("test", "rta_sensitive", "RtA sensitive (test)"),
    ("test", "benign_answer_rate", "benign answer rate (test)"),
    ("test", "leak_accuracy", "leak accuracy (test)"),
    ("heldout_subjects", "rta_sensitive", "RtA unseen private subjects"),
    ("heldout_subjects", "benign_answer_rate", "benign answer rate, unseen subjects"),
    ("overrefusal", "rta_benign", "over-refusal, public look-alikes"),
    ("overrefusal_unseen", "rta_benign", "over-refusal, unseen look-alikes"),
    ("implicit", "rta_sensitive", "RtA, subject not named"),
    ("implicit", "rta_benign", "over-refusal, subject not named"),
    ("awareness", "benign_accuracy", "awareness accuracy"),
    ("general", "benign_accuracy", "general questions accuracy"),
    ("adversarial", "rta_sensitive", "RtA adversarial"),
    ("harmful", "rta_sensitive", "harmful-request refusal"),
    ("multip2a", "eta", "EtA Multi-P2A questions"),
    ("utility", "benign_accuracy", "utility accuracy"),
]
# metrics where lower is better (for the reader; the report marks them)
LOWER_IS_BETTER = {("test", "leak_accuracy"), ("overrefusal", "rta_benign"), ("overrefusal_unseen", "rta_benign"),
                   ("implicit", "rta_benign")}


def _scalars(result: dict) -> dict[str, float]:
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def aggregate(per_seed: dict) -> dict:
    """per_seed: {seed: {"before": {split: metrics}, "methods": {m: {"after": {split: metrics}}}}}
    -> {"base" | method: {split: {metric: mean_ci}}} over the seeds."""
    by_method: dict[str, list[dict]] = {"base": [r["before"] for r in per_seed.values()]}
    for r in per_seed.values():
        for m, res in r["methods"].items():
            by_method.setdefault(m, []).append(res["after"])
    out: dict = {}
    for m, runs in by_method.items():
        splits = list(dict.fromkeys(s for run in runs for s in run))
        out[m] = {s: {k: mean_ci(run.get(s, {}).get(k) for run in runs)
                      for k in dict.fromkeys(k for run in runs for k in _scalars(run.get(s, {})))}
                  for s in splits}
    return out


def paired_differences(per_seed: dict, a: str, b: str) -> dict:
    """Per headline metric: mean_ci over seeds of (method a - method b) ("base" = before the edit)."""
    def get(run, m, split, key):
        res = run["before"] if m == "base" else run["methods"].get(m, {}).get("after")
        return None if res is None else res.get(split, {}).get(key)

    out = {}
    for split, key, label in HEADLINE:
        diffs = [None if get(r, a, split, key) is None or get(r, b, split, key) is None
                 else get(r, a, split, key) - get(r, b, split, key) for r in per_seed.values()]
        ci = mean_ci(diffs)
        if ci["n"]:
            out[f"{split}.{key}"] = {**ci, "label": label}
    return out
