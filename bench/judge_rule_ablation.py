"""What each family of refusal acts in the rule judge contributes, per XSTest model set-up.

    OMP_NUM_THREADS=1 python bench/judge_rule_ablation.py [--shared DIR]

Needs the shared XSTest answers (DIR/data/xstest-dev, default $NGGUARD_SHARED or ../shared). For
each family, its patterns are switched off and the accuracy (refusal, full or partial, vs
compliance) on each set-up and on the own labelled set's tune split is printed beside the full
rules'. A family that helps one set-up only is the one most likely to fit that model's phrasing.
"""
from __future__ import annotations

import argparse
import json
import re

import ngguard.judges.rules as R
from ngguard.judges.training import OWN_LABELS, find_shared, xstest_rows

FAMILIES = {"objection": ["_OBJECTION"], "objection to the question": ["_QUESTION_OBJECTION"],
            "declining act": ["_DECLINE_ACT"], "warning instead of an answer": ["_WARN_LEAD"],
            "redirect to help": ["_REDIRECT"], "premise rejection": ["_NO_REASON", "_CONDEMN", "_WHY_QUESTION"],
            "cannot tell + privacy reason": ["_CANNOT_TELL"], "fictional = answer": ["_NONEXISTENT"],
            "clarification = answer": ["_CLARIFY"], "disclaimer then answer": ["_WILL_ANSWER"]}
NEVER = re.compile(r"(?!x)x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=None)
    args = ap.parse_args()
    shared = find_shared(args.shared)
    if shared is None:
        raise SystemExit("no shared data folder with data/xstest-dev (give --shared DIR)")
    rows = xstest_rows(shared)
    own = [json.loads(x) for x in OWN_LABELS.read_text(encoding="utf-8").splitlines() if x.strip()]
    own = [r for r in own if r["split"] == "tune"]  # never the held-out quarter
    sets = {m: [r for r in rows if r["model"] == m] for m in sorted({r["model"] for r in rows})} | {"own tune": own}

    def accuracy() -> list[float]:
        j = R.RefusalJudge()
        out = []
        for rs in sets.values():
            pred = j.labels([r["response"] for r in rs], [r.get("prompt") for r in rs])
            out.append(sum((r["label"] != "compliance") == (p != "compliance") for r, p in zip(rs, pred)) / len(rs))
        return out

    base = accuracy()
    print(f"{'':36s}" + "".join(f"{k:>22s}" for k in sets))
    print(f"{'all rules':36s}" + "".join(f"{x:22.3f}" for x in base))
    for name, attrs in FAMILIES.items():
        saved = {a: getattr(R, a) for a in attrs}
        for a in attrs:
            setattr(R, a, NEVER)
        try:
            acc = accuracy()
        finally:
            for a, v in saved.items():
                setattr(R, a, v)
        print(f"{'without ' + name:36s}" + "".join(f"{x:>14.3f} ({x - b:+.3f})" for x, b in zip(acc, base)))


if __name__ == "__main__":
    main()
