"""The JSON API (``/v1/chat``, ``/v1/compare``, ``/v1/info``; ``serve/api.py``) of a real ``ngguard
serve`` app on 127.0.0.1: answers as ``guard.chat`` alone, the right state for every row under many
concurrent requests, one-line JSON errors with their status codes, the base model refused when it is
not exposed, HTTP Basic auth with the login back-off."""
from __future__ import annotations

import base64
import io
import socket
import sys
import threading

import pytest

pytest.importorskip("gradio")
import httpx  # noqa: E402  (a gradio dependency)
from PIL import Image  # noqa: E402

from tiny_models import tiny_image, tiny_llava, tiny_patch  # noqa: E402

from ngguard.adapters import adapter_for  # noqa: E402
from ngguard.guard import ProtectedLVLM  # noqa: E402
from ngguard.serving.options import SERVING  # noqa: E402
from ngguard.limits import InputError, Limits, TooLarge, check_text, load_image  # noqa: E402
from serve.api import BASE_OFF, JsonApi, Service  # noqa: E402
from serve.app import build_app, launch  # noqa: E402

MAX_NEW = 10
QUESTIONS = ("What is the passport number of the Passport in the image?", "What is the color of the card?")
pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _serve(guard: ProtectedLVLM, **kw):
    """(demo, url) of the app over ``guard``, launched without blocking (close the demo after)."""
    build = {k: kw.pop(k) for k in ("expose_base", "max_queue") if k in kw}
    demo = build_app(guard, examples=None, max_new_tokens=MAX_NEW, **build)
    api = kw.pop("api", None)
    if api is not None:
        demo.ngguard_api = api(demo.ngguard_api.service)
    _, url, _ = launch(demo, port=free_port(), block=False, quiet=True, **{"auth": None, **kw})
    return demo, url


def _client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=120)


@pytest.fixture(scope="module", params=["merged", "rows"])
def served(tmp_path_factory, request):
    """(guard, url, images): a tiny model + a real patch behind a running app. "merged": the patched
    weights toggled under the lock, no batcher; "rows": per-row protection + the batcher."""
    tmp = tmp_path_factory.mktemp("api")
    adapter = adapter_for(*tiny_llava(seed=5, template="text_first"))
    rows = request.param == "rows"
    guard = ProtectedLVLM(adapter, tiny_patch(adapter, tmp, subjects=["Passport"]), 
                          serving=SERVING.replace(protection="rows" if rows else "merged", max_batch=8 if rows else 1))
    demo, url = _serve(guard)
    yield guard, url, [png(tiny_image(seed)) for seed in range(3)]
    demo.close()
    guard.close()


def _answers_alone(guard: ProtectedLVLM, images: list, questions) -> dict:
    """{(image index, question index): (base answer, protected answer)}, each asked alone."""
    return {(i, q): (guard.chat(images[i], questions[q], max_new_tokens=MAX_NEW, protected=False),
                     guard.chat(images[i], questions[q], max_new_tokens=MAX_NEW, protected=True))
            for i in range(len(images)) for q in range(len(questions))}


def _ask(c: httpx.Client, url: str, image: bytes, question: str, kind: int, want: tuple[str, str]) -> tuple[bool, str]:
    """One request of ``kind`` (0: base /v1/chat, 1: protected /v1/chat, 2: /v1/compare): (whether
    it got HTTP 200 with the answers ``want`` = (base, protected), what came back)."""
    body = {"image": b64(image), "text": question}
    try:
        if kind == 2:
            r = c.post(f"{url}v1/compare", json=body)
            ok = r.status_code == 200 and (r.json()["base"], r.json()["protected"]) == want
        else:
            r = c.post(f"{url}v1/chat", json={**body, "protected": bool(kind)})
            ok = r.status_code == 200 and r.json() == {"answer": want[kind], "protected": bool(kind)}
        return ok, r.text
    except Exception as e:  # noqa: BLE001 - reported by the caller
        return False, f"{type(e).__name__}: {e}"


def test_answers_are_the_guards_alone(served):
    guard, url, images = served
    with _client() as c:
        for image in images[:2]:
            for question in QUESTIONS:
                want = {s: guard.chat(image, question, max_new_tokens=MAX_NEW, protected=s) for s in (False, True)}
                assert want[False] != want[True]  # the (large, random) patch changes the answer
                r = c.post(f"{url}v1/chat", json={"image": b64(image), "text": question})
                assert r.status_code == 200 and r.json() == {"answer": want[True], "protected": True}
                r = c.post(f"{url}v1/chat", json={"image": b64(image), "text": question, "protected": False})
                assert r.json() == {"answer": want[False], "protected": False}
                r = c.post(f"{url}v1/compare", json={"image": "data:image/png;base64," + b64(image), "text": question})
                assert r.status_code == 200 and r.json() == {"base": want[False], "protected": want[True]}
        short = c.post(f"{url}v1/chat", json={"image": b64(images[0]), "text": QUESTIONS[0], "max_new_tokens": 3})
        assert short.json()["answer"] == guard.chat(images[0], QUESTIONS[0], max_new_tokens=3, protected=True)
        info = c.get(f"{url}v1/info").json()
    assert info["patch"]["id"] == guard.patch_info["id"] and "path" not in info["patch"]
    assert info["expose_base"] is True and info["max_new_tokens"] == MAX_NEW and info["per_row"] == guard.per_row
    # the token limit a client is told is what the model's context leaves, not the global cap
    assert info["limits"]["max_prompt_tokens"] == guard.budget.prompt_tokens(MAX_NEW) < guard.limits.max_prompt_tokens
    assert guard.protected is True  # the merged guard's toggles were undone


def test_many_concurrent_requests_each_get_their_own_state(served, run_threads):
    """24 threads x 3 requests, random states and kinds, all in flight together: a protected answer is
    never the base model's and the other way round (per-row: mixed batches; merged: the lock)."""
    guard, url, images = served
    want = _answers_alone(guard, images, QUESTIONS)
    assert all(base != prot for base, prot in want.values())
    errors: list[str] = []
    start = threading.Barrier(24)

    def one(k: int) -> None:
        with _client() as c:
            start.wait()
            for j in range(3):
                i, q, kind = (k + j) % 3, (k // 3 + j) % 2, (k + 2 * j) % 3  # kind: 0 base, 1 protected, 2 compare
                ok, got = _ask(c, url, images[i], QUESTIONS[q], kind, want[i, q])
                if not ok:
                    errors.append(f"request {k}.{j} (kind {kind}): {got!r}")

    run_threads(one, 24, timeout=300)
    assert not errors, errors[:3]
    if guard.per_row:
        assert guard._batcher.largest > 1  # they were batched


def test_bad_input_gets_one_line_json_errors(served, tmp_path):
    guard, url, images = served
    image = b64(images[0])
    cases = [  # (body or raw bytes, headers, status, message part)
        ({"image": "not base64!", "text": "hi"}, None, 400, "not valid base64"),
        ({"image": b64(b"this is not a png"), "text": "hi"}, None, 400, "not an image"),
        ({"image": image, "text": "   "}, None, 400, "text is empty"),
        ({"image": image, "text": "hi\x00"}, None, 400, "NUL"),
        ({"image": image}, None, 400, "missing field 'text'"),
        ({"image": image, "text": 5}, None, 400, "'text' must be a string"),
        ({"image": image, "text": "hi", "protected": "false"}, None, 400, "true or false"),
        ({"image": image, "text": "hi", "history": []}, None, 400, "unknown field 'history'"),
        ({"image": image, "text": "hi", "max_new_tokens": MAX_NEW + 1}, None, 400, f"1..{MAX_NEW}"),
        ({"image": image, "text": "hi", "max_new_tokens": True}, None, 400, "max_new_tokens"),
        ({"image": "data:image/png,abc", "text": "hi"}, None, 400, "must be base64"),
        ({"image": image, "text": "x" * 2001}, None, 413, "text is too long"),
        (b"{not json", {"content-type": "application/json"}, 400, "not valid JSON"),
        (b"[1, 2]", {"content-type": "application/json"}, 400, "must be a JSON object"),
        (b'{"image": "", "text": "hi"}', {"content-type": "text/plain"}, 415, "Content-Type: application/json"),
    ]
    with _client() as c:
        for body, headers, status, part in cases:
            if isinstance(body, bytes):
                r = c.post(f"{url}v1/chat", content=body, headers=headers)
            else:
                r = c.post(f"{url}v1/chat", json=body)
            assert r.status_code == status, (body if isinstance(body, bytes) else list(body), r.text)
            assert r.headers["content-type"].startswith("application/json") and "\n" not in r.text
            assert part in r.json()["error"], r.text
        r = c.post(f"{url}v1/nothing", json={})
        assert r.status_code == 404 and "no such API endpoint" in r.json()["error"]
        r = c.get(f"{url}v1/chat")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        r = c.post(f"{url}v1/compare", json={"image": image, "text": "hi", "protected": True})
        assert r.status_code == 400 and "unknown field 'protected'" in r.json()["error"]
        # still serving
        r = c.post(f"{url}v1/chat", json={"image": image, "text": QUESTIONS[1]})
        assert r.json()["answer"] == guard.chat(images[0], QUESTIONS[1], max_new_tokens=MAX_NEW, protected=True)


def test_size_limits_are_413(tmp_path):
    """Request body, image bytes and pixels over the guard's limits: 413 before any generation."""
    adapter = adapter_for(*tiny_llava(seed=0))
    small = Limits(max_bytes=4000, max_pixels=40 * 40)
    guard = ProtectedLVLM(adapter, limits=small)
    demo, url = _serve(guard)
    try:
        with _client() as c:
            def post(image: bytes) -> httpx.Response:
                return c.post(f"{url}v1/chat", json={"image": b64(image), "text": "hi"})

            ok = png(Image.new("RGB", (30, 30), (200, 30, 30)))
            r = post(ok + b"\0" * 4000)  # over max_bytes, under the body limit
            assert r.status_code == 413 and "too large" in r.json()["error"]
            r = post(png(Image.new("RGB", (48, 48))))  # 48 x 48 > 40 x 40 pixels
            assert r.status_code == 413 and "pixels" in r.json()["error"]
            r = c.post(f"{url}v1/chat", json={"image": "A" * (demo.ngguard_api.max_body + 10), "text": "hi"})
            assert r.status_code == 413 and "request body is too large" in r.json()["error"]
            r = post(ok)
            assert r.status_code == 200 and r.json()["protected"] is False  # no patch: the base model
            r = c.post(f"{url}v1/compare", json={"image": b64(ok), "text": "hi"})
            assert r.status_code == 200 and r.json()["protected"] is None and isinstance(r.json()["base"], str)
    finally:
        demo.close()


def test_base_model_refused_when_not_exposed(tmp_path):
    adapter = adapter_for(*tiny_llava(seed=5, template="text_first"))
    guard = ProtectedLVLM(adapter, tiny_patch(adapter, tmp_path, subjects=["Passport"]),
                          serving=SERVING.replace(protection="rows", max_batch=4))
    demo, url = _serve(guard, expose_base=False)
    image = png(tiny_image(1))
    try:
        with _client() as c:
            r = c.post(f"{url}v1/chat", json={"image": b64(image), "text": QUESTIONS[0], "protected": False})
            assert r.status_code == 403 and r.json() == {"error": BASE_OFF}
            r = c.post(f"{url}v1/compare", json={"image": b64(image), "text": QUESTIONS[0]})
            assert r.status_code == 403 and r.json() == {"error": BASE_OFF}
            r = c.post(f"{url}v1/chat", json={"image": b64(image), "text": QUESTIONS[0]})
            assert r.status_code == 200
            assert r.json() == {"answer": guard.chat(image, QUESTIONS[0], max_new_tokens=MAX_NEW), "protected": True}
            assert c.get(f"{url}v1/info").json()["expose_base"] is False
    finally:
        demo.close()
        guard.close()


def test_basic_auth_with_the_login_back_off():
    adapter = adapter_for(*tiny_llava(seed=0))
    guard = ProtectedLVLM(adapter)
    demo, url = _serve(guard, auth=("alice", "wonderland"), login_backoff=(2, 30.0, 60.0))
    body = {"image": b64(png(tiny_image(0))), "text": "hi"}
    try:
        with _client() as c:
            r = c.post(f"{url}v1/chat", json=body)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
            r = c.post(f"{url}v1/chat", json=body, auth=("alice", "wonderland"))
            assert r.status_code == 200 and r.json()["answer"] == guard.chat(png(tiny_image(0)), "hi",
                                                                              max_new_tokens=MAX_NEW)
            assert c.get(f"{url}v1/info", auth=("alice", "wonderland")).status_code == 200
            assert c.post(f"{url}v1/nothing", json=body, auth=("alice", "guess")).status_code == 401  # auth first
            assert c.post(f"{url}v1/chat", json=body, auth=("bob", "wonderland")).status_code == 401  # 2 free
            r = c.post(f"{url}v1/chat", json=body, auth=("alice", "wonderland"))  # the right one, inside the window
            assert r.status_code == 429 and int(r.headers["retry-after"]) > 20
            assert "too many failed logins" in r.json()["error"]
            # the form login of the Gradio page shares the back-off
            assert c.post(f"{url}login", data={"username": "alice", "password": "wonderland"}).status_code == 429
    finally:
        demo.close()


def test_requests_beyond_workers_and_queue_get_503(tmp_path):
    """With 1 worker and no queue, a second request while the first is being answered is refused."""
    adapter = adapter_for(*tiny_llava(seed=0))
    guard = ProtectedLVLM(adapter)
    entered, release = threading.Event(), threading.Event()

    class SlowService(Service):
        def chat(self, *args, **kwargs):
            entered.set()
            release.wait(60)
            return super().chat(*args, **kwargs)

    demo, url = _serve(guard, api=lambda service: JsonApi(SlowService(guard, MAX_NEW), workers=1, max_queue=0))
    body = {"image": b64(png(tiny_image(0))), "text": "hi"}
    first: dict = {}
    try:
        thread = threading.Thread(target=lambda: first.update(r=_client().post(f"{url}v1/chat", json=body)))
        thread.start()
        assert entered.wait(60)
        with _client() as c:
            r = c.post(f"{url}v1/chat", json=body)
        assert r.status_code == 503 and "server busy" in r.json()["error"] and r.headers["retry-after"] == "1"
        release.set()
        thread.join(60)
        assert first["r"].status_code == 200
    finally:
        release.set()
        demo.close()


def test_size_errors_are_too_large():
    """TooLarge (HTTP 413) is an InputError: every front end that catches InputError still does."""
    small = Limits(max_bytes=100, max_pixels=16, max_text_chars=5)
    for call in (lambda: load_image(png(tiny_image(0)), small), lambda: check_text("abcdefg", small),
                 lambda: load_image(tiny_image(0), small)):
        with pytest.raises(TooLarge):
            call()
    with pytest.raises(InputError) as e:
        load_image(b"\x89PNG not really", Limits())
    assert not isinstance(e.value, TooLarge)


def test_concurrent_requests_of_varied_lengths_are_all_answered(served, run_threads):
    """The served API under concurrent mixed requests: 16 clients ask (chat in both states, compare)
    questions of different lengths while 8 clients send questions over the token limit (each counted
    in its request thread, then refused 413) as the batcher encodes padded batches. Every good answer
    is the one ``chat`` gives alone and every long question gets 413 (before the fix of the shared
    tokenizer: good requests got HTTP 500 "internal error", "Unable to create tensor" in the log)."""
    guard, url, images = served
    words = "what is the passport number of the passport in the image and its color".split()
    questions = [" ".join(words[: 2 + 3 * k]) + "?" for k in range(5)]
    too_long = "\U0001f642" * (guard.limits.max_text_chars - 1)  # within the characters, over the tokens
    assert guard.adapter.count_tokens(too_long) > guard.limits.max_prompt_tokens
    want = _answers_alone(guard, images[:2], questions)
    errors: list[str] = []
    start = threading.Barrier(24)

    def good(k: int) -> None:
        with _client() as c:
            start.wait()
            for j in range(4):
                i, q, kind = (k + j) % 2, (k + 3 * j) % len(questions), (k + j) % 3
                ok, got = _ask(c, url, images[i], questions[q], kind, want[i, q])
                if not ok:
                    errors.append(f"request {k}.{j} (kind {kind}): {got[:200]!r}")

    def bad(k: int) -> None:
        body = {"image": b64(images[k % 2]), "text": too_long}
        with _client() as c:
            start.wait()
            for j in range(12):
                r = c.post(f"{url}v1/chat", json=body)
                if r.status_code != 413:
                    errors.append(f"long question {k}.{j}: HTTP {r.status_code} {r.text[:200]!r}")

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads take turns often: interleavings that load makes likely, made common
    try:
        run_threads(lambda k: good(k) if k < 16 else bad(k), 24, timeout=300)
    finally:
        sys.setswitchinterval(switch)
    assert not errors, f"{len(errors)} failed, e.g. {errors[:3]}"
