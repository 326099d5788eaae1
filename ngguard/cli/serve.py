"""``ngguard serve``: the Gradio app (``serve/app.py``; its options: ``ngguard.serving.options``)."""
from __future__ import annotations

from ngguard.device_maps import AUTO_MAPS as DEVICE_MAPS  # the one list, under its old name here
from ngguard.serving.options import add_serve_arguments

from .common import Subparsers, common, lazy

__all__ = ["add", "add_serve_arguments", "DEVICE_MAPS"]


def add(sub: Subparsers) -> None:
    p = sub.add_parser("serve", parents=[common()], help="Gradio chat + base-vs-protected demo",
                       description="Serve a Gradio app (chat + side-by-side comparison of the base and the "
                                   "protected model). Without arguments: the bundled organism with its bundled "
                                   "patch. Basic auth: NGGUARD_AUTH=user:password.")
    add_serve_arguments(p)
    p.set_defaults(func=lazy("serve.app", "serve_and_exit"), own_shutdown=True)
