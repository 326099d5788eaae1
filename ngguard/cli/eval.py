"""``ngguard eval``: greedy answers for queries, judged for refusal."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ngguard.limits import DEFAULT_LIMITS as LIMITS
from ngguard.device_maps import AUTO_MAPS

from .common import Subparsers, at_most, check_out_file, common, judge_option, key_option, positive_int, resolve_model

# The handlers import the library inside themselves: `ngguard --help` stays fast, without torch (cli/__init__.py).


def add(sub: Subparsers) -> None:
    p = sub.add_parser("eval", parents=[common(), key_option()], help="generate answers for queries and score them",
                       description="Greedy answers for every query, judged for refusal; writes metrics "
                                   "(RtA, EtA, accuracy, leak) and all responses as JSON. With --patch: "
                                   "the model as the patch protects it (a weight patch applied in memory, "
                                   "or a guard patch in front of it).")
    p.add_argument("--model", required=True,
                   help="model folder (HF checkpoint), or 'organism' for the bundled model")
    p.add_argument("--data", required=True, type=Path,
                   help="queries: .jsonl, a Multi-P2A folder, or a CounterFact-style .json")
    p.add_argument("--out", required=True, type=Path, help="result JSON to write")
    p.add_argument("--patch", type=Path, default=None,
                   help="a patch folder (`ngguard edit` writes one): weights are swapped in memory, a guard patch "
                        "(privacy_probe, keyword_filter) decides which questions get its refusal; checked "
                        "against --model first")
    p.add_argument("--batch-size", type=at_most(LIMITS.max_batch), default=16,
                   help=f"1..{LIMITS.max_batch} (default 16)")
    p.add_argument("--max-new-tokens", type=at_most(LIMITS.max_new_tokens), default=24,
                   help=f"1..{LIMITS.max_new_tokens} (default 24)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N queries")
    p.add_argument("--split", choices=("train", "test"), default=None,
                   help="only queries of this split (default: all)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--device-map", default=None, choices=AUTO_MAPS,
                   help="spread a model larger than one device over the GPUs (accelerate; --device is then unused)")
    p.add_argument("--dtype", default=None, help="e.g. float32, bfloat16 (default: the checkpoint's)")
    judge_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ngguard.atomic import atomic_write_text
    from ngguard.data import DataError, load_queries
    from ngguard.evaluate import check_queries

    check_out_file(args.out)
    queries = load_queries(args.data)
    if args.split is not None:
        queries = [q for q in queries if q.split == args.split]
    if args.limit is not None:
        queries = queries[: args.limit]
    if not queries:
        where = f" with split '{args.split}'" if args.split else ""
        raise DataError(f"{args.data}: no queries{where}")
    model_path = resolve_model(args.model)
    check_queries(queries, LIMITS, decode=True)  # prompts and images, before the model is loaded
    from ngguard.devices import resolve_device

    device = resolve_device(args.device)

    from ngguard.adapters import load_adapter
    from ngguard.evaluate import evaluate, summary_table
    from ngguard.judges import make_judge

    judge = make_judge(args.judge, device=str(device))  # before the slow part too
    key, manifest = None, None
    if args.patch is not None:  # checksums, signature and the base's fingerprint before the model is loaded
        from ngguard.patch import check_base, patch_key, read_manifest

        key = patch_key(getattr(args, "key_file", None))
        manifest = read_manifest(args.patch)
        check_base(manifest, model_path)
    placement = {"device_map": args.device_map} if getattr(args, "device_map", None) else {}
    adapter = load_adapter(model_path, device=str(device), dtype=args.dtype, **placement)
    guard = _protect(adapter, args.patch, manifest, key) if args.patch is not None else None
    result = evaluate(adapter, queries, judge=judge, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      guard=guard)
    result = {"model": str(model_path), "data": str(args.data), "max_new_tokens": args.max_new_tokens,
              **({"patch": str(args.patch), "patch_id": manifest["patch_id"]} if manifest else {}), **result}
    atomic_write_text(args.out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(summary_table(result))
    print(f"wrote {args.out}")
    return 0


def _protect(adapter, patch: Path, manifest: dict, key: bytes | None):
    """The patch put to work on the loaded model: a guard patch's guard (returned: ``evaluate`` puts it
    in front), or a weight patch's tensors swapped in (``ngguard.patch.patch_state_dict``; None)."""
    if "guard" in manifest:
        from ngguard.guard_patch import load_guard

        return load_guard(patch, adapter, key=key)[1]
    from ngguard.patch import patch_state_dict

    patch_state_dict(adapter.model, patch, key=key)
    return None
