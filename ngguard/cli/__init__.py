"""The ``ngguard`` command line: one module per command group, each only parsing arguments and
calling library functions (imported lazily inside each handler, so ``ngguard --help`` stays fast and
light). Nothing in the library imports this package.

    eval.py  judge.py  world.py  organism.py  edit.py  patch.py (+ export-lora)  convert.py
    export_onnx.py  serve.py        the commands; common.py: what they share

Adding a subcommand: a module here with ``add(subparsers)`` that creates its parser and sets
``func=<handler>`` (``handler(args) -> int | None``), registered in ``SUBCOMMANDS`` below.

Errors: a ``ValueError`` / ``FileNotFoundError`` (or subclass, e.g. ``DataError``) raised by the
library is printed as ``ngguard: error: <message>`` on stderr with exit status 2 and no traceback,
unless ``--debug`` is given.
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable, Sequence

from loguru import logger

from ngguard import __version__

from . import convert, edit, eval, export_onnx, judge, organism, patch, serve, world
from .common import Subparsers

# Exceptions that mean "bad input": one line on stderr, exit 2. Extend if a module needs to.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
EXIT_USER_ERROR = 2

# subcommand name -> function adding its parser (which sets func=handler)
SUBCOMMANDS: dict[str, Callable[[Subparsers], None]] = {
    "eval": eval.add,
    "judge": judge.add,
    "world": world.add,
    "organism": organism.add,
    "edit": edit.add,
    "patch": patch.add,
    "convert": convert.add,
    "export-onnx": export_onnx.add,
    "serve": serve.add,
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
