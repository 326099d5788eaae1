"""Whole-recipe wall time and its split across stages (default: the organism recipe).

    .venv/bin/python bench/recipe_time.py [recipes/organism.yaml] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ngguard.pipeline import run_recipe
from ngguard.recipe import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", nargs="?", default="recipes/organism.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, overrides=args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        out = run_recipe(recipe, Path(tmp) / "run")
        total = time.perf_counter() - t
        import json
        timings = json.loads((out / "report.json").read_text())["timings_s"]
    print(f"recipe {args.recipe} on {torch.get_num_threads()} threads: {total:.1f} s wall")
    for k, v in timings.items():
        if k != "total":
            print(f"  {k:28s} {v:8.1f} s  {100 * v / total:5.1f} %")


if __name__ == "__main__":
    main()
