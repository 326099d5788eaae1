"""``ngguard organism train | path | check``: the small bundled model."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import Subparsers, command_group, common


def add(sub: Subparsers) -> None:
    osub = command_group(sub, "organism", "the small bundled model", ["train", "path", "check"])
    t = osub.add_parser("train", parents=[common()], help="train the bundled model (one-off)")
    t.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: the bundled one)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=2600, help="chat-stage steps (default 2600: the bundled organism)")
    t.add_argument("--layers", type=int, default=6, help="language-model layers (default 6)")
    t.add_argument("--layout", choices=["text-first", "image-first"], default="text-first",
                   help="where the image goes in the prompt (default text-first: the bundled organism)")
    t.add_argument("--position-codes", action="store_true",
                   help="the vision curriculum also teaches each image token its grid row and column")
    t.add_argument("--glyph-steps", type=int, default=400, help="vision-curriculum steps (default 400)")
    t.add_argument("--lr", type=float, default=1.5e-3, help="chat-stage peak learning rate (default 1.5e-3)")
    t.add_argument("--warmup", type=int, default=100, help="chat-stage warm-up steps (default 100)")
    t.add_argument("--snapshot-every", type=int, default=None, metavar="N",
                   help="also save the model every N chat steps to OUT.stepN")
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
    from ngguard.organism import CHECKPOINT
    from ngguard.organism.train import train_organism

    if args.steps < 1 or args.layers < 2:
        raise ValueError(f"organism train: --steps must be >= 1 and --layers >= 2, got {args.steps} and {args.layers}")
    out = train_organism(out=args.out if args.out is not None else CHECKPOINT, seed=args.seed, steps=args.steps,
                         layers=args.layers, layout=args.layout, position_codes=args.position_codes,
                         lr=args.lr, warmup=args.warmup, glyph_steps=args.glyph_steps, snapshot_every=args.snapshot_every)
    if out is not None:
        print(f"wrote {out}")
    return 0


def check(args: argparse.Namespace) -> int:
    import tempfile

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
