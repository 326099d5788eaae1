"""``ngguard patch apply | revert | verify | sign | export-lora``: compact patches (``ngguard.patch``,
``ngguard.lora``)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import Subparsers, check_out_folder, command_group, common, key_option, out_folder

# The handlers import the library inside themselves: `ngguard --help` stays fast, without torch (cli/__init__.py).

COMMANDS = ["apply", "revert", "verify", "sign", "export-lora"]


def add(sub: Subparsers) -> None:
    psub = command_group(sub, "patch", "apply, revert, verify, sign or export (LoRA) a compact patch", COMMANDS)
    for name, help, source, source_help, patch_help in (
            ("apply", "write base + patch as a full checkpoint folder", "--base",
             "the base checkpoint folder the patch was made for", "the patch folder (patch.json + patch.safetensors)"),
            ("revert", "put the base values back into a patched folder", "--patched",
             "a folder written by `ngguard patch apply`", "the patch folder (must hold base.safetensors)")):
        p = psub.add_parser(name, parents=[common(), key_option()], help=help)
        p.add_argument(source, type=Path, required=True, help=source_help)
        p.add_argument("--patch", type=Path, required=True, help=patch_help)
        out_folder(p, "output checkpoint folder (written atomically)")
        p.set_defaults(func=cli_patch)
    v = psub.add_parser("verify", parents=[common(), key_option()], help="check a patch's checksums (and its base)")
    v.add_argument("patch", type=Path, help="the patch folder")
    v.add_argument("--base", type=Path, default=None, help="also check this base's fingerprint and shapes")
    v.add_argument("--json", action="store_true", help="print the full report as JSON")
    v.set_defaults(func=cli_patch)
    g = psub.add_parser("sign", parents=[common(), key_option()], help="sign a patch (HMAC-SHA256 with an operator key)")
    g.add_argument("patch", type=Path, help="the patch folder (patch.sig is written into it)")
    g.set_defaults(func=cli_patch)
    e = psub.add_parser("export-lora", parents=[common(), key_option()], help="the patch's delta as a PEFT LoRA adapter",
                        description="Write the patch's weight delta as a PEFT LoRA adapter (truncated SVD per "
                                    "edited matrix): adapter_config.json + adapter_model.safetensors, loadable "
                                    "with PeftModel.from_pretrained and vLLM's multi-LoRA serving.")
    e.add_argument("patch", type=Path, help="the patch folder")
    e.add_argument("--rank", required=True, help="LoRA rank: a positive integer, or 'full'")
    out_folder(e, "output adapter folder (written atomically)")
    e.add_argument("--base", default="organism",
                   help="the base checkpoint the patch was made for (names the modules; default: the organism)")
    e.set_defaults(func=cli_export_lora)


def cli_patch(args: argparse.Namespace) -> int:
    """``ngguard patch apply|revert|verify|sign`` (``patch_command``, ``base``, ``patch``, ``patched``,
    ``out``, ``overwrite``, ``json``, ``key_file``). Prints one result line (``verify --json``: the
    report); returns 0. Problems raise PatchError (a ValueError: printed as one line)."""
    from ngguard.guard_patch import load_guard
    from ngguard.patch import (KEY_ENV, SIGNATURE, PatchError, apply_patch, patch_key, revert_patch, sign_patch,
                               verify_patch)

    cmd = args.patch_command
    if cmd in ("apply", "revert"):
        check_out_folder(args.out)
    key = patch_key(getattr(args, "key_file", None))
    if cmd == "sign":
        if key is None:
            raise PatchError(f"patch sign needs a key: --key-file FILE or {KEY_ENV}")
        sign_patch(args.patch, key)
        print(f"signed {args.patch} ({SIGNATURE})")
        return 0
    if cmd == "apply":
        r = apply_patch(args.base, args.patch, args.out, overwrite=args.overwrite, key=key)
        print(f"applied patch {r['patch_id']} -> {r['out_dir']} ({len(r['tensors'])} tensors)")
    elif cmd == "revert":
        r = revert_patch(args.patched, args.patch, args.out, overwrite=args.overwrite, key=key)
        print(f"reverted patch {r['patch_id']} -> {r['out_dir']}")
    elif cmd == "verify":
        r = verify_patch(args.patch, base_dir=args.base, key=key)
        if r["kind"] == "guard":  # build it too: its fields and settings are checked where it is made
            load_guard(args.patch, key=key)
        if getattr(args, "json", False):
            print(json.dumps(r, indent=2))
        else:
            base = "base fingerprint matches" if r["base_checked"] else "base not checked (pass --base)"
            what = f"guard ({r['method']}, {len(r['guard']['tensors'])} tensors, no weight changes)" \
                if r["kind"] == "guard" else \
                f"{len(r['tensors'])} tensors, {'revertible' if r['revertible'] else 'not revertible'}"
            print(f"patch {r['patch_id']} OK: {what}, {base}, signature {r['signature']}")
    else:
        raise PatchError(f"unknown patch command {cmd!r} (apply, revert, verify, sign)")
    return 0


def cli_export_lora(args: argparse.Namespace) -> int:
    """``ngguard patch export-lora PATCH --rank R --out DIR [--base B] [--overwrite] [--key-file F]``."""
    from ngguard.lora import export_lora, parse_rank
    from ngguard.patch import patch_key

    check_out_folder(args.out)
    info = export_lora(args.patch, args.out, rank=parse_rank(args.rank), base=args.base, overwrite=args.overwrite,
                       key=patch_key(getattr(args, "key_file", None)))
    print(f"patch {info['patch_id']} -> LoRA rank {info['rank']} in {args.out} "
          f"({info['energy_kept']:.1%} of the delta's energy kept)")
    return 0
