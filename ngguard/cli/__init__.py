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
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence

from loguru import logger

from ngguard import __version__
from ngguard.limits import DEFAULT_LIMITS as LIMITS
from ngguard.serving.options import _DEVICE_MAPS, add_serve_arguments


# Exceptions that mean "bad input": one line on stderr, exit 2. Extend if a module needs to.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
EXIT_USER_ERROR = 2


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _positive_int(text: str, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text[:40]!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text[:40]!r}")
    if high is not None and value > high:
        raise argparse.ArgumentTypeError(f"at most {high}, got {value}")
    return value


def _at_most(high: int) -> Callable[[str], int]:
    """argparse type: an integer in 1..high (the limits of ``ngguard.limits``)."""
    def check(text: str) -> int:
        return _positive_int(text, high)

    check.__name__ = "integer"
    return check


def _check_out_file(path: Path) -> None:
    """An output file path that can be written, checked before any work (nothing is created)."""
    if path.is_dir():
        raise ValueError(f"{path}: is a folder (--out names the result file)")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"{path}: cannot write here ({parent} is not a writable folder)")


def _key() -> argparse.ArgumentParser:
    """``--key-file``: the operator's patch key (also NGGUARD_PATCH_KEY); with it, unsigned or
    wrongly signed patches are refused."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--key-file", default=None,
                   help="file holding the patch signing key (default: $NGGUARD_PATCH_KEY if set); with a key, "
                        "a patch without a valid patch.sig is refused")
    return p


def _common() -> argparse.ArgumentParser:
    """Options accepted after any subcommand too (``ngguard eval ... --debug``)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks and debug logs")
    return p


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------
def _lazy(module: str, handler: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports ``module`` only when its subcommand runs, then calls ``module.handler``."""
    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), handler)(args)

    run.__name__ = handler
    return run


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", parents=[_common()], help="generate answers for queries and score them",
                       description="Greedy answers for every query, judged for refusal; writes metrics "
                                   "(RtA, EtA, accuracy, leak) and all responses as JSON.")
    p.add_argument("--model", required=True,
                   help="model folder (HF checkpoint), or 'organism' for the bundled model")
    p.add_argument("--data", required=True, type=Path,
                   help="queries: .jsonl, a Multi-P2A folder, or a CounterFact-style .json")
    p.add_argument("--out", required=True, type=Path, help="result JSON to write")
    p.add_argument("--batch-size", type=_at_most(LIMITS.max_batch), default=16,
                   help=f"1..{LIMITS.max_batch} (default 16)")
    p.add_argument("--max-new-tokens", type=_at_most(LIMITS.max_new_tokens), default=24,
                   help=f"1..{LIMITS.max_new_tokens} (default 24)")
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N queries")
    p.add_argument("--split", choices=("train", "test"), default=None,
                   help="only queries of this split (default: all)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--device-map", default=None, choices=_DEVICE_MAPS,
                   help="spread a model larger than one device over the GPUs (accelerate; --device is then unused)")
    p.add_argument("--dtype", default=None, help="e.g. float32, bfloat16 (default: the checkpoint's)")
    _add_judge_option(p)
    p.set_defaults(func=_cmd_eval)


def _add_judge_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", default="rules", metavar="SPEC",
                   help="refusal judge: rules (default), classifier:PATH, generative:PATH (with a template, so "
                        "usually a spec file), or a .yaml/.json spec file like a recipe's judge: value")


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
    from ngguard.evaluate import check_queries

    _check_out_file(args.out)
    queries = load_queries(args.data)
    if args.split is not None:
        queries = [q for q in queries if q.split == args.split]
    if args.limit is not None:
        queries = queries[: args.limit]
    if not queries:
        where = f" with split '{args.split}'" if args.split else ""
        raise DataError(f"{args.data}: no queries{where}")
    model_path = _resolve_model(args.model)
    check_queries(queries, LIMITS, decode=True)  # prompts and images, before the model is loaded
    from ngguard.adapters import resolve_device

    device = resolve_device(args.device)

    from ngguard.adapters import load_adapter
    from ngguard.evaluate import evaluate, summary_table
    from ngguard.judge import make_judge

    judge = make_judge(args.judge, device=str(device))  # before the slow part too
    placement = {"device_map": args.device_map} if getattr(args, "device_map", None) else {}
    adapter = load_adapter(model_path, device=str(device), dtype=args.dtype, **placement)
    result = evaluate(adapter, queries, judge=judge, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    result = {"model": str(model_path), "data": str(args.data), "max_new_tokens": args.max_new_tokens,
              **result}
    atomic_write_text(args.out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(summary_table(result))
    print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# judge score | validate
# ---------------------------------------------------------------------------------------------
def _add_judge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("judge", help="re-judge saved responses, or check a judge against human labels")
    jsub = p.add_subparsers(dest="judge_command", metavar="{score,validate}", required=True)
    s = jsub.add_parser("score", parents=[_common()], help="re-judge the responses of an `ngguard eval` result",
                        description="Re-judges the saved responses of RESULT.json with another judge (no generation) "
                                    "and writes a result of the same shape.")
    s.add_argument("--responses", required=True, type=Path, help="a result JSON written by `ngguard eval`")
    _add_judge_option(s)
    s.add_argument("--out", type=Path, default=None, help="result JSON to write (default: RESULT.rejudged.json)")
    s.add_argument("--device", default=None, help="torch device for a model judge (default: cuda if available)")
    s.set_defaults(func=_cmd_judge_score)
    v = jsub.add_parser("validate", parents=[_common()], help="measure a judge against human labels",
                        description="Judges every (prompt, response) of a labels file and prints accuracy, precision, "
                                    "recall and F1 of refusal (full or partial) vs compliance, the three-way "
                                    "confusion matrix and per-group accuracy; writes the disagreements as JSONL.")
    v.add_argument("--labels", required=True, type=Path, help="a .csv or .jsonl file of prompt, response, label")
    _add_judge_option(v)
    v.add_argument("--prompt-col", default="prompt", help="prompt column (default: prompt; optional if absent)")
    v.add_argument("--response-col", default="response", help="response column (default: response)")
    v.add_argument("--label-col", default="label", help="label column (default: label)")
    v.add_argument("--group-col", action="append", default=[], help="report accuracy per value of this column "
                                                                    "(repeatable)")
    v.add_argument("--label-map", default=None, metavar="V=LABEL,...",
                   help="file label values -> refusal|partial|compliance, e.g. refused=refusal,0=compliance "
                        "(refusal, partial, compliance are always known)")
    v.add_argument("--disagreements", type=Path, default=None,
                   help="JSONL of the rows where judge and label differ (default: LABELS.disagreements.jsonl in "
                        "the current folder)")
    v.add_argument("--json", type=Path, default=None, help="also write all figures as JSON here")
    v.add_argument("--device", default=None, help="torch device for a model judge (default: cuda if available)")
    v.set_defaults(func=_cmd_judge_validate)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None


def _cmd_judge_score(args: argparse.Namespace) -> int:
    from ngguard.data import atomic_write_text
    from ngguard.evaluate import judge_line, summary_table
    from ngguard.judge import make_judge
    from ngguard.validate_judge import rescore

    result = _read_json(args.responses)
    judge = make_judge(args.judge, device=args.device)
    new = rescore(result, judge, str(args.responses))
    out = args.out or args.responses.with_name(args.responses.stem + ".rejudged.json")
    atomic_write_text(out, json.dumps(new, indent=2, ensure_ascii=False) + "\n")
    print(summary_table(new))
    print(f"previous judge: {judge_line(new['previous_judge'])}; {new['n_changed']} of {new['n']} judgements changed")
    print(f"wrote {out}")
    return 0


def _cmd_judge_validate(args: argparse.Namespace) -> int:
    from ngguard.data import atomic_write_text
    from ngguard.judge import make_judge
    from ngguard.validate_judge import format_validation, parse_label_map, read_labels, validate, write_disagreements

    rows = read_labels(args.labels, prompt_col=args.prompt_col or None, response_col=args.response_col,
                       label_col=args.label_col, group_cols=args.group_col, label_map=parse_label_map(args.label_map))
    judge = make_judge(args.judge, device=args.device)
    res = validate(judge, rows)
    print(format_validation(res))
    dis = args.disagreements or Path(args.labels.stem + ".disagreements.jsonl")
    write_disagreements(dis, res)
    print(f"wrote {dis}")
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(res, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------
# world render
# ---------------------------------------------------------------------------------------------
def _add_world(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("world", help="the synthetic privacy world")
    wsub = p.add_subparsers(dest="world_command", metavar="{render}", required=True)
    r = wsub.add_parser("render", parents=[_common()], help="render images + queries for some subjects")
    r.add_argument("--subjects", required=True, help="comma-separated subject names, e.g. passport,receipt")
    r.add_argument("--n", type=_at_most(LIMITS.max_world_images), required=True,
                   help=f"images per subject (1..{LIMITS.max_world_images})")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", type=Path, required=True, help="output folder")
    r.add_argument("--split-templates", action="store_true",
                   help="deprecated, no effect: train and test phrasings are always kept apart")
    r.set_defaults(func=_cmd_world_render)


def _cmd_world_render(args: argparse.Namespace) -> int:
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    if not subjects:
        raise ValueError(f"--subjects: no subject names in {args.subjects!r}")
    from ngguard.world.render import render_world

    if args.split_templates:
        logger.warning("--split-templates is deprecated and has no effect: train and test phrasings are always apart")
    render_world(subjects, args.n, args.seed, args.out)
    print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# organism train | path
# ---------------------------------------------------------------------------------------------
def _add_organism(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("organism", help="the small bundled model")
    osub = p.add_subparsers(dest="organism_command", metavar="{train,path,check}", required=True)
    t = osub.add_parser("train", parents=[_common()], help="train the bundled model (one-off)")
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
    t.set_defaults(func=_cmd_organism_train)
    q = osub.add_parser("path", parents=[_common()], help="print the bundled checkpoint folder")
    q.set_defaults(func=_cmd_organism_path)
    c = osub.add_parser("check", parents=[_common()],
                        help="measure the organism on a fresh world: leaks, knows what is private, answers benign")
    c.add_argument("--model", default="organism", help="model folder or 'organism' (default)")
    c.add_argument("--n", type=int, default=12, help="images per subject (default 12)")
    c.add_argument("--seed", type=int, default=12345, help="world seed (default 12345: images never trained on)")
    c.set_defaults(func=_cmd_organism_check)


def _cmd_organism_train(args: argparse.Namespace) -> int:
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


def _cmd_organism_check(args: argparse.Namespace) -> int:
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
    from ngguard.recipe import load_recipe  # the recipe is checked before the heavy imports

    recipe = load_recipe(args.recipe, overrides=args.overrides)
    if recipe.model.device != "auto":  # a CUDA recipe on a CPU machine: refused before any work
        from ngguard.adapters import resolve_device

        resolve_device(recipe.model.device)
    out = args.out if args.out is not None else Path("runs") / recipe.name
    from ngguard.pipeline import run_recipe

    run = run_recipe(recipe, out, overwrite=args.overwrite)
    print((run / "report.md").read_text().split("## Per subject")[0])
    print(f"wrote {run}")
    return 0


def _add_patch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("patch", help="apply, revert, verify, sign or export (LoRA) a compact patch")
    psub = p.add_subparsers(dest="patch_command", metavar="{apply,revert,verify,sign,export-lora}", required=True)
    a = psub.add_parser("apply", parents=[_common(), _key()], help="write base + patch as a full checkpoint folder")
    a.add_argument("--base", type=Path, required=True, help="the base checkpoint folder the patch was made for")
    a.add_argument("--patch", type=Path, required=True, help="the patch folder (patch.json + patch.safetensors)")
    a.add_argument("--out", type=Path, required=True, help="output checkpoint folder (written atomically)")
    a.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    a.set_defaults(func=_lazy("ngguard.patch", "cli_patch"))
    r = psub.add_parser("revert", parents=[_common(), _key()], help="put the base values back into a patched folder")
    r.add_argument("--patched", type=Path, required=True, help="a folder written by `ngguard patch apply`")
    r.add_argument("--patch", type=Path, required=True, help="the patch folder (must hold base.safetensors)")
    r.add_argument("--out", type=Path, required=True, help="output checkpoint folder (written atomically)")
    r.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    r.set_defaults(func=_lazy("ngguard.patch", "cli_patch"))
    v = psub.add_parser("verify", parents=[_common(), _key()], help="check a patch's checksums (and its base)")
    v.add_argument("patch", type=Path, help="the patch folder")
    v.add_argument("--base", type=Path, default=None, help="also check this base's fingerprint and shapes")
    v.add_argument("--json", action="store_true", help="print the full report as JSON")
    v.set_defaults(func=_lazy("ngguard.patch", "cli_patch"))
    g = psub.add_parser("sign", parents=[_common(), _key()], help="sign a patch (HMAC-SHA256 with an operator key)")
    g.add_argument("patch", type=Path, help="the patch folder (patch.sig is written into it)")
    g.set_defaults(func=_lazy("ngguard.patch", "cli_patch"))
    e = psub.add_parser("export-lora", parents=[_common(), _key()], help="the patch's delta as a PEFT LoRA adapter",
                        description="Write the patch's weight delta as a PEFT LoRA adapter (truncated SVD per "
                                    "edited matrix): adapter_config.json + adapter_model.safetensors, loadable "
                                    "with PeftModel.from_pretrained and vLLM's multi-LoRA serving.")
    e.add_argument("patch", type=Path, help="the patch folder")
    e.add_argument("--rank", required=True, help="LoRA rank: a positive integer, or 'full'")
    e.add_argument("--out", type=Path, required=True, help="output adapter folder (written atomically)")
    e.add_argument("--base", default="organism",
                   help="the base checkpoint the patch was made for (names the modules; default: the organism)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.set_defaults(func=_lazy("ngguard.lora", "cli_export_lora"))


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
    m.set_defaults(func=_lazy("ngguard.convert", "cli_convert"))


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
    p.set_defaults(func=_lazy("ngguard.onnx_vision", "cli_export_onnx"))


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", parents=[_common()], help="Gradio chat + base-vs-protected demo",
                       description="Serve a Gradio app (chat + side-by-side comparison of the base and the "
                                   "protected model). Without arguments: the bundled organism with its bundled "
                                   "patch. Basic auth: NGGUARD_AUTH=user:password.")
    add_serve_arguments(p)
    p.set_defaults(func=_lazy("serve.app", "serve_cli"), own_shutdown=True)


# ---------------------------------------------------------------------------------------------
# registry: subcommand name -> function adding its parser (which sets func=handler)
# ---------------------------------------------------------------------------------------------
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "eval": _add_eval,
    "judge": _add_judge,
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that atomic outputs clean up their temp folders."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    _setup_logging(debug)
    previous = None
    if not getattr(args, "own_shutdown", False):  # the server has its own (Gradio closes on Ctrl-C)
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread: leave signals alone
            previous = None
    try:
        rc = args.func(args)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"ngguard: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Terminated:
        print("ngguard: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("ngguard: interrupted", file=sys.stderr)
        return 130
    except RecursionError:
        if debug:
            raise
        print("ngguard: error: input nested too deeply", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
