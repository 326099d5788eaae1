"""A recipe's wall time per stage, the old code against the new, side by side in one run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/recipe_time.py [recipes/organism.yaml] [--set key=value ...]
        [--old main] [--only new|old] [--cached] [--clock wall|cpu]

The old code is the package at git ref ``--old`` (default ``main``), unpacked with ``git archive`` into a
temporary folder; the new one is this checkout. Each runs the same recipe (this checkout's file and
overrides) in a subprocess of its own, one after the other, without the stage cache (``--cached``: the
new code runs a second time with the cache, after a first run that fills it). Prints one row per stage
(seconds summed over the seeds), the ratio old/new, the total, and the sha256 of both patches with the
largest difference of the patched tensors. The machine's load (``os.getloadavg``) is printed before and
after: wall figures taken beside other jobs are upper bounds; ``--clock cpu`` counts each run's own CPU
seconds instead (all threads), which other jobs disturb far less.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUN = """
import inspect, json, sys, time, types
from pathlib import Path
import ngguard.pipeline
from ngguard.pipeline import run_recipe
from ngguard.recipe import load_recipe
recipe, out, cache, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1", json.loads(sys.argv[4])
clock = time.process_time if sys.argv[5] == "cpu" else time.perf_counter
if sys.argv[5] == "cpu":  # the pipeline's stage clock counts this process's CPU seconds (all threads)
    ngguard.pipeline.time = types.SimpleNamespace(time=time.process_time)
kw = {"cache": cache} if "cache" in inspect.signature(run_recipe).parameters else {}
t = clock()
run_recipe(load_recipe(recipe, overrides=overrides), out, **kw)
(out.parent / (out.name + ".wall")).write_text(str(clock() - t))
"""


def stage_times(report: dict) -> dict[str, float]:
    """Seconds per stage over all seeds (old reports: the seeds' timings; new ones: stage_times_s)."""
    if "stage_times_s" in report:
        return {k: v for k, v in report["stage_times_s"].items() if k != "total"}
    seeds = [r["timings_s"] for r in report.get("per_seed", {}).values()] or [report["timings_s"]]
    out: dict[str, float] = {}
    for t in seeds:
        for k, v in t.items():
            out[k] = out.get(k, 0.0) + v
    for k in ("load", "write"):
        out[k] = report["timings_s"].get(k, 0.0)
    return out


def run(code: Path, recipe: str, out: Path, overrides: list[str], cache: bool, cache_dir: Path, clock: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "NGGUARD_CACHE": str(cache_dir)}
    print(f"running {code} -> {out} (cache {'on' if cache else 'off'})", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-c", RUN, recipe, str(out), "1" if cache else "0", json.dumps(overrides), clock],
                   env=env, check=True, cwd=REPO)
    report = json.loads((out / "report.json").read_text())
    return {"stages": stage_times(report), "wall": float((out.parent / (out.name + ".wall")).read_text()),
            "patch": out / "patch" / "patch.safetensors"}


def patch_difference(a: Path, b: Path) -> tuple[str, str, float]:
    from safetensors.torch import load_file
    ta, tb = load_file(str(a)), load_file(str(b))
    diff = max(((ta[k].float() - tb[k].float()).abs().max().item() for k in ta if k in tb), default=float("nan"))
    return hashlib.sha256(a.read_bytes()).hexdigest(), hashlib.sha256(b.read_bytes()).hexdigest(), diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", nargs="?", default="recipes/organism.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--old", default="main", help="git ref of the old code (default main)")
    ap.add_argument("--only", choices=["old", "new"], help="run only one of them")
    ap.add_argument("--cached", action="store_true", help="also time the new code again with the stage cache warm")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall seconds (a quiet machine), or the run's CPU seconds over all its threads (a shared one: "
                         "what the code costs, not what the other jobs took)")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.only != "new":
            old = tmp / "old-code"
            old.mkdir()
            archive = subprocess.run(["git", "archive", args.old, "ngguard"], cwd=REPO, check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
            results[f"old ({args.old})"] = run(old, args.recipe, tmp / "old", args.overrides, False, tmp / "cache-old", args.clock)
        if args.only != "old":
            results["new"] = run(REPO, args.recipe, tmp / "new", args.overrides, False, tmp / "cache-new", args.clock)
            if args.cached:
                run(REPO, args.recipe, tmp / "fill", args.overrides, True, tmp / "cache-new", args.clock)
                results["new, cache warm"] = run(REPO, args.recipe, tmp / "warm", args.overrides, True, tmp / "cache-new", args.clock)
        names = list(results)
        stages = list(dict.fromkeys(k for r in results.values() for k in r["stages"]))
        print(f"\nrecipe {args.recipe} {' '.join('--set ' + o for o in args.overrides)}; "
              f"load average after: {os.getloadavg()}; {args.clock} seconds")
        head = f"{'stage':28s}" + "".join(f"{n:>22s}" for n in names)
        ratio = len(names) >= 2 and names[0].startswith("old")
        print(head + (f"{'old/new':>10s}" if ratio else ""))
        rows = [(s, [r["stages"].get(s) for r in results.values()]) for s in stages]
        rows.append((f"{args.clock.upper()} (whole run)", [r["wall"] for r in results.values()]))
        for s, vals in rows:
            line = f"{s:28s}" + "".join(f"{'-' if v is None else f'{v:.1f} s':>22s}" for v in vals)
            if ratio and vals[0] and vals[1]:
                line += f"{vals[0] / max(vals[1], 1e-9):>9.2f}x"
            print(line)
        if ratio:
            ha, hb, diff = patch_difference(results[names[0]]["patch"], results["new"]["patch"])
            print(f"\npatch sha256 old {ha}\npatch sha256 new {hb}\n"
                  f"{'identical bytes' if ha == hb else f'largest difference of a patched value: {diff:.3g}'}")


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"(bench wall {time.perf_counter() - t:.0f} s)")
