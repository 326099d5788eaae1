"""What a guard patch costs when serving: the same batches answered by the base model and behind the
guard (``ngguard.guard_patch``), alternated in one process, and whether the guard's answers are the run's.

    python bench/guard_serving.py RUN_DIR [--model organism] [--rows 64] [--repeats 3]

RUN_DIR: a run of ``ngguard edit`` whose method is a guard (``--set method=privacy_probe``). The rows are
the first ``--rows`` test questions of its report; the guard's answers must equal the report's
(generated with ``evaluation.max_new_tokens``). Prints the median seconds per batch of each side and
their ratio (timings on a shared machine are noisy: read the ratio, measured side by side)."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ngguard.guard import ProtectedLVLM
from ngguard.limits import load_image
from ngguard.serving.options import SERVING

ONE_AT_A_TIME = SERVING.replace(max_batch=1)  # no batcher (a guard patch is per-row whatever protection says)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--model", default="organism")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    report = json.loads((args.run / "report.json").read_text())
    method, n_new = report["recipe"]["method"], report["recipe"]["evaluation"]["max_new_tokens"]
    rows = report["methods"][method]["after"]["test"]["responses"][:args.rows]
    guarded = ProtectedLVLM.from_pretrained(args.model, args.run / "patch", device="cpu",
                                            serving=ONE_AT_A_TIME)
    base = ProtectedLVLM.from_pretrained(args.model, device="cpu", serving=ONE_AT_A_TIME)
    images = [load_image(args.run / r["image"], base.limits) for r in rows]
    texts = [r["prompt"] for r in rows]
    got = guarded.chat_batch(images, texts, max_new_tokens=n_new)
    same = sum(g == r["response"] for g, r in zip(got, rows))
    refused = sum(g == guarded.refusal for g in got)
    times: dict[str, list[float]] = {"base": [], "guard": []}
    for _ in range(args.repeats):
        for name, model in (("base", base), ("guard", guarded)):
            t = time.perf_counter()
            model.chat_batch(images, texts, max_new_tokens=n_new)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{method} guard patch {guarded.patch_info['id']}: {len(rows)} rows, {refused} refused by the guard, "
          f"answers equal to the report's: {same}/{len(rows)}")
    print(f"median s per batch: base {med['base']:.2f}, behind the guard {med['guard']:.2f}; "
          f"ratio guard / base {med['guard'] / med['base']:.2f} (max_new_tokens {n_new})")


if __name__ == "__main__":
    main()
