"""Judging speed on CPU: the rule judge and the learned judge side by side on the same answers.

    OMP_NUM_THREADS=1 python bench/judge_speed.py [--labels FILE.jsonl] [--response-col COL] [--repeat N]

Default answers: the project's labelled set (tests/data/refusal_labels.jsonl); with the shared
XSTest answers (longer, real chat answers): --labels ../shared/data/xstest-dev/completions.jsonl
--response-col completion. Prints answers/s of each judge (best of --repeat runs, after one warm-up)
and their ratio; the learned judge's target is >= 1,000 answers/s. Absolute times depend on the
machine and its load: compare the ratio, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ngguard.judges import make_judge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "data"
                    / "refusal_labels.jsonl")
    ap.add_argument("--response-col", default="response")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.labels.read_text(encoding="utf-8").splitlines() if line.strip()]
    responses = [r[args.response_col] for r in rows]
    prompts = [r.get("prompt") for r in rows]
    speed = {}
    for name in ("rules", "learned"):
        judge = make_judge(name)
        judge.labels(responses[:20], prompts[:20])  # warm-up (regex compilation, weights in cache)
        best = min(_timed(judge, responses, prompts) for _ in range(args.repeat))
        speed[name] = len(responses) / best
        print(f"{name:8s} {speed[name]:8.0f} answers/s  ({len(responses)} answers, mean "
              f"{sum(map(len, responses)) / len(responses):.0f} characters)")
    print(f"learned / rules speed ratio: {speed['learned'] / speed['rules']:.2f}")


def _timed(judge, responses, prompts) -> float:
    t = time.perf_counter()
    judge.labels(responses, prompts)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
