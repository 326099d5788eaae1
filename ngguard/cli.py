"""The ``ngguard`` command line. Subcommands only parse arguments and call library functions,
imported lazily inside each handler (so ``ngguard --help`` stays fast and light).

Adding a subcommand: write ``_add_<name>(subparsers)`` that creates its parser and sets
``func=<handler>``, write the handler ``_cmd_<name>(args) -> int | None``, and register the adder
in ``SUBCOMMANDS`` below (the commented slots mark the planned ones).

Errors: a ``ValueError`` / ``FileNotFoundError`` (or subclass, e.g. ``DataError``) raised by the
library is printed as ``ngguard: error: <message>`` on stderr with exit status 2 and no traceback,
unless ``--debug`` is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from loguru import logger

from ngguard import __version__

# Exceptions that mean "bad input": one line on stderr, exit 2. Extend if a module needs to.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
EXIT_USER_ERROR = 2


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _common() -> argparse.ArgumentParser:
    """Options accepted after any subcommand too (``ngguard eval ... --debug``)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks and debug logs")
    return p


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", parents=[_common()], help="generate answers for queries and score them",
                       description="Greedy answers for every query, judged for refusal; writes metrics "
                                   "(RtA, EtA, accuracy, leak) and all responses as JSON.")
    p.add_argument("--model", required=True,
                   help="model folder (HF checkpoint), or 'organism' for the bundled model")
    p.add_argument("--data", required=True, type=Path,
                   help="queries: .jsonl, a Multi-P2A folder, or a CounterFact-style .json")
    p.add_argument("--out", required=True, type=Path, help="result JSON to write")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--max-new-tokens", type=_positive_int, default=24)
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N queries")
    p.add_argument("--split", choices=("train", "test"), default=None,
                   help="only queries of this split (default: all)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="e.g. float32, bfloat16 (default: the checkpoint's)")
    p.set_defaults(func=_cmd_eval)


def _device(name: str | None) -> str:
    if name is not None:
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_model(model: str) -> Path:
    if model == "organism":
        from ngguard.organism import checkpoint_path

        return Path(checkpoint_path())
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder")
    return path


def _cmd_eval(args: argparse.Namespace) -> int:
    from ngguard.data import DataError, atomic_write_text, load_queries

    queries = load_queries(args.data)
    if args.split is not None:
        queries = [q for q in queries if q.split == args.split]
    if args.limit is not None:
        queries = queries[: args.limit]
    if not queries:
        where = f" with split '{args.split}'" if args.split else ""
        raise DataError(f"{args.data}: no queries{where}")
    model_path = _resolve_model(args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)  # fail early, before the slow part

    from ngguard.adapters import load_adapter
    from ngguard.evaluate import evaluate, summary_table

    adapter = load_adapter(model_path, device=_device(args.device), dtype=args.dtype)
    result = evaluate(adapter, queries, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    result = {"model": str(model_path), "data": str(args.data), "max_new_tokens": args.max_new_tokens,
              **result}
    atomic_write_text(args.out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(summary_table(result))
    print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# world render
# ---------------------------------------------------------------------------------------------
def _add_world(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("world", help="the synthetic privacy world")
    wsub = p.add_subparsers(dest="world_command", metavar="{render}", required=True)
    r = wsub.add_parser("render", parents=[_common()], help="render images + queries for some subjects")
    r.add_argument("--subjects", required=True, help="comma-separated subject names, e.g. passport,receipt")
    r.add_argument("--n", type=_positive_int, required=True, help="images per subject")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", type=Path, required=True, help="output folder")
    r.add_argument("--split-templates", action="store_true",
                   help="keep question templates of train and test apart")
    r.set_defaults(func=_cmd_world_render)


def _cmd_world_render(args: argparse.Namespace) -> int:
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    if not subjects:
        raise ValueError(f"--subjects: no subject names in {args.subjects!r}")
    import inspect

    from ngguard.world.render import render_world

    extra = {}
    if args.split_templates:
        if "split_templates" in inspect.signature(render_world).parameters:
            extra["split_templates"] = True
        else:
            logger.warning("--split-templates: render_world always keeps train/test phrasings apart")
    render_world(subjects, args.n, args.seed, args.out, **extra)
    print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# organism train | path
# ---------------------------------------------------------------------------------------------
def _add_organism(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("organism", help="the small bundled model")
    osub = p.add_subparsers(dest="organism_command", metavar="{train,path}", required=True)
    t = osub.add_parser("train", parents=[_common()], help="train the bundled model (one-off)")
    t.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: the bundled one)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_cmd_organism_train)
    q = osub.add_parser("path", parents=[_common()], help="print the bundled checkpoint folder")
    q.set_defaults(func=_cmd_organism_path)


def _cmd_organism_train(args: argparse.Namespace) -> int:
    from ngguard.organism import CHECKPOINT
    from ngguard.organism.train import train_organism

    out = train_organism(out=args.out if args.out is not None else CHECKPOINT, seed=args.seed)
    if out is not None:
        print(f"wrote {out}")
    return 0


def _cmd_organism_path(args: argparse.Namespace) -> int:
    from ngguard.organism import checkpoint_path

    print(checkpoint_path())
    return 0


# ---------------------------------------------------------------------------------------------
# edit (the main job)
# ---------------------------------------------------------------------------------------------
def _add_edit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", parents=[_common()], help="run a recipe: layer search, localization, gated edit",
                       description="Runs a recipe end to end and writes DIR/model (HF checkpoint), DIR/patch "
                                   "(only the changed matrices + manifest) and DIR/report.{json,md,png}.")
    p.add_argument("recipe", type=Path, help="recipe YAML, e.g. recipes/organism.yaml")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<recipe name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set edit.lr=2e-5 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.set_defaults(func=_cmd_edit)


def _cmd_edit(args: argparse.Namespace) -> int:
    from ngguard.pipeline import run_recipe
    from ngguard.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides=args.overrides)
    out = args.out if args.out is not None else Path("runs") / recipe.name
    run = run_recipe(recipe, out, overwrite=args.overwrite)
    print((run / "report.md").read_text().split("## Per subject")[0])
    print(f"wrote {run}")
    return 0


def _add_patch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("patch", help="apply, revert, verify or export (LoRA) a compact patch")
    psub = p.add_subparsers(dest="patch_command", metavar="{apply,revert,verify,export-lora}", required=True)
    a = psub.add_parser("apply", parents=[_common()], help="write base + patch as a full checkpoint folder")
    a.add_argument("--base", type=Path, required=True, help="the base checkpoint folder the patch was made for")
    a.add_argument("--patch", type=Path, required=True, help="the patch folder (patch.json + patch.safetensors)")
    a.add_argument("--out", type=Path, required=True, help="output checkpoint folder (written atomically)")
    a.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    a.set_defaults(func=_cmd_patch)
    r = psub.add_parser("revert", parents=[_common()], help="put the base values back into a patched folder")
    r.add_argument("--patched", type=Path, required=True, help="a folder written by `ngguard patch apply`")
    r.add_argument("--patch", type=Path, required=True, help="the patch folder (must hold base.safetensors)")
    r.add_argument("--out", type=Path, required=True, help="output checkpoint folder (written atomically)")
    r.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    r.set_defaults(func=_cmd_patch)
    v = psub.add_parser("verify", parents=[_common()], help="check a patch's checksums (and its base)")
    v.add_argument("patch", type=Path, help="the patch folder")
    v.add_argument("--base", type=Path, default=None, help="also check this base's fingerprint and shapes")
    v.add_argument("--json", action="store_true", help="print the full report as JSON")
    v.set_defaults(func=_cmd_patch)
    e = psub.add_parser("export-lora", parents=[_common()], help="the patch's delta as a PEFT LoRA adapter",
                        description="Write the patch's weight delta as a PEFT LoRA adapter (truncated SVD per "
                                    "edited matrix): adapter_config.json + adapter_model.safetensors, loadable "
                                    "with PeftModel.from_pretrained and vLLM's multi-LoRA serving.")
    e.add_argument("patch", type=Path, help="the patch folder")
    e.add_argument("--rank", required=True, help="LoRA rank: a positive integer, or 'full'")
    e.add_argument("--out", type=Path, required=True, help="output adapter folder (written atomically)")
    e.add_argument("--base", default="organism",
                   help="the base checkpoint the patch was made for (names the modules; default: the organism)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.set_defaults(func=_cmd_export_lora)


def _cmd_export_lora(args: argparse.Namespace) -> int:
    from ngguard.lora import cli_export_lora

    return cli_export_lora(args)


def _cmd_patch(args: argparse.Namespace) -> int:
    from ngguard.patch import cli_patch

    return cli_patch(args)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an original (non-HF) checkpoint into an HF model folder")
    csub = p.add_subparsers(dest="convert_command", metavar="{minigpt4}", required=True)
    m = csub.add_parser("minigpt4", parents=[_common()],
                        help="MiniGPT-4 v1 (.pth + LLaMA + BLIP-2 folders) -> Blip2ForConditionalGeneration folder")
    m.add_argument("--ckpt", type=Path, required=True,
                   help="MiniGPT-4 checkpoint (.pth, original layout; read with torch.load(weights_only=True))")
    m.add_argument("--llm", type=Path, required=True,
                   help="HF folder of the LLaMA-2-chat / Vicuna model it was trained with (safetensors + tokenizer)")
    m.add_argument("--blip2", type=Path, required=True,
                   help="HF BLIP-2 folder for the ViT + Q-Former (e.g. Salesforce/blip2-flan-t5-xxl, safetensors)")
    m.add_argument("--out", type=Path, required=True, help="output model folder (written atomically)")
    m.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="cast the weights (default: keep each source's dtype)")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    m.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from ngguard.convert import cli_convert

    return cli_convert(args)


def _add_export_onnx(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-onnx", parents=[_common()], help="export the vision tower + projector to ONNX",
                       description="Export vision tower + projector to OUT/vision.onnx (+ manifest.json) with a "
                                   "parity check against torch (batches 1 and 3); nothing is written if it fails.")
    p.add_argument("--model", required=True, help="model folder (HF checkpoint), or 'organism' for the bundled model")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--atol", type=float, default=1e-4, help="absolute part of the allowed difference")
    p.add_argument("--rtol", type=float, default=1e-5, help="relative part (times max abs feature)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_export_onnx)


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from ngguard.onnx_vision import cli_export_onnx

    return cli_export_onnx(args)


def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``ngguard serve`` options (also used by ``python -m serve.app``)."""
    p.add_argument("--model", default="organism", help="model folder (HF checkpoint) or 'organism' (default)")
    p.add_argument("--patch", default=None,
                   help="protection patch folder (default: the bundled one when serving the organism)")
    p.add_argument("--no-patch", action="store_true", help="serve the model unprotected")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 in Docker)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--vision", choices=("torch", "onnx"), default="torch", help="image features from torch or ONNX")
    p.add_argument("--onnx-dir", default=None, help="an export-onnx folder (default: export once into the cache)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None,
                   help="e.g. float32, bfloat16 (default: float32 on CPU, else the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--protection", choices=("rows", "merged"), default="rows",
                   help="rows (default): base weights + the patch applied per batch row, so base and protected "
                        "answers share batches; merged: the patched weights in the model, toggled under a lock")
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests generated together by the request batcher (default 16; 1 = no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long an idle batcher waits for more requests (default 5 ms)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="worker slots per event (default: max(2, --max-batch))")
    p.add_argument("--max-queue", type=int, default=64, help="queued requests before new ones are refused")
    return p


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", parents=[_common()], help="Gradio chat + base-vs-protected demo",
                       description="Serve a Gradio app (chat + side-by-side comparison of the base and the "
                                   "protected model). Without arguments: the bundled organism with its bundled "
                                   "patch. Basic auth: NGGUARD_AUTH=user:password.")
    add_serve_arguments(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from serve.app import serve_cli

    return serve_cli(args)


# ---------------------------------------------------------------------------------------------
# registry: subcommand name -> function adding its parser (which sets func=handler)
# ---------------------------------------------------------------------------------------------
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "eval": _add_eval,
    "world": _add_world,
    "organism": _add_organism,
    "edit": _add_edit,
    "patch": _add_patch,
    "convert": _add_convert,
    "export-onnx": _add_export_onnx,
    "serve": _add_serve,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ngguard", description="Neural Gate privacy editing for vision-language models.")
    parser.add_argument("--version", action="version", version=f"ngguard {__version__}")
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


_log_handler: int | None = None


def _setup_logging(debug: bool) -> None:
    global _log_handler
    for handler in (0, _log_handler):  # loguru's default handler, then ours from an earlier call
        if handler is not None:
            try:
                logger.remove(handler)
            except ValueError:
                pass
    # look sys.stderr up at each write (test runners swap it)
    _log_handler = logger.add(lambda m: sys.stderr.write(m), level="DEBUG" if debug else "INFO",
                              format="<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}")


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:  # "[Errno 2] ..." -> "path: reason"
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    _setup_logging(debug)
    try:
        rc = args.func(args)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"ngguard: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ngguard: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
