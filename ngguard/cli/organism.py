"""``ngguard organism train | path | check``: the small bundled model."""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from .common import Subparsers, command_group, common

# The handlers import the library inside themselves: `ngguard --help` stays fast, without torch (cli/__init__.py).


def add(sub: Subparsers) -> None:
    osub = command_group(sub, "organism", "the small bundled model", ["train", "path", "check"])
    t = osub.add_parser("train", parents=[common()], help="train the bundled model (one-off)")
    t.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: the bundled one)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--layout", choices=["text-first", "image-first"], default=None,
                   help="where the image goes in the prompt")
    t.add_argument("--layers", type=int, default=None, help="language-model layers")
    t.add_argument("--glyph-steps", type=int, default=None, help="vision-curriculum steps")
    t.add_argument("--steps", type=int, default=None, help="chat-stage steps")
    t.add_argument("--lr", type=float, default=None, help="chat-stage peak learning rate")
    t.add_argument("--warmup", type=int, default=None, help="chat-stage warm-up steps")
    t.add_argument("--position-codes", action=argparse.BooleanOptionalAction, default=None,
                   help="the vision curriculum also teaches each image token its grid row and column")
    t.add_argument("--focus-steps", type=int, default=None,
                   help="stage 3: steps on batches rich in the skills the chat stage under-trains (0: no stage 3)")
    t.add_argument("--focus-share", type=float, default=None, help="stage 3: share of each batch from those skills")
    t.add_argument("--focus-lr", type=float, default=None, help="stage 3 peak learning rate")
    t.add_argument("--from-stage2", type=Path, default=None, metavar="DIR",
                   help="skip stages 1-2: start stage 3 from DIR, a checkpoint written with --focus-steps 0")
    t.add_argument("--snapshot-every", type=int, default=None, metavar="N",
                   help="also save the model every N chat steps to OUT.stepN")
    t.epilog = "Options left out take the bundled organism's settings (ngguard.organism.TrainSettings)."
    t.set_defaults(func=train)
    q = osub.add_parser("path", parents=[common()], help="print the bundled checkpoint folder")
    q.set_defaults(func=path)
    c = osub.add_parser("check", parents=[common()],
                        help="measure the organism on a fresh world: leaks, knows what is private, answers benign")
    c.add_argument("--model", default="organism", help="model folder or 'organism' (default)")
    c.add_argument("--n", type=int, default=12, help="images per subject (default 12)")
    c.add_argument("--seed", type=int, default=12345, help="world seed (default 12345: images never trained on)")
    c.set_defaults(func=check)


def train(args: argparse.Namespace) -> int:
    from ngguard.organism import CHECKPOINT, TrainSettings
    from ngguard.organism.train import train_organism

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)
             if getattr(args, f.name, None) is not None}
    settings = dataclasses.replace(TrainSettings(), **given)
    if settings.steps < 1 or settings.layers < 2 or settings.glyph_steps < 0 or settings.focus_steps < 0:
        raise ValueError(f"organism train: --steps must be >= 1, --layers >= 2, --glyph-steps and --focus-steps "
                         f">= 0, got {settings.steps}, {settings.layers}, {settings.glyph_steps} and {settings.focus_steps}")
    if not 0.0 <= settings.focus_share <= 1.0:
        raise ValueError(f"organism train: --focus-share must be in [0, 1], got {settings.focus_share}")
    if args.from_stage2 is not None:
        if not (args.from_stage2 / "config.json").is_file():
            raise ValueError(f"organism train: --from-stage2 {args.from_stage2} is not a checkpoint folder (no config.json)")
        if not settings.focus_steps:
            raise ValueError("organism train: --from-stage2 needs --focus-steps >= 1 (it only runs stage 3)")
    out = train_organism(args.out if args.out is not None else CHECKPOINT, args.seed, settings,
                         snapshot_every=args.snapshot_every, from_stage2=args.from_stage2)
    if out is not None:
        print(f"wrote {out}")
    return 0


def check(args: argparse.Namespace) -> int:
    from ngguard.adapters import load_adapter, resolve_model_path
    from ngguard.organism.check import card_table, organism_card

    if args.n < 4:
        raise ValueError(f"--n must be >= 4 (every split needs a test image), got {args.n}")
    adapter = load_adapter(resolve_model_path(args.model), dtype="float32")
    with tempfile.TemporaryDirectory(prefix="ngguard-check-") as d:
        res = organism_card(adapter, Path(d) / "world", n=args.n, seed=args.seed)
    print(card_table(res))
    return 0


def path(args: argparse.Namespace) -> int:
    from ngguard.organism import checkpoint_path

    print(checkpoint_path())
    return 0
