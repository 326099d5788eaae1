"""The Gradio app, started on 127.0.0.1 with a free port and used through gradio_client."""
from __future__ import annotations

import argparse
import re
import socket

import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from tiny_models import tiny_llava, tiny_patch  # noqa: E402

from ngguard.adapters import adapter_for  # noqa: E402
from ngguard.guard import ProtectedLVLM  # noqa: E402
from ngguard.serving.options import SERVING
from serve import app as serve_app  # noqa: E402
from serve.app import BENIGN_Q, SENSITIVE_Q, build_app, launch, parse_auth, render_examples  # noqa: E402

MAX_NEW = 12
pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")  # pandas deprecations inside gradio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean(text: str) -> str:
    """Answers without control characters (the tiny random model emits some; depending on the Gradio
    version the chatbot drops them or not), for comparing API answers with the guard's."""
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)


@pytest.fixture(scope="module", params=["merged", "rows"])
def served(tmp_path_factory, request):
    """A tiny model + a real protection patch behind a running app: (guard, client, examples, url).
    "merged": the patched weights, toggled under the lock, no batcher (the old server); "rows":
    per-row protection + the request batcher (the ``ngguard serve`` default)."""
    tmp = tmp_path_factory.mktemp("serve")
    adapter = adapter_for(*tiny_llava(seed=5, template="text_first"))
    rows = request.param == "rows"
    guard = ProtectedLVLM(adapter, tiny_patch(adapter, tmp, subjects=["Passport", "Student ID"]), 
                          serving=SERVING.replace(protection="rows" if rows else "merged", max_batch=8 if rows else 1))
    examples = render_examples(tmp / "examples")
    demo = build_app(guard, examples=examples, max_new_tokens=MAX_NEW)
    _, url, _ = launch(demo, host="127.0.0.1", port=free_port(), block=False, quiet=True, auth=None)
    client = Client(url, verbose=False)
    yield guard, client, examples, url
    demo.close()
    guard.close()


def test_named_endpoints(served):
    _, client, _, _ = served
    names = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/chat", "/compare"} <= set(names)


def test_compare_answers_base_and_protected(served):
    guard, client, examples, _ = served
    path, question = examples[0][0], examples[0][1]
    assert question == SENSITIVE_Q and examples[1][1] == BENIGN_Q and examples[1][0] == path
    base, protected = client.predict(handle_file(path), question, api_name="/compare")
    assert base == guard.chat(path, question, max_new_tokens=MAX_NEW, protected=False)
    assert protected == guard.chat(path, question, max_new_tokens=MAX_NEW, protected=True)
    assert base != protected  # the (large, random) patch changes the answer
    assert guard.protected is True  # the toggles were undone


def test_concurrent_compare_and_chat_each_get_their_own_answers(served, run_threads):
    guard, _, examples, url = served
    want = {i: (guard.chat(examples[i][0], examples[i][1], max_new_tokens=MAX_NEW, protected=False),
                guard.chat(examples[i][0], examples[i][1], max_new_tokens=MAX_NEW, protected=True)) for i in range(4)}
    errors: list[str] = []

    def one(k: int) -> None:
        i, client = k % 4, Client(url, verbose=False)
        try:
            if k % 2:
                got = tuple(client.predict(handle_file(examples[i][0]), examples[i][1], api_name="/compare"))
                ok = got == want[i]
            else:
                got = client.predict({"text": examples[i][1], "files": [handle_file(examples[i][0])]}, k % 4 == 0,
                                     api_name="/chat")
                ok = _clean(got) == _clean(want[i][k % 4 == 0])
            if not ok:
                errors.append(f"request {k}: {got!r}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"request {k}: {type(e).__name__}: {e}")

    run_threads(one, 8)
    assert not errors, errors[:3]


def test_chat_answers_with_chosen_protection(served):
    guard, _, examples, url = served
    path, question = examples[1][0], examples[1][1]
    on = Client(url, verbose=False).predict({"text": question, "files": [handle_file(path)]}, True, api_name="/chat")
    off = Client(url, verbose=False).predict({"text": question, "files": [handle_file(path)]}, False,
                                             api_name="/chat")
    # which control characters survive the chatbot depends on Gradio: compare both sides cleaned
    assert _clean(on) == _clean(guard.chat(path, question, max_new_tokens=MAX_NEW, protected=True))
    assert _clean(off) == _clean(guard.chat(path, question, max_new_tokens=MAX_NEW, protected=False))


def test_bad_upload_gives_a_message_and_server_keeps_serving(served, tmp_path):
    guard, client, examples, url = served
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(AppError, match="not an image"):
        client.predict(handle_file(str(bad)), SENSITIVE_Q, api_name="/compare")
    with pytest.raises(AppError, match="text is empty"):
        client.predict(handle_file(examples[0][0]), "   ", api_name="/compare")
    with pytest.raises(AppError, match="Upload an image"):
        client.predict(None, SENSITIVE_Q, api_name="/compare")
    reply = Client(url, verbose=False).predict({"text": "hi", "files": [handle_file(str(bad))]}, True,
                                               api_name="/chat")
    assert reply.startswith("⚠️") and "not an image" in reply
    reply = Client(url, verbose=False).predict({"text": "hi", "files": []}, True, api_name="/chat")
    assert reply.startswith("⚠️") and "Attach an image" in reply
    # still serving
    base, _ = client.predict(handle_file(examples[4][0]), examples[4][1], api_name="/compare")
    assert base == guard.chat(examples[4][0], examples[4][1], max_new_tokens=MAX_NEW, protected=False)


def test_render_examples(tmp_path):
    ex = render_examples(tmp_path)
    assert len(ex) == 5 and all(len(e) == 3 for e in ex)
    for path, question, label in ex:
        with Image.open(path) as im:
            assert im.size == (48, 48)
        assert question.endswith("?") and label
    assert sorted(p.name for p in tmp_path.iterdir()) == ["credit_card.png", "passport.png", "shapes.png",
                                                         "student_id.png"]


def test_parse_auth():
    assert parse_auth(None) is None and parse_auth("") is None
    assert parse_auth("alice:s3:cret") == ("alice", "s3:cret")
    for bad in ("alice", ":pw", "alice:"):
        with pytest.raises(ValueError, match="NGGUARD_AUTH must look like"):
            parse_auth(bad)


def test_auth_from_env(monkeypatch):
    model, processor = tiny_llava(seed=0, template="text_first")
    guard = ProtectedLVLM(adapter_for(model, processor))
    demo = build_app(guard, examples=None, max_new_tokens=4)
    monkeypatch.setenv("NGGUARD_AUTH", "alice:wonderland")
    _, url, _ = launch(demo, port=free_port(), block=False, quiet=True)
    try:
        with pytest.raises(Exception):
            Client(url, verbose=False)  # no credentials: refused
        client = Client(url, auth=("alice", "wonderland"), verbose=False)
        assert "/compare" in client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    finally:
        demo.close()


def test_launch_gives_gradio_enough_job_slots_for_the_batcher():
    """Gradio runs at most ``max_threads`` jobs at once (default 40, whatever the events' concurrency
    limits): the app must raise it so ``max_batch`` requests per event can reach the batcher together."""
    model, processor = tiny_llava(seed=0, template="text_first")
    guard = ProtectedLVLM(adapter_for(model, processor), serving=SERVING.replace(max_batch=48))
    demo = build_app(guard, examples=None, max_new_tokens=4)  # concurrency per event: max_batch
    _, url, _ = launch(demo, port=free_port(), block=False, quiet=True, auth=None)
    try:
        assert demo.max_threads >= 2 * 48  # /chat and /compare both full
        assert demo._queue.max_thread_count == demo.max_threads
        assert {fn.concurrency_limit for fn in demo.fns.values() if fn.api_name in ("chat", "compare")} <= {"default"}
        assert demo._queue.default_concurrency_limit == 48
        assert demo._queue.sleep_when_free >= serve_app.QUEUE_POLL_S  # no 1 kHz polling of an idle queue
    finally:
        demo.close()
        guard.close()
    small = build_app(ProtectedLVLM(adapter_for(model, processor)), examples=None, max_new_tokens=4)
    assert small.ngguard_max_threads == 40  # Gradio's default when nothing asks for more


def _args(**kw) -> argparse.Namespace:
    parser = serve_app.add_serve_arguments(argparse.ArgumentParser())
    args = parser.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_patch_resolution(tmp_path, monkeypatch):
    monkeypatch.setattr(serve_app, "organism_patch_dir", lambda: tmp_path / "bundled")
    assert serve_app._resolve_patch(_args()) is None  # organism without a bundled patch: unprotected
    (tmp_path / "bundled").mkdir()
    (tmp_path / "bundled" / "patch.json").write_text("{}")
    assert serve_app._resolve_patch(_args()) == str(tmp_path / "bundled")
    assert serve_app._resolve_patch(_args(no_patch=True)) is None
    assert serve_app._resolve_patch(_args(patch="p")) == "p"
    assert serve_app._resolve_patch(_args(model="/some/model")) is None
    with pytest.raises(ValueError, match="exclude each other"):
        serve_app._resolve_patch(_args(patch="p", no_patch=True))


def test_cli_rejects_bad_options(capsys):
    assert serve_app.main(["--port", "0"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err
    assert serve_app.main(["--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
    assert serve_app.main(["--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_serve_cli_serves_a_model_folder(tmp_path):
    model, processor = tiny_llava(seed=0, template="text_first")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    args = argparse.Namespace(model=str(tmp_path / "model"), port=free_port(), device="cpu", max_new_tokens=6)
    demo, (_, url, _) = serve_app.serve_cli(args, block=False)
    try:
        examples = render_examples(tmp_path / "ex")
        base, protected = Client(url, verbose=False).predict(handle_file(examples[1][0]), BENIGN_Q,
                                                             api_name="/compare")
        assert isinstance(base, str) and protected == "(no protection patch loaded)"
    finally:
        demo.close()


def test_serve_cli_turns_sigterm_into_a_clean_shutdown(tmp_path, monkeypatch):
    """`docker stop` sends SIGTERM: a blocking `ngguard serve` stops the guard (waiting and later requests
    are refused at once, the batch in progress finishes) and then closes like Ctrl-C (Gradio's
    block_thread closes the server on KeyboardInterrupt). Without a handler a server that is PID 1 in
    a container ignores SIGTERM and is killed after docker's timeout."""
    import signal

    from ngguard.serving import BatcherClosed

    model, processor = tiny_llava(seed=0, template="text_first")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    seen = {}

    def fake_launch(demo, **kw):  # what the blocking launch would run under; SIGTERM arrives while it does
        seen["handlers"] = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
        seen["block"], guard = kw["block"], demo.ngguard_api.service.guard
        image = render_examples(tmp_path / "ex")[1][0]
        seen["answer"] = guard.chat(image, BENIGN_Q, max_new_tokens=3)
        with pytest.raises(KeyboardInterrupt):  # Gradio's block_thread catches it and closes the server
            seen["handlers"][0](signal.SIGTERM, None)
        with pytest.raises(BatcherClosed, match="shutting down"):  # the guard takes no more requests
            guard.chat(image, BENIGN_Q, max_new_tokens=3)
        seen["refused"] = True
        demo.close()

    before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    monkeypatch.setattr(serve_app, "launch", fake_launch)
    try:
        args = argparse.Namespace(model=str(tmp_path / "model"), port=free_port(), device="cpu", max_new_tokens=4)
        assert serve_app.serve_cli(args, block=True) == 0
    finally:
        for s, handler in zip((signal.SIGTERM, signal.SIGINT), before):
            signal.signal(s, handler)
    assert seen["block"] is True and all(h is not b for h, b in zip(seen["handlers"], before))
    assert isinstance(seen["answer"], str) and seen["refused"]
