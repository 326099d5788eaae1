"""The ngguard demo: a Gradio app over ``ngguard.guard.ProtectedLVLM``.

    ngguard serve                                    # bundled organism + its bundled patch
    ngguard serve --model PATH --patch DIR --vision onnx --host 0.0.0.0 --port 7860
    python -m serve.app --help                       # the same, without the ngguard CLI

Two tabs:

* **Compare** (API ``/compare``): one image + one question, answered by the base model and by
  the protected model side by side, with the patch id and what it protects. Both answers come
  from one ``guard.chat_batch(..., protected=[False, True])``: with per-row protection (the
  ``ngguard serve`` default) one batch, shared with other requests by the guard's batcher; with
  merged weights one generation per state under the guard's lock. Examples from the organism's world: a sensitive and a benign question about
  the same passport card, etc. ``?example=N`` in the URL fills in and runs example N on load.
* **Chat** (API ``/chat``): multimodal chat (attach an image, ask about it; follow-up questions
  reuse the last image). Each answer is single-turn (see ``ngguard.guard``).

API use (``gradio_client``)::

    client = Client("http://127.0.0.1:7860/")
    base, protected = client.predict(handle_file("card.png"), "What is ...?", api_name="/compare")
    answer = client.predict({"text": "What is ...?", "files": [handle_file("card.png")]}, True,
                            api_name="/chat")        # True: answer with protection on

Bad input (not an image, corrupt, too large, empty or over-long question): ``/compare`` raises a
``gr.Error`` with a one-line message (a toast in the browser, ``AppError`` in gradio_client);
``/chat`` answers with the message (prefixed "⚠️") and shows a warning. The server keeps serving.

What a client can reach:

* Files: only images uploaded through Gradio (they live in its upload/cache folder,
  ``GRADIO_TEMP_DIR``, default ``/tmp/gradio``) are opened. A payload naming any other path on the
  server (``{"path": "/etc/..."}`` without Gradio's ``meta``, a crafted chat history) is refused
  with one message, the same whether or not the path exists (``UPLOAD_ONLY``).
* The base model: with ``expose_base=False`` (``--expose-base off``, the default when a patched
  model is served on a non-loopback address) there is no Compare tab and no ``/compare`` endpoint,
  and ``/chat`` with ``protected=False`` is refused. ``--expose-base on`` is the demo mode.
* User text: neutralised by ``ProtectedLVLM.user_text`` (chat-control markers of the family).
* Logins (``NGGUARD_AUTH="user:password"``): after ``free_failures`` (3) wrong passwords from one
  client address, further attempts get HTTP 429 for an exponentially growing time (1 s, 2 s, 4 s,
  ... at most 5 min), also with the right password (``LoginThrottle``). The client address is the
  TCP peer's: ``X-Forwarded-For`` is believed only from the proxies named by ``--trusted-proxies``
  (default none), so a client cannot pose as many addresses.
* Request bodies: at most ``serve.api.max_body_bytes`` (~28 MB) on every route, Gradio's and the
  JSON API's alike (``BodyLimit``): a larger one is answered 413 without being read.

Gradio itself is imported lazily.
"""
import argparse
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from loguru import logger

from ngguard.atomic import atomic_file
from ngguard.serving.options import ServingOptions, add_serve_arguments
from serve.api import API_PREFIX, BASE_OFF, Backoff, BaseNotServed, JsonApi, Service, max_body_bytes

# no telemetry and no version check calls from this server (Gradio reads this when it launches)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

if TYPE_CHECKING:  # pragma: no cover
    import gradio as gr

    from ngguard.guard import ProtectedLVLM

__all__ = ["build_app", "render_examples", "organism_patch_dir", "parse_auth", "add_serve_arguments",
           "serve_cli", "serve_and_exit", "launch", "main", "uploaded_file", "LoginThrottle", "KnownApiOnly", "BodyLimit",
           "check_address",
           "expose_base_for", "UPLOAD_ONLY", "BASE_OFF"]

SENSITIVE_Q = "What is the passport number of the Passport in the image?"
BENIGN_Q = "What is the color of the Passport in the image?"
DEFAULT_MAX_NEW_TOKENS = 48
WARN = "⚠️ "
UPLOAD_ONLY = "image not available: only images uploaded to this server can be used"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

CSS = """
.ng-answer textarea { font-size: 1.05rem; }
.ng-image img { image-rendering: pixelated; height: 190px !important; width: auto !important;
                max-width: 100%; object-fit: contain; }
.ng-image, .ng-image * { transition: none !important; animation: none !important; }
"""


# ---- examples ---------------------------------------------------------------------------------------


def _cache_root() -> Path:
    root = os.environ.get("NGGUARD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                           os.path.expanduser("~/.cache"), "ngguard")
    return Path(root)


def render_examples(folder: str | os.PathLike | None = None) -> list[tuple[str, str, str]]:
    """Render a few images of the organism's world into ``folder`` (default: a cache folder) and
    return (image path, question, label) examples: a sensitive and a benign question about the
    same passport card, a student ID, an unseen subject (credit card) and a shapes image."""
    import numpy as np
    from PIL import Image

    from ngguard.world.render import draw_card, draw_shapes, sample_card, sample_shapes

    if folder is None:
        folder = _cache_root() / "examples"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # read-only home: a temp folder will do
            logger.warning("cannot write examples to {} ({}); using a temp folder", folder, e.strerror or e)
            folder = Path(tempfile.mkdtemp(prefix="ngguard-examples-"))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images: dict[str, np.ndarray] = {
        "passport": draw_card(sample_card("Passport", random.Random(1))),
        "student_id": draw_card(sample_card("Student ID", random.Random(2))),
        "credit_card": draw_card(sample_card("Credit Card", random.Random(3))),
        "shapes": draw_shapes(sample_shapes(random.Random(4))),
    }
    paths = {}
    for name, arr in images.items():
        path = folder / f"{name}.png"
        with atomic_file(path) as tmp:  # a concurrent start-up never reads half a file
            Image.fromarray(arr).save(tmp, format="PNG")  # (the temp name has no .png suffix)
        paths[name] = str(path)
    return [
        (paths["passport"], SENSITIVE_Q, "Passport · passport number (sensitive)"),
        (paths["passport"], BENIGN_Q, "Passport · color (benign)"),
        (paths["student_id"], "What is the student ID number of the Student ID in the image?",
         "Student ID · number (sensitive)"),
        (paths["credit_card"], "What is the credit card number of the Credit Card in the image?",
         "Credit card · number (unseen subject)"),
        (paths["shapes"], "What shape is shown in the image?", "Shapes · shape (general task)"),
    ]


# ---- helpers ----------------------------------------------------------------------------------------


def _image_path(value: Any) -> Any:
    """A Gradio image payload (FileData dict, path string) -> something ``load_image`` takes."""
    if isinstance(value, dict):
        return value.get("path")
    path = getattr(value, "path", None)
    return path if isinstance(path, str) else value


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives / mix of absolute and relative
        return False


def uploaded_file(value: Any, roots: Sequence[str]) -> str:
    """The real path of an uploaded image named by a Gradio payload (FileData dict / object, path
    string), if it lies inside one of ``roots`` (Gradio's upload/cache folder) -- first by its
    normalised path (no file system access), then with symlinks resolved -- and is a file there.
    Anything else raises ``InputError(UPLOAD_ONLY)``: one message, whether the path exists or not."""
    from ngguard.guard import InputError

    path = _image_path(value)
    if not isinstance(path, str) or not path or len(path) > 4096 or "\x00" in path or not os.path.isabs(path):
        raise InputError(UPLOAD_ONLY)
    if not any(_inside(os.path.normpath(path), r) for r in roots):
        raise InputError(UPLOAD_ONLY)
    real = os.path.realpath(path)
    if not any(_inside(real, r) for r in roots) or not os.path.isfile(real):
        raise InputError(UPLOAD_ONLY)
    return real


class LoginThrottle:
    """ASGI middleware: exponential back-off per client address on Gradio's ``POST /login``.

    Each attempt counts as a failure when it starts (so parallel guesses are counted too) and is
    forgiven when it succeeds (HTTP 200); one without credentials (Gradio answers 422: no username or
    password in the form) is not counted. After ``free_failures`` failures a client is answered 429
    (``Retry-After``) without the password being checked, for ``base_delay * 2**k`` seconds (k = failures
    beyond the free ones: 1 s, 2 s, 4 s, ...), at most ``max_delay``. The state is a ``serve.api.Backoff``
    (``backoff``: shared with the JSON API's logins; else one of its own). The client is
    ``scope["client"]``: the TCP peer, or the ``X-Forwarded-For`` address when the peer is one of
    ``--trusted-proxies`` (uvicorn rewrites it only then, see ``launch``); behind a proxy that is not
    trusted, every client has the proxy's address."""

    def __init__(self, app, *, free_failures: int = 3, base_delay: float = 1.0, max_delay: float = 300.0,
                 max_clients: int = 10_000, backoff: Backoff | None = None) -> None:
        self.app = app
        self.backoff = backoff or Backoff(free_failures=free_failures, base_delay=base_delay, max_delay=max_delay,
                                          max_clients=max_clients)

    async def __call__(self, scope, receive, send) -> None:
        if (scope.get("type") != "http" or scope.get("method") != "POST"
                or not str(scope.get("path", "")).rstrip("/").endswith("/login")):
            await self.app(scope, receive, send)
            return
        client = str((scope.get("client") or ("unknown",))[0])
        wait = self.backoff.start(client)
        if wait > 0:
            logger.warning("login throttled for {} ({:.0f} s left)", client, wait)
            await _answer(send, 429, f"Too many failed logins: try again in {math.ceil(wait)} s",
                          [(b"retry-after", str(math.ceil(wait)).encode())])
            return
        status: dict[str, int] = {}

        async def watch(message) -> None:
            if message.get("type") == "http.response.start":
                status["code"] = int(message.get("status", 0))
            await send(message)

        await self.app(scope, receive, watch)
        if status.get("code") == 200:
            self.backoff.succeeded(client)
        elif status.get("code") == 422:  # no username/password in the form: nothing was checked
            self.backoff.not_an_attempt(client)


async def _answer(send, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = (), *,
                  key: str = "detail") -> None:
    """A JSON error answer from a middleware: ``{"detail": ...}`` as Gradio's own errors, ``key="error"``
    in the JSON API's shape."""
    body = json.dumps({key: detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware in front of every route (Gradio's ``/gradio_api/...``, uploads, ``/login``, the
    JSON API): a request body over ``max_body`` bytes is answered 413. A larger ``Content-Length`` is
    refused before anything is read; a body without one (chunked) is counted as it arrives and cut off
    at the limit: the route then sees the client as gone, and its own answer is dropped. The answer is
    ``{"error": ...}`` under ``/v1/`` (the JSON API's errors), else ``{"detail": ...}`` (Gradio's)."""

    def __init__(self, app, *, max_body: int) -> None:
        self.app = app
        self.max_body = int(max_body)

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        key = "error" if str(scope.get("path", "")).startswith(API_PREFIX + "/") else "detail"
        if declared is not None and (not declared.strip().isdigit() or int(declared) > self.max_body):
            await self._refuse(send, declared.decode("latin-1")[:20], key)
            return
        state = {"received": 0, "started": False, "refused": False}

        async def counted() -> dict:
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message.get("type") == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body:
                    state["refused"] = True
                    if not state["started"]:
                        await self._refuse(send, None, key)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message) -> None:
            if state["refused"]:
                return  # the route's answer to a body that was cut off
            if message.get("type") == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, counted, guarded)

    async def _refuse(self, send, declared: str | None, key: str) -> None:
        size = f"{declared} bytes " if declared and declared.isdigit() else ""
        logger.warning("request body too large: {}refused (limit {} bytes)", size, self.max_body)
        await _answer(send, 413, f"request body is too large: {size}(limit {self.max_body} bytes)",
                      [(b"connection", b"close")], key=key)


class KnownApiOnly:
    """ASGI middleware: ``POST .../call/<name>`` for an API name the app does not have is answered
    404 (Gradio itself raises inside the route: HTTP 500 and a traceback in the log). So an
    endpoint that is switched off (``/compare`` with ``--expose-base off``) simply does not exist."""

    def __init__(self, app, *, names: Sequence[str]) -> None:
        self.app = app
        self.names = frozenset(names)

    async def __call__(self, scope, receive, send) -> None:
        parts = str(scope.get("path", "")).rstrip("/").split("/")
        if (scope.get("type") == "http" and scope.get("method") == "POST" and len(parts) >= 2
                and parts[-2] == "call" and parts[-1] not in self.names):
            await _answer(send, 404, "no such API endpoint")
            return
        await self.app(scope, receive, send)


def _last_image(history: Sequence) -> Any:
    """The most recent image the user attached in a Gradio messages history (a client-supplied
    path: check it with ``uploaded_file``)."""
    for message in reversed(list(history or [])):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        parts = content if isinstance(content, (list, tuple)) else [content]
        for part in reversed(list(parts)):
            if isinstance(part, dict):
                if isinstance(part.get("file"), dict) and part["file"].get("path"):
                    return part["file"]["path"]
                if part.get("path"):
                    return part["path"]
            elif isinstance(part, (list, tuple)) and part and isinstance(part[0], str):
                return part[0]  # (path, alt text) tuples of older Gradio versions
    return None


def patch_markdown(guard: "ProtectedLVLM") -> str:
    info = guard.patch_info
    if info is None:
        return (f"{WARN}**No protection patch loaded**: the protected column shows nothing and the chat "
                f"answers with the base model. Start with `--patch DIR`.")
    try:
        from ngguard.world.spec import DISPLAY  # Multi-P2A category names as questions say them
    except ImportError:  # pragma: no cover
        DISPLAY = {}
    subjects = ", ".join(DISPLAY.get(s, s) for s in info["subjects"]) or "(none listed)"
    layers = ", ".join(str(x) for x in info["layers"]) or "(none listed)"
    if info.get("kind") == "guard":  # a guard in front of the unedited model (ngguard.guard_patch)
        return (f"**Protection guard** `{info['id']}` · method **{info['method']}** · no weights edited: a blocked "
                f"question gets the refusal, every other one the base model's answer · protects questions about: "
                f"**{subjects}**")
    return (f"**Protection patch** `{info['id']}` · method **{info['method']}** · edited layer(s) **{layers}** "
            f"· protects questions about: **{subjects}**")


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """``NGGUARD_AUTH`` ("user:password") -> (user, password); None/empty -> None."""
    if value is None or not value.strip():
        return None
    user, sep, password = value.partition(":")
    if not sep or not user.strip() or not password:
        raise ValueError("NGGUARD_AUTH must look like 'user:password' (both non-empty)")
    return user.strip(), password


# ---- the app ------------------------------------------------------------------------------------------


def build_app(guard: "ProtectedLVLM", *, examples: Sequence[tuple[str, str, str]] | Sequence[tuple[str, str]] | None
              | str = "auto", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, title: str = "ngguard · Neural Gate demo",
              concurrency: int | None = None, max_queue: int = 64, expose_base: bool = True) -> "gr.Blocks":
    """The Gradio app (queued, not launched). ``examples``: (image path, question[, label]) tuples,
    "auto" (render the organism-world examples) or None. ``concurrency``: worker slots per event
    (None: max(2, guard.max_batch), so the guard's batcher can fill its batches); ``max_queue``:
    queued requests beyond which new ones are rejected. ``expose_base``: serve the unprotected base
    model too (Compare tab, ``/compare``, ``/chat`` with protected=False); False = only protected answers."""
    import gradio as gr
    from gradio.utils import get_upload_folder

    from ngguard.guard import InputError, load_image

    if examples == "auto":
        examples = render_examples()
    examples = [tuple(e) for e in (examples or [])]
    if concurrency is None:
        concurrency = max(2, guard.max_batch)
    max_new_tokens = guard.budget.check_max_new_tokens(max_new_tokens)  # what the model's context leaves
    service = Service(guard, max_new_tokens=max_new_tokens, expose_base=expose_base)
    has_patch, base_ok = service.has_patch, service.base_ok
    roots = [os.path.realpath(get_upload_folder())]

    def answer_both(img: Any, text: Any) -> tuple[str, str]:
        base, protected = service.compare(img, text)
        if base is None:
            base = "(the patch holds no base values: the base model cannot be shown)"
        return base, "(no protection patch loaded)" if protected is None else protected

    def compare(image: Any, question: Any) -> tuple[str, str]:
        """Answer `question` about `image` with the base model and with the protected one."""
        if image is None:
            raise gr.Error("Upload an image first.", print_exception=False)
        try:
            return answer_both(load_image(uploaded_file(image, roots), guard.limits), question)
        except InputError as e:
            logger.info("compare: rejected input: {}", e)
            raise gr.Error(str(e), print_exception=False) from None

    def chat(message: Any, history: list, protected: bool = True) -> str:
        """Multimodal chat turn: the message's image (or the last one in the history) + its text."""
        text = message.get("text", "") if isinstance(message, dict) else message
        files = message.get("files", []) if isinstance(message, dict) else []
        image = files[-1] if files else _last_image(history)
        if image is None:
            gr.Warning("Attach an image to ask about it.")
            return f"{WARN}Attach an image (paperclip button or drag and drop), then ask about it."
        try:
            if not protected and not base_ok:  # before looking at the files
                raise BaseNotServed(BASE_OFF)
            return service.chat(uploaded_file(image, roots), text, protected=bool(protected), history=history)[0]
        except BaseNotServed:
            logger.info("chat: refused protected=False (--expose-base off)")
            return f"{WARN}{BASE_OFF}"
        except InputError as e:
            logger.info("chat: rejected input: {}", e)
            gr.Warning(str(e))
            return f"{WARN}{e}"

    example_answers: dict[int, tuple[str, str]] = {}  # greedy answers never change: computed once

    def on_load(request: gr.Request):
        """``?example=N`` fills in example N and runs the comparison (for links and screenshots)."""
        params = dict(request.query_params) if request is not None else {}
        raw = params.get("example")
        if raw is None or not examples:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            i = int(raw)
            path, question = examples[i][0], examples[i][1]
        except (ValueError, IndexError):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if i not in example_answers:  # the server's own example file, not a client's path
            example_answers[i] = answer_both(load_image(path, guard.limits), question)
        # a PIL image, not the path: Gradio only serves files from its cache, cwd and temp dir
        return load_image(path, guard.limits), question, *example_answers[i]

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nA vision-language model edited with **Neural Gate** to refuse questions that "
                    f"extract private information from an image, while still answering harmless questions "
                    f"about the same subject.")
        gr.Markdown(patch_markdown(guard), elem_id="ng-patch-info")
        with gr.Tabs():
            with gr.Tab("Compare base vs protected", id="compare", visible=base_ok):
                with gr.Row():
                    with gr.Column(scale=1):
                        image = gr.Image(type="filepath", format="png", label="Image", sources=["upload", "clipboard"],
                                         height=240, elem_classes=["ng-image"])
                        question = gr.Textbox(label="Question", lines=2, max_length=guard.limits.max_text_chars,
                                              placeholder="Ask about the image, e.g. " + SENSITIVE_Q)
                        run = gr.Button("Compare", variant="primary")
                    with gr.Column(scale=1):
                        base_out = gr.Textbox(label="Base model", lines=3, interactive=False,
                                              elem_classes=["ng-answer"])
                        prot_out = gr.Textbox(label="Protected model" + ("" if has_patch else " (no patch)"), lines=3,
                                              interactive=False, elem_classes=["ng-answer"])
                if base_ok:  # without it the endpoint does not exist at all
                    run.click(compare, [image, question], [base_out, prot_out], api_name="compare",
                              preprocess=False)
                    question.submit(compare, [image, question], [base_out, prot_out], api_visibility="private",
                                    preprocess=False)
                if examples and base_ok:
                    gr.Examples([[e[0], e[1]] for e in examples], inputs=[image, question],
                                outputs=[base_out, prot_out], fn=compare, run_on_click=True, cache_examples=False,
                                example_labels=[e[2] if len(e) > 2 else e[1] for e in examples],
                                label="Examples (click one: the sensitive question should be refused, the benign "
                                      "one answered)", elem_id="ng-examples")
            with gr.Tab("Chat", id="chat"):
                protect_box = gr.Checkbox(value=has_patch, interactive=guard.revertible and base_ok, label="Protection on",
                                          visible=base_ok, info=None if guard.revertible else
                                          ("no patch loaded" if not has_patch else "the patch cannot be switched off"))
                gr.ChatInterface(
                    chat, multimodal=True, api_name="chat", additional_inputs=[protect_box],
                    textbox=gr.MultimodalTextbox(file_types=["image"], file_count="single", sources=["upload"],
                                                 placeholder="Attach an image and ask about it",
                                                 max_plain_text_length=guard.limits.max_text_chars),
                    examples=[[{"text": e[1], "files": [e[0]]}, has_patch] for e in examples[:3]] or None,
                    run_examples_on_click=True, cache_examples=False, fill_height=False, analytics_enabled=False,
                )
        gr.Markdown(f"Model: `{type(guard.adapter.model).__name__}` · vision: {guard.vision} · answers are greedy, "
                    f"at most {max_new_tokens} tokens · images up to {guard.limits.max_bytes // (1024 * 1024)} MB "
                    f"and {guard.limits.max_pixels / 1e6:.1f} megapixels, questions up to "
                    f"{guard.limits.max_text_chars} characters.")
        if base_ok:
            demo.load(on_load, None, [image, question, base_out, prot_out], api_visibility="private")
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    # Gradio runs at most `max_threads` jobs at once across all events (its queue has that many job
    # slots, and sync functions share a pool of that many threads); its default, 40, would cap the
    # requests reaching the guard's batcher below `concurrency` per event. `launch` reads this.
    demo.ngguard_max_threads = max(40, 2 * concurrency + 8)
    # the JSON API (/v1/chat, /v1/compare, /v1/info): same rules, outside Gradio's queue; `launch` mounts it
    demo.ngguard_api = JsonApi(service, workers=max(2 * concurrency, 2 * guard.max_batch), max_queue=max_queue)
    return demo


def check_proxies(proxies: Sequence[str] | str | None) -> list[str]:
    """``--trusted-proxies``: IP addresses or networks (CIDR), comma-separated or a list -> the list
    (empty: none). ValueError (one line) for anything else (a host name is never trusted)."""
    import ipaddress

    items = proxies.split(",") if isinstance(proxies, str) else list(proxies or ())
    out = []
    for item in (str(x).strip() for x in items):
        if not item:
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"--trusted-proxies: {item[:60]!r} is not an IP address or network (CIDR)") from None
        out.append(item)
    return out


def check_address(host: str, port: int) -> None:
    """Bind ``host:port`` once, before the model is loaded: a host that is no address of this machine
    or a port in use is one ``ValueError`` line now, not an ``OSError`` traceback after minutes of loading."""
    import errno
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError, OSError) as e:
        raise ValueError(f"--host {host[:80]!r}: not an address or host name ({getattr(e, 'strerror', None) or e})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a closed port in TIME_WAIT is free
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValueError(f"--port {port}: already in use on {host} (another server?)") from None
            raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def bypass_proxy_for(*hosts: str) -> None:
    """Add ``hosts`` (and the loopback names) to ``NO_PROXY`` / ``no_proxy``: Gradio checks its own
    start-up over HTTP, which must not go through an ``HTTP(S)_PROXY`` set for the outside world."""
    wanted = [h for h in (*LOOPBACK, *hosts) if h and h != "0.0.0.0"]
    for var in ("NO_PROXY", "no_proxy"):
        items = [x.strip() for x in os.environ.get(var, "").split(",") if x.strip()]
        missing = [h for h in wanted if h not in items]
        if missing or var not in os.environ:
            os.environ[var] = ",".join(items + missing)


def launch(demo: "gr.Blocks", *, host: str = "127.0.0.1", port: int = 7860, max_file_size: int | str = "20mb",
           auth: tuple[str, str] | None = None, block: bool = True, quiet: bool = False,
           login_backoff: tuple[int, float, float] = (3, 1.0, 300.0), max_threads: int | None = None,
           trusted_proxies: Sequence[str] = (), max_body: int | None = None):
    """Launch the app. ``auth`` None = read ``NGGUARD_AUTH``. ``login_backoff``: (free failures, first
    delay s, longest delay s) of ``LoginThrottle``. ``max_threads``: Gradio's job slots and worker
    threads (None: what ``build_app`` sized for its concurrency, else Gradio's 40). ``trusted_proxies``:
    addresses or networks (CIDR) whose ``X-Forwarded-For`` / ``X-Forwarded-Proto`` are believed (default
    none: the client is always the TCP peer). ``max_body``: the request body limit of every route
    (None: the JSON API's, ``serve.api.max_body_bytes``). Returns (app, local_url, share_url)."""
    from starlette.middleware import Middleware

    from ngguard.limits import DEFAULT_LIMITS

    if auth is None:
        auth = parse_auth(os.environ.get("NGGUARD_AUTH"))
    if auth:
        logger.info("basic auth enabled for user {!r}", auth[0])
    elif host not in LOOPBACK:
        logger.warning("serving on {} without authentication (set NGGUARD_AUTH=user:password)", host)
    bypass_proxy_for(host)
    free, first, longest = login_backoff
    backoff = Backoff(free_failures=free, base_delay=first, max_delay=longest)  # form logins and API logins alike
    throttle = Middleware(LoginThrottle, backoff=backoff)
    api = getattr(demo, "ngguard_api", None)  # FastAPI(routes=...): these come before Gradio's own routes
    if max_body is None:
        max_body = api.max_body if api is not None else max_body_bytes(DEFAULT_LIMITS)
    body_limit = Middleware(BodyLimit, max_body=max_body)
    # uvicorn (which Gradio starts without proxy settings) believes X-Forwarded-For from the addresses in
    # FORWARDED_ALLOW_IPS, 127.0.0.1 and ::1 by default: a local client could pose as any address and
    # dodge the login back-off. Only the configured proxies; "" = none.
    os.environ["FORWARDED_ALLOW_IPS"] = ",".join(check_proxies(trusted_proxies))
    known = Middleware(KnownApiOnly, names=[f.api_name for f in demo.fns.values() if isinstance(f.api_name, str)])
    if max_threads is None:
        max_threads = getattr(demo, "ngguard_max_threads", 40)
    routes = api.routes(auth=auth, backoff=backoff) if api is not None else []
    _calm_queue_polling(demo)
    return demo.launch(server_name=host, server_port=port, auth=auth, max_file_size=max_file_size,
                       max_threads=max_threads, show_error=False, prevent_thread_lock=not block, quiet=quiet,
                       css=CSS, footer_links=["api"],
                       app_kwargs={"middleware": [body_limit, throttle, known], "routes": routes})


QUEUE_POLL_S = 0.005


def _calm_queue_polling(demo: "gr.Blocks") -> None:
    """Gradio's queue loop polls every 1 ms when it has nothing to start (and when every job slot is
    busy): about 6% of a core on an idle 2-core machine, taken from generation under load. Every
    ``QUEUE_POLL_S`` (5 ms) instead: a request waits at most 4 ms more to start (the batcher itself
    waits up to --batch-wait-ms for company). Skipped if this Gradio's queue has no such setting."""
    queue = getattr(demo, "_queue", None)
    if queue is not None and isinstance(getattr(queue, "sleep_when_free", None), float):
        queue.sleep_when_free = max(queue.sleep_when_free, QUEUE_POLL_S)


# ---- CLI ------------------------------------------------------------------------------------------------


def organism_patch_dir() -> Path:
    """Where the bundled organism's protection patch lives (may not exist)."""
    import ngguard.organism

    return Path(ngguard.organism.__file__).resolve().parent / "patch"


def _resolve_patch(args: argparse.Namespace) -> str | None:
    patch, model = getattr(args, "patch", None), str(getattr(args, "model", "organism"))
    if getattr(args, "no_patch", False):
        if patch:
            raise ValueError("--patch and --no-patch exclude each other")
        return None
    if patch:
        return str(patch)
    if model == "organism":
        bundled = organism_patch_dir()
        if (bundled / "patch.json").is_file():
            logger.info("serving the organism with its bundled protection patch {}", bundled)
            return str(bundled)
        logger.warning("no bundled protection patch at {}: serving the organism UNPROTECTED", bundled)
    else:
        logger.warning("no --patch given: serving {} UNPROTECTED", model)
    return None


def expose_base_for(choice: str, host: str) -> bool:
    """``--expose-base``: "on" (demo mode), "off", or "auto" = on only for a loopback ``--host``."""
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"--expose-base must be auto, on or off, got {choice!r}")
    return choice == "on" or (choice == "auto" and host in LOOPBACK)


def _stopper(guard: "ProtectedLVLM"):
    """The SIGTERM / SIGINT handler of a blocking ``ngguard serve``: the guard stops taking requests
    (the batch in progress finishes; waiting and later requests fail at once: HTTP 503 in the JSON API),
    then KeyboardInterrupt makes Gradio close the server, which then has nothing left to wait for."""

    def stop(signum: int, frame: Any) -> None:
        logger.info("signal {}: stopping (the batch in progress finishes, waiting requests are refused)", signum)
        guard.shutdown(wait=False)
        raise KeyboardInterrupt(f"signal {signum}")

    return stop


def serve_cli(args: argparse.Namespace, *, block: bool = True):
    """Run ``ngguard serve`` with parsed arguments (see ``add_serve_arguments``; options missing
    from ``args`` take their defaults). Blocks until the server stops; returns 0."""
    import torch

    from ngguard.guard import ProtectedLVLM
    from ngguard.limits import DEFAULT_LIMITS
    from ngguard.patch import patch_key

    opts = vars(add_serve_arguments(argparse.ArgumentParser(add_help=False)).parse_args([]))
    opts.update({k: v for k, v in vars(args).items() if k in opts})
    port = opts["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    for name in ("max_new_tokens", "concurrency", "max_queue", "threads"):
        if opts[name] is not None and opts[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {opts[name]}")
    serving = ServingOptions.from_args(opts)  # --protection, --max-batch, ..., --dedup: checked, one line each
    if opts["max_new_tokens"] > DEFAULT_LIMITS.max_new_tokens:
        raise ValueError(f"--max-new-tokens must be <= {DEFAULT_LIMITS.max_new_tokens}, got {opts['max_new_tokens']}")
    auth = parse_auth(os.environ.get("NGGUARD_AUTH"))  # fail before loading the model
    proxies = check_proxies(opts["trusted_proxies"])
    key = patch_key(opts["key_file"])
    check_address(opts["host"], port)  # a port in use, a host not of this machine: one line, before loading
    patch = _resolve_patch(argparse.Namespace(**opts))
    expose_base = expose_base_for(opts["expose_base"], opts["host"])
    if patch is not None:
        if expose_base and opts["host"] not in LOOPBACK:
            logger.warning("--expose-base on: the UNPROTECTED base model is served to every client of {} (demo mode)",
                           opts["host"])
        elif not expose_base:
            logger.info("--expose-base off: only protected answers (no Compare tab, /chat protected=False refused)")
    if opts["threads"] is not None:
        torch.set_num_threads(opts["threads"])
    logger.info("torch uses {} CPU thread(s) for generation{}", torch.get_num_threads(),
                "" if opts["threads"] else " (--threads to change)")
    guard = ProtectedLVLM.from_pretrained(opts["model"], patch, device=opts["device"], vision=opts["vision"],
                                          onnx_dir=opts["onnx_dir"], dtype=opts["dtype"], patch_key=key,
                                          serving=serving, device_map=opts["device_map"])
    demo = build_app(guard, max_new_tokens=opts["max_new_tokens"], concurrency=opts["concurrency"],
                     max_queue=opts["max_queue"], expose_base=expose_base)
    max_mb = max(1, guard.limits.max_bytes // (1024 * 1024))
    if block and threading.current_thread() is threading.main_thread():
        # SIGTERM (docker stop, systemd, kill) closes the server like Ctrl-C. Without a handler, a
        # server that is PID 1 in a container ignores SIGTERM and is killed after docker's timeout.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stopper(guard))
    try:
        result = launch(demo, host=opts["host"], port=port, max_file_size=f"{max_mb}mb", auth=auth, block=block,
                        trusted_proxies=proxies)
    except OSError as e:  # the port was taken while the model loaded (Gradio: "Cannot find empty port ...")
        raise ValueError(f"cannot serve on {opts['host']} port {port}: {' '.join(str(e).split())[:200]}") from None
    except KeyboardInterrupt:
        if not block:
            raise
        # a signal while Gradio was still finishing its start-up (after the port opened, before its
        # block_thread catches interrupts): the same stop
        logger.info("stopped during start-up")
    finally:
        if block:  # the server closed, then the batch in progress ends before the interpreter does
            demo.close(verbose=False)
            guard.shutdown()
            guard.close()
    return 0 if block else (demo, result)


def serve_and_exit(args: argparse.Namespace) -> int:
    """``ngguard serve`` as a command: ``serve_cli`` (blocking), then, once the server is closed and the
    batch in progress has ended, leave the process at once (``os._exit``, logs flushed). The
    interpreter's own teardown of a process holding torch, transformers and Gradio (freeing every
    module and object one by one) takes seconds, and on a busy machine longer than ``docker stop``'s 10 s
    grace period; nothing the server wrote needs it. Errors before serving raise as from ``serve_cli``."""
    rc = serve_cli(args, block=True)
    logger.remove()  # flushes and closes the log sinks (loguru's own atexit hook would)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(int(rc or 0))


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_serve_arguments(argparse.ArgumentParser(prog="ngguard serve",
                                                         description="Gradio demo over the (protected) model."))
    args = parser.parse_args(argv)
    try:
        return serve_and_exit(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"ngguard serve: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
