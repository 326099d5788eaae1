"""``ngguard edit RECIPE``: the main job (``ngguard.pipeline.run_recipe``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import Subparsers, check_out_folder, common, out_folder

# The handlers import the library inside themselves: `ngguard --help` stays fast, without torch (cli/__init__.py).


def add(sub: Subparsers) -> None:
    p = sub.add_parser("edit", parents=[common()], help="run a recipe: layer search, localization, gated edit",
                       description="Runs a recipe end to end and writes DIR/model (HF checkpoint), DIR/patch "
                                   "(only the changed matrices + manifest) and DIR/report.{json,md,png}. With a "
                                   "method that edits no weights (privacy_probe, keyword_filter) DIR/patch is a guard "
                                   "patch (served with ngguard serve --patch DIR/patch) and there is no DIR/model.")
    p.add_argument("recipe", type=Path, help="recipe YAML, e.g. recipes/organism.yaml")
    out_folder(p, "run folder (default: runs/<recipe name>)", overwrite="replace an existing run folder", required=False)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set edit.lr=2e-5 (repeatable)")
    p.add_argument("--no-cache", action="store_true",
                   help="compute every stage again: do not reuse (nor store) the evaluation before the edit and the "
                        "localization of earlier runs with the same inputs (stored under $NGGUARD_CACHE or "
                        "~/.cache/ngguard, /runs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ngguard.recipe import load_recipe  # the recipe is checked before the heavy imports

    recipe = load_recipe(args.recipe, overrides=args.overrides)
    if recipe.model.device != "auto":  # a CUDA recipe on a CPU machine: refused before any work
        from ngguard.devices import resolve_device

        resolve_device(recipe.model.device)
    out = args.out if args.out is not None else Path("runs") / recipe.name
    check_out_folder(out)
    from ngguard.pipeline import run_recipe

    run_dir = run_recipe(recipe, out, overwrite=args.overwrite, cache=not args.no_cache)
    print((run_dir / "report.md").read_text().split("## Per subject")[0])
    print(f"wrote {run_dir}")
    return 0
