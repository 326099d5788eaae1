"""The JSON API of ``ngguard serve`` (``/v1/...``), and the rules it shares with the Gradio app.

Same process and port as the Gradio app, but outside Gradio's queue: a request is one HTTP call
(no upload step, no event stream, no queue worker), handed straight to the guard, whose batcher
merges it with whatever else is waiting::

    POST /v1/chat     {"image": "<base64 PNG/JPEG/WEBP/BMP/GIF>", "text": "...",
                       "protected": true, "max_new_tokens": 48}      -> {"answer": "...", "protected": true}
    POST /v1/compare  {"image": "...", "text": "...", "max_new_tokens": 48}
                                                                   -> {"base": "...", "protected": "..."}
    GET  /v1/info                                                  -> {"model", "patch", "expose_base", ...}

``image`` may also be a data URL (``data:image/png;base64,...``). ``protected`` defaults to true,
``max_new_tokens`` to the server's ``--max-new-tokens``, which is also its upper bound. Requests
must be ``Content-Type: application/json`` (so a browser on another site cannot post one without a
CORS preflight, which Gradio's CORS middleware refuses). Answers are exactly ``guard.chat``'s.

Errors are one line of JSON, ``{"error": "..."}``: 400 bad input (not JSON, a missing or unknown
field, a wrong type, bad base64, not an image, empty text, ...), 401 missing or wrong credentials,
403 the base model is not served here (``--expose-base off``), 404 unknown path, 405 wrong method,
413 over a size limit (request body, image bytes or pixels, text characters or tokens), 415 not
JSON, 429 too many failed logins (``Retry-After``), 503 too many requests in flight or the server
is shutting down, 500 anything else (logged with its traceback).

Auth: with ``NGGUARD_AUTH="user:password"`` every ``/v1`` call needs HTTP Basic credentials
(``Authorization: Basic base64(user:password)``). Failures share the per-address exponential
back-off of Gradio's login form (``Backoff``): after the free failures (3) a client is answered 429
without its password being checked. A call without an ``Authorization`` header (a health check) is
answered 401 and not counted. The address is the TCP peer's; ``X-Forwarded-For`` is believed only
from ``--trusted-proxies`` (``serve.app.launch``).

Request bodies: at most ``max_body_bytes(limits)`` on every route of the server, Gradio's included
(``serve.app.BodyLimit``; 413 here as there).

``Service`` holds what a client may ask of the guard: which state a request gets, whether the base
model is served (``expose_base``), the server's ``max_new_tokens``. The Gradio events
(``serve.app.build_app``) and this API both answer through it, so the two front ends cannot drift.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from loguru import logger

if TYPE_CHECKING:  # pragma: no cover
    from ngguard.guard import ProtectedLVLM

__all__ = ["Backoff", "BaseNotServed", "Service", "JsonApi", "BASE_OFF", "API_PREFIX", "max_body_bytes"]

BASE_OFF = "the unprotected model is not served here (--expose-base off): answers are always protected"
API_PREFIX = "/v1"
_FIELDS = {"chat": ("image", "text", "protected", "max_new_tokens"), "compare": ("image", "text", "max_new_tokens")}


def max_body_bytes(limits) -> int:
    """The largest request body the server reads, on any route: the base64 of the largest image
    (``limits.max_bytes``) + room for the text and the JSON around them (~28 MB by default; a
    multipart upload of the largest image fits too)."""
    return 4 * math.ceil(limits.max_bytes / 3) + 16 * limits.max_text_chars + 4096


class BaseNotServed(PermissionError):
    """A request for the unprotected base model on a server that does not expose it."""


class Backoff:
    """Exponential back-off per client address after failed logins.

    ``start(client)`` is called when an attempt begins: it returns the seconds the client must still
    wait (the attempt is then refused without checking anything and not counted), else counts the
    attempt as a failure and returns 0; ``succeeded(client)`` forgives all. ``free_failures`` failed
    attempts are checked freely; the one that reaches that count starts a wait of ``base_delay *
    2**k`` seconds (k = failures - free_failures: 1 s, 2 s, 4 s, ...), at most ``max_delay``: with 3
    free, the 4th attempt in a row is answered 429, and each attempt after a wait doubles it. At
    most ``max_clients`` addresses are remembered (the oldest dropped). Thread-safe."""

    def __init__(self, *, free_failures: int = 3, base_delay: float = 1.0, max_delay: float = 300.0,
                 max_clients: int = 10_000) -> None:
        self.free_failures, self.base_delay, self.max_delay = free_failures, base_delay, max_delay
        self.max_clients = max_clients
        self._state: dict[str, tuple[int, float]] = {}  # client -> (failures, blocked until, monotonic s)
        self._lock = threading.Lock()

    def start(self, client: str) -> float:
        now = time.monotonic()
        with self._lock:
            failures, until = self._state.pop(client, (0, 0.0))
            if until > now:
                self._state[client] = (failures, until)
                return until - now
            failures += 1  # counted when it starts (parallel guesses count too), forgiven on success
            if failures >= self.free_failures:
                until = now + min(self.max_delay, self.base_delay * 2 ** min(failures - self.free_failures, 64))
            self._state[client] = (failures, until)
            while len(self._state) > self.max_clients:
                self._state.pop(next(iter(self._state)))
            return 0.0

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._state.pop(client, None)

    def not_an_attempt(self, client: str) -> None:
        """Take back the count of an attempt that carried no credentials (nothing was checked); a wait
        it started is lifted when the failures fall below the free ones again."""
        with self._lock:
            failures, until = self._state.pop(client, (0, 0.0))
            if failures > 1:
                self._state[client] = (failures - 1, until if failures - 1 >= self.free_failures else 0.0)


@dataclass(frozen=True)
class Service:
    """What a client may ask of ``guard``, for every front end. ``max_new_tokens``: the server's
    answer length (default and upper bound); ``expose_base``: whether the unprotected base model is
    served (without a patch the base model is the only one, and always served)."""

    guard: "ProtectedLVLM"
    max_new_tokens: int = 48
    expose_base: bool = True

    @property
    def has_patch(self) -> bool:
        return self.guard.patch_info is not None

    @property
    def base_ok(self) -> bool:
        return self.expose_base or not self.has_patch

    def tokens(self, n: Any = None) -> int:
        """``max_new_tokens`` of a request: None = the server's, else an integer up to it."""
        from ngguard.limits import check_count

        return self.max_new_tokens if n is None else check_count(n, "max_new_tokens", self.max_new_tokens)

    def chat(self, image: Any, text: Any, *, protected: bool = True, history: Any = None,
             max_new_tokens: Any = None) -> tuple[str, bool]:
        """(answer, whether it is protected). ``protected=False`` on a server that does not expose
        the base model raises ``BaseNotServed``; with a patch that cannot be switched off the answer
        is protected whatever is asked; without a patch it is the base model's."""
        if not protected and self.has_patch and not self.base_ok:
            raise BaseNotServed(BASE_OFF)
        want = (bool(protected) or not self.guard.revertible) and self.has_patch
        n = self.tokens(max_new_tokens)
        return self.guard.chat(image, text, history=history, max_new_tokens=n, protected=want), want

    def compare(self, image: Any, text: Any, *, max_new_tokens: Any = None) -> tuple[str | None, str | None]:
        """(base answer, protected answer), None where that model is not there (no patch; a patch
        without base values). One ``chat_batch`` with a base and a protected row when both exist."""
        from ngguard.limits import load_image

        if not self.base_ok:
            raise BaseNotServed(BASE_OFF)
        guard, n = self.guard, self.tokens(max_new_tokens)
        img = load_image(image, guard.limits)
        text = guard.user_text(text if text is not None else "")
        if not self.has_patch:
            return guard.chat(img, text, max_new_tokens=n), None
        if not guard.revertible:
            return None, guard.chat(img, text, max_new_tokens=n, protected=True)
        base, protected = guard.chat_batch([img, img], [text, text], max_new_tokens=n, protected=[False, True])
        logger.info("compare: {!r} -> base {!r} | protected {!r}", text, base, protected)
        return base, protected

    def info(self) -> dict:
        """What a client may know of the server (no file system paths)."""
        guard, patch = self.guard, self.guard.patch_info
        limits = guard.limits
        return {"model": type(guard.adapter.model).__name__, "vision": guard.vision,
                "patch": None if patch is None else {k: patch[k] for k in ("id", "subjects", "layers", "method", "kind")},
                "revertible": guard.revertible, "expose_base": self.base_ok, "max_new_tokens": self.max_new_tokens,
                "max_batch": guard.max_batch, "per_row": guard.per_row,
                "limits": {"max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels,
                           "max_text_chars": limits.max_text_chars, "max_prompt_tokens": guard.budget.prompt_tokens(self.max_new_tokens)}}


class ApiError(Exception):
    """An HTTP error answered as ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


class JsonApi:
    """The ``/v1`` routes over a ``Service``. ``workers``: requests handed to the guard at once (each
    waits for its answer in a worker thread; default 2 x the guard's ``max_batch``, so two full
    batches can be waiting); ``max_queue``: requests beyond those that may wait for a worker
    before new ones get 503. ``routes(auth=..., backoff=...)`` gives the Starlette routes to put in
    front of Gradio's (``serve.app.launch`` does)."""

    def __init__(self, service: Service, *, workers: int | None = None, max_queue: int = 64):
        self.service = service
        self.workers = workers or max(2, 2 * service.guard.max_batch)
        self.max_queue = max_queue
        self._limiter = None  # anyio.CapacityLimiter, made in the server's event loop
        self._in_flight = 0
        limits = service.guard.limits
        self.max_body = max_body_bytes(limits)

    # ---- Starlette plumbing -----------------------------------------------------------------------------
    def routes(self, *, auth: tuple[str, str] | None = None, backoff: Backoff | None = None) -> list:
        """One route, ``/v1/{name}``, dispatching by name and method (so that an unknown name is a JSON
        404 and a wrong method a JSON 405, never Gradio's page)."""
        from starlette.routing import Route

        backoff = backoff or Backoff()
        handlers: dict[str, tuple[str, Callable]] = {"chat": ("POST", self._chat), "compare": ("POST", self._compare),
                                                     "info": ("GET", self._info)}

        async def endpoint(request):
            try:
                self._check_auth(request, auth, backoff)
                name = request.path_params["name"].strip("/")
                if name not in handlers:
                    raise ApiError(404, f"no such API endpoint: {API_PREFIX}/{name[:80]}")
                method, handler = handlers[name]
                if request.method != method:
                    raise ApiError(405, f"{API_PREFIX}/{name} takes {method}", {"Allow": method})
                return _json(200, await handler(request))
            except ApiError as e:
                return _json(e.status, {"error": str(e)}, e.headers)
            except Exception:  # noqa: BLE001 - one line to the client, the traceback to the log
                logger.exception("{} {}: internal error", request.method, request.url.path)
                return _json(500, {"error": "internal error"})

        methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
        return [Route(API_PREFIX + "/{name:path}", endpoint, methods=methods, name="ngguard_api")]

    @staticmethod
    def _check_auth(request, auth: tuple[str, str] | None, backoff: Backoff) -> None:
        if auth is None:
            return
        client = request.client.host if request.client else "unknown"
        if "authorization" not in request.headers:  # no credentials (a health check): not a login attempt
            raise ApiError(401, "authentication required (HTTP Basic, the NGGUARD_AUTH credentials)",
                           {"WWW-Authenticate": 'Basic realm="ngguard"'})
        wait = backoff.start(client)
        if wait > 0:
            raise ApiError(429, f"too many failed logins: try again in {math.ceil(wait)} s",
                           {"Retry-After": str(math.ceil(wait))})
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, sep, password = "", "", ""
        # both compared in full whatever the first gives (no timing hint of which was wrong)
        ok = scheme.lower() == "basic" and sep == ":"
        ok = hmac.compare_digest(user.encode(), auth[0].encode()) & ok
        ok = hmac.compare_digest(password.encode(), auth[1].encode()) & ok
        if not ok:
            logger.warning("API: failed login from {}", client)
            raise ApiError(401, "authentication required (HTTP Basic, the NGGUARD_AUTH credentials)",
                           {"WWW-Authenticate": 'Basic realm="ngguard"'})
        backoff.succeeded(client)

    async def _body(self, request, kind: str) -> dict:
        """The request's JSON object, with only the fields ``kind`` takes."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, "the body must be JSON (Content-Type: application/json)")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise ApiError(413, f"request body is too large: {int(declared)} bytes (limit {self.max_body})")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(413, f"request body is too large (limit {self.max_body} bytes)")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON ({' '.join(str(e).split())[:100]})") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
        allowed = _FIELDS[kind]
        unknown = [k for k in body if k not in allowed]
        if unknown:
            raise ApiError(400, f"unknown field {str(unknown[0])[:40]!r} (expected {', '.join(allowed)})")
        for field in ("image", "text"):
            if field not in body:
                raise ApiError(400, f"missing field {field!r}")
            if not isinstance(body[field], str):
                raise ApiError(400, f"{field!r} must be a string, got {type(body[field]).__name__}")
        if "protected" in body and not isinstance(body["protected"], bool):
            raise ApiError(400, f"'protected' must be true or false, got {type(body['protected']).__name__}")
        return body

    @staticmethod
    def _image(value: str) -> bytes:
        """Base64 (or a base64 data URL) -> the encoded image bytes (in the worker thread: 27 MB of
        base64 must not hold up the event loop)."""
        if value.startswith("data:"):
            head, sep, value = value.partition(",")
            if not sep or not head.endswith(";base64"):
                raise ApiError(400, "'image' data URL must be base64 (data:image/...;base64,...)")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "'image' is not valid base64") from None
        return data  # size, format and pixels are checked by the guard (TooLarge -> 413)

    async def _run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` in a worker thread (at most ``workers`` at once), guard errors as HTTP errors."""
        import anyio

        from ngguard.limits import InputError, TooLarge
        from ngguard.serving import BatcherClosed

        if self._in_flight >= self.workers + self.max_queue:
            raise ApiError(503, f"server busy: {self._in_flight} requests in flight (limit "
                                f"{self.workers + self.max_queue}); retry later", {"Retry-After": "1"})
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.workers)
        self._in_flight += 1
        try:
            return await anyio.to_thread.run_sync(fn, limiter=self._limiter)
        except TooLarge as e:
            raise ApiError(413, str(e)) from None
        except InputError as e:
            raise ApiError(400, str(e)) from None
        except BaseNotServed as e:
            raise ApiError(403, str(e)) from None
        except BatcherClosed:
            raise ApiError(503, "the server is shutting down") from None
        finally:
            self._in_flight -= 1

    # ---- the endpoints ----------------------------------------------------------------------------------
    async def _chat(self, request) -> dict:
        body = await self._body(request, "chat")
        protected = body.get("protected", True)
        if not protected and self.service.has_patch and not self.service.base_ok:
            raise ApiError(403, BASE_OFF)  # before any work
        answer, used = await self._run(lambda: self.service.chat(
            self._image(body["image"]), body["text"], protected=protected, max_new_tokens=body.get("max_new_tokens")))
        return {"answer": answer, "protected": used}

    async def _compare(self, request) -> dict:
        if not self.service.base_ok:
            raise ApiError(403, BASE_OFF)  # before reading the body
        body = await self._body(request, "compare")
        base, protected = await self._run(lambda: self.service.compare(
            self._image(body["image"]), body["text"], max_new_tokens=body.get("max_new_tokens")))
        return {"base": base, "protected": protected}

    async def _info(self, request) -> dict:  # noqa: ARG002 - same signature as the others
        return self.service.info()


def _json(status: int, payload: dict, headers: dict[str, str] | None = None):
    from starlette.responses import Response

    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, status_code=status, headers=headers, media_type="application/json")
