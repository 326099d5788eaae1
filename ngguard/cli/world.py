"""``ngguard world render``: the synthetic privacy world."""
from __future__ import annotations

import argparse
from pathlib import Path

from loguru import logger

from ngguard.limits import DEFAULT_LIMITS as LIMITS

from .common import Subparsers, at_most, check_out_folder, command_group, common

# The handlers import the library inside themselves: `ngguard --help` stays fast, without torch (cli/__init__.py).


def add(sub: Subparsers) -> None:
    wsub = command_group(sub, "world", "the synthetic privacy world", ["render"])
    r = wsub.add_parser("render", parents=[common()], help="render images + queries for some subjects")
    r.add_argument("--subjects", required=True, help="comma-separated subject names, e.g. passport,receipt")
    r.add_argument("--n", type=at_most(LIMITS.max_world_images), required=True,
                   help=f"images per subject (1..{LIMITS.max_world_images})")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", type=Path, required=True, help="output folder")
    r.add_argument("--split-templates", action="store_true",
                   help="deprecated, no effect: train and test phrasings are always kept apart")
    r.set_defaults(func=render)


def render(args: argparse.Namespace) -> int:
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    if not subjects:
        raise ValueError(f"--subjects: no subject names in {args.subjects!r}")
    check_out_folder(args.out)  # a device, FIFO or file is refused before any rendering
    from ngguard.world.render import render_world

    if args.split_templates:
        logger.warning("--split-templates is deprecated and has no effect: train and test phrasings are always apart")
    render_world(subjects, args.n, args.seed, args.out)
    print(f"wrote {args.out}")
    return 0
