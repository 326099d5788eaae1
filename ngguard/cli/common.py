"""What the subcommands share: argument types, the parent parsers (``--debug``, ``--key-file``),
command groups, lazy handlers and small input checks."""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Callable, Sequence

import ngguard.organism
from ngguard.atomic import check_out_path
from ngguard.limits import DEFAULT_LIMITS, read_text_file

Subparsers = argparse._SubParsersAction


def positive_int(text: str, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text[:40]!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text[:40]!r}")
    if high is not None and value > high:
        raise argparse.ArgumentTypeError(f"at most {high}, got {value}")
    return value


def at_most(high: int) -> Callable[[str], int]:
    """argparse type: an integer in 1..high (the limits of ``ngguard.limits``)."""
    def check(text: str) -> int:
        return positive_int(text, high)

    check.__name__ = "integer"
    return check


def check_out_file(path: Path) -> None:
    """An output file path that can be written, checked before any work (nothing is created): if it
    exists it is a regular file (never a folder, device or FIFO: ``atomic.check_out_path``)."""
    if path.is_dir():
        raise ValueError(f"{path}: is a folder (--out names the result file)")
    check_out_path(path, folder=False)


def check_out_folder(path: Path) -> None:
    """An output folder path, checked before any work: if it exists it is a folder, and its nearest
    existing parent is a writable folder (``atomic.check_out_path``)."""
    check_out_path(path, folder=True)


def key_option() -> argparse.ArgumentParser:
    """``--key-file``: the operator's patch key (also NGGUARD_PATCH_KEY); with it, unsigned or
    wrongly signed patches are refused."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--key-file", default=None,
                   help="file holding the patch signing key (default: $NGGUARD_PATCH_KEY if set); with a key, "
                        "a patch without a valid patch.sig is refused")
    return p


def common() -> argparse.ArgumentParser:
    """Options accepted after any subcommand too (``ngguard eval ... --debug``)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks and debug logs")
    return p


def out_folder(p: argparse.ArgumentParser, what: str, *, overwrite: str = "replace --out if it exists",
               required: bool = True, default: Path | None = None) -> None:
    """``--out`` (the folder a command writes, ``what``) and ``--overwrite``."""
    p.add_argument("--out", type=Path, required=required, default=default, help=what)
    p.add_argument("--overwrite", action="store_true", help=overwrite)


def command_group(sub: Subparsers, name: str, help: str, commands: Sequence[str]) -> Subparsers:
    """``ngguard NAME {commands}``: a subcommand with required subcommands of its own (the chosen one
    in ``args.<name>_command``)."""
    p = sub.add_parser(name, help=help)
    return p.add_subparsers(dest=f"{name}_command", metavar="{" + ",".join(commands) + "}", required=True)


def lazy(module: str, handler: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports ``module`` only when its subcommand runs, then calls ``module.handler``."""
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), handler)(args)

    run.__name__ = handler
    return run


def judge_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", default="rules", metavar="SPEC",
                   help="refusal judge: rules (default), classifier:PATH, generative:PATH (with a template, so "
                        "usually a spec file), or a .yaml/.json spec file like a recipe's judge: value")


def resolve_model(model: str) -> Path:
    """A model folder that exists; "organism" = the bundled checkpoint."""
    if model == "organism":
        return Path(ngguard.organism.checkpoint_path())  # looked up at call time (tests point it elsewhere)
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder")
    return path


def read_json(path: Path, what: str = "JSON file") -> object:
    """A JSON file (a regular file within ``Limits.max_data_bytes``) parsed, or one-line errors."""
    try:
        return json.loads(read_text_file(path, DEFAULT_LIMITS.max_data_bytes, what=what))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
