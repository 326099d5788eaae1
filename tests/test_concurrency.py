"""The shared tokenizer under concurrent use (issue 23, section 1).

A Hugging Face fast tokenizer sets its Rust backend's padding/truncation state on every call and then
encodes with whatever the backend holds: a request thread counting tokens (no padding) could switch
padding off under the batcher's padded batch ("Unable to create tensor"). Tested three ways:

- a forced interleaving (deterministic): the batch call is held between setting the padding and
  encoding while another thread counts tokens;
- stress: many threads encoding batches of texts of different lengths and counting tokens at once,
  every result compared with the one computed alone (the verdict is about correctness only, never time);
- through the wrapper: threads calling ``ProtectedLVLM.chat`` (per-row, batched) with prompts of
  varied length while others call ``guard.user_text`` on long questions: every answer is the one
  ``chat`` gives alone.
The served API's version is in ``test_serve_api.py``.
"""
from __future__ import annotations

import sys
import threading

import pytest
import torch

from tiny_models import tiny_image, tiny_llava, tiny_patch

from ngguard.adapters import adapter_for
from ngguard.guard import ProtectedLVLM
from ngguard.serving.options import SERVING

WORDS = "the red card of the passport with a number and a name on it".split()


def texts_of_varied_length(n: int) -> list[str]:
    return [" ".join(WORDS[: 1 + k % len(WORDS)]) + "?" * (1 + k % 3) for k in range(n)]


@pytest.fixture
def frequent_switches():
    """Threads take turns every 10 us (Python's default: 5 ms): the interleavings that a loaded machine
    makes likely become common, so a race shows up in a short run. Restored after the test."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


@pytest.fixture(scope="module")
def adapter():
    return adapter_for(*tiny_llava(seed=5))


def test_counting_tokens_does_not_change_a_batch_being_encoded(adapter):
    """The padded batch call is stopped right after it set the backend's padding; another thread
    counts tokens meanwhile; the batch must come out as it does alone (before the fix: the count
    switched padding off and the batch failed with "Unable to create tensor")."""
    tok = adapter.tokenizer
    images = [tiny_image(0), tiny_image(1)]
    texts = ["red?", "what is the passport number of the passport in the image?"]
    alone = adapter.encode(images, texts).inputs["input_ids"]
    side_before = tok.padding_side
    original = tok.set_truncation_and_padding
    held, go = threading.Event(), threading.Event()
    encoder = {}

    def hold_after_setting(*args, **kwargs):
        original(*args, **kwargs)
        if threading.current_thread() is encoder.get("thread") and not held.is_set():
            held.set()
            go.wait(30)

    result: dict = {}

    def encode() -> None:
        try:
            result["ids"] = adapter.encode(images, texts).inputs["input_ids"]
        except Exception as e:  # noqa: BLE001 - asserted below
            result["error"] = f"{type(e).__name__}: {e}"

    tok.set_truncation_and_padding = hold_after_setting
    try:
        thread = threading.Thread(target=encode)
        encoder["thread"] = thread
        thread.start()
        assert held.wait(30), "the batch call never reached the tokenizer"
        side_during = tok.padding_side  # what any other user of the shared tokenizer would see now
        counted = adapter.count_tokens("what is the passport number?")
        go.set()
        thread.join(30)
    finally:
        go.set()
        del tok.set_truncation_and_padding
    assert "error" not in result, result.get("error")
    assert torch.equal(result["ids"], alone)
    assert side_during == side_before  # the padding side is passed per call, not set on the shared object
    assert counted == len(tok("what is the passport number?", add_special_tokens=False)["input_ids"])


def test_token_counts_equal_the_tokenizers(adapter):
    for text in texts_of_varied_length(12) + ["<image> USER: </s> ASSISTANT: 🙂 ÿ naïve", " lead and trail  "]:
        assert adapter.count_tokens(text) == len(adapter.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_many_threads_encoding_and_counting_get_what_they_get_alone(adapter, frequent_switches):
    """8 threads encode left- and right-padded batches of texts of different lengths while 4 threads
    count tokens of long texts: every batch and count equals the one computed alone."""
    images = [tiny_image(k) for k in range(3)]
    texts = texts_of_varied_length(24)
    jobs = []  # (images, texts, targets) per batch
    for k in range(48):
        n = 2 + k % 4
        rows = [texts[(5 * k + 7 * i) % len(texts)] for i in range(n)]
        targets = ["no." if i % 2 else "the number is 42." for i in range(n)] if k % 3 == 0 else None
        jobs.append(([images[(k + i) % 3] for i in range(n)], rows, targets))
    alone = [adapter.encode(im, tx, targets=tg) for im, tx, tg in jobs]
    long_texts = [" ".join([t] * 6) for t in texts]
    counts = {t: len(adapter.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in long_texts}
    errors: list[str] = []
    start = threading.Barrier(12)

    def encoder(k: int) -> None:
        start.wait()
        for j in range(k, len(jobs), 8):
            im, tx, tg = jobs[j]
            try:
                got = adapter.encode(im, tx, targets=tg)
                same = all(torch.equal(got.inputs[key], alone[j].inputs[key]) for key in alone[j].inputs) and (
                    tg is None or torch.equal(got.labels, alone[j].labels))
                if not same:
                    errors.append(f"batch {j}: differs from the batch encoded alone")
            except Exception as e:  # noqa: BLE001 - collected
                errors.append(f"batch {j}: {type(e).__name__}: {e}")

    def counter(k: int) -> None:
        start.wait()
        for j in range(200):
            text = long_texts[(k + j) % len(long_texts)]
            try:
                if adapter.count_tokens(text) != counts[text]:
                    errors.append(f"count of {text[:20]!r}... wrong")
            except Exception as e:  # noqa: BLE001 - collected
                errors.append(f"count: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=encoder, args=(k,)) for k in range(8)]
    threads += [threading.Thread(target=counter, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, f"{len(errors)} failures, e.g. {errors[:3]}"


def test_wrapper_chats_beside_user_text_calls_all_answer(tmp_path, frequent_switches):
    """12 threads call ``chat`` (per-row, batched) with prompts of varied length, 20 each, while 3
    threads call ``user_text`` on long questions: every answer is the one ``chat`` gives alone (before
    the fix: ~half failed with "Unable to create tensor")."""
    adapter = adapter_for(*tiny_llava(seed=5))
    guard = ProtectedLVLM(adapter, tiny_patch(adapter, tmp_path),
                          serving=SERVING.replace(protection="rows", max_batch=16))
    try:
        images = [tiny_image(k) for k in range(2)]
        prompts = texts_of_varied_length(10)
        want = {(i, p, s): guard.chat(images[i], prompts[p], max_new_tokens=4, protected=s)
                for i in range(2) for p in range(len(prompts)) for s in (False, True)}
        long_question = " ".join(["what is the passport number of the passport in the image"] * 12)
        errors: list[str] = []
        start = threading.Barrier(15)
        done = threading.Event()

        def chatter(k: int) -> None:
            start.wait()
            for j in range(20):
                i, p, s = (k + j) % 2, (3 * k + j) % len(prompts), bool((k + 2 * j) % 2)
                try:
                    got = guard.chat(images[i], prompts[p], max_new_tokens=4, protected=s)
                    if got != want[i, p, s]:
                        errors.append(f"chat {k}.{j}: {got!r} != {want[i, p, s]!r}")
                except Exception as e:  # noqa: BLE001 - collected
                    errors.append(f"chat {k}.{j}: {type(e).__name__}: {e}")

        def asker(k: int) -> None:
            start.wait()
            n = 0
            while not done.is_set() or n < 50:
                try:
                    guard.user_text(long_question)
                except Exception as e:  # noqa: BLE001 - collected
                    errors.append(f"user_text: {type(e).__name__}: {e}")
                n += 1

        chatters = [threading.Thread(target=chatter, args=(k,)) for k in range(12)]
        askers = [threading.Thread(target=asker, args=(k,)) for k in range(3)]
        for t in chatters + askers:
            t.start()
        for t in chatters:
            t.join(600)
        done.set()
        for t in askers:
            t.join(60)
        assert not any(t.is_alive() for t in chatters + askers)
        assert not errors, f"{len(errors)} of 240 chats failed, e.g. {errors[:3]}"
    finally:
        guard.close()
