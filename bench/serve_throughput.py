"""Serving throughput, old vs new side by side: one lock + weight swaps vs per-row protection + batching.

    python bench/serve_throughput.py                    # 50 concurrent requests per server, 2 rounds
    python bench/serve_throughput.py --n 200 --concurrency 64 --rounds 1
    python bench/serve_throughput.py --single 0         # skip the one-request latency ratios

The same requests to two servers over the organism with its bundled patch, on 127.0.0.1:

- **old**: merged weights, no batcher, the app's 2 queue workers: every answer and every protection
  toggle holds the guard's lock (``--protection merged --max-batch 1 --concurrency 2``, the server
  before issue 13);
- **new**: per-row protection + the request batcher (``--protection rows --max-batch N``, the app's
  workers = max_batch): the ``ngguard serve`` default (whose max_batch is 16).

Two levels, each with rounds alternating old, new, old, new, ...:

1. in-process: ``--concurrency`` threads calling ``guard.chat`` / ``guard.chat_batch`` directly
   (the guard's own gain, no HTTP);
2. HTTP: ``python -m serve.app`` in a child process (its own interpreter, as deployed), the load
   through ``gradio_client`` from ``--concurrency`` threads of this process.

The load: ``--n`` requests, a mix of protected /chat, unprotected /chat and /compare (base +
protected) on the organism world's sensitive and benign passport examples. Every answer is checked
against the answer computed alone before the load (a protected request answered by the base model,
or the other way round, counts as wrong). Prints errors, wrong answers, p50 / p95 / max latency
(submit to answer, queueing included), throughput, and the ratios new / old per round.

``--single N`` (default 20): one request at a time, in-process, interleaved: protected / base
latency for the merged model (the patched checkpoint vs the base checkpoint) and per-row (the same
guard, row protected vs not), on the benign question (the same answer, so the same number of
tokens, in both states): the overhead of protection itself, expected 1.00.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from load_test import check_loopback, free_port  # noqa: E402  (bench/ is on sys.path when run as a script)

MAX_REQUESTS = 1000
MAX_CONCURRENCY = 256


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


@contextlib.contextmanager
def served(mode: str, args):
    """``python -m serve.app`` in a child process (its own interpreter, as deployed) on 127.0.0.1;
    yields its URL; terminated at the end."""
    port = free_port()
    opts = ["--protection", "merged", "--max-batch", "1", "--concurrency", "2"] if mode == "old" else \
        ["--protection", "rows", "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)]
    cmd = [sys.executable, "-m", "serve.app", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--max-new-tokens", str(args.max_new_tokens), "--max-queue", str(max(64, 2 * args.n)), *opts]
    root = Path(__file__).resolve().parents[1]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block the server's logging
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}/"
    check_loopback(url)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"serve_throughput: the {mode} server exited: {log.read()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"serve_throughput: the {mode} server did not answer within 300 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def run_load(url: str, want: dict, examples, args, label: str) -> dict:
    """Send the mixed load to the server at ``url``; return the figures."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)

    def one(k: int) -> tuple[float, bool]:
        i, kind = k % 2, (k // 2) % 3  # 0: protected chat, 1: base chat, 2: compare
        path, question = examples[i][0], examples[i][1]
        t = time.perf_counter()
        if kind == 2:
            got = tuple(client.predict(handle_file(path), question, api_name="/compare"))
            ok = got == (want[i][False], want[i][True])
        else:
            got = client.predict({"text": question, "files": [handle_file(path)]}, kind == 0, api_name="/chat")
            ok = got == want[i][kind == 0]
        return time.perf_counter() - t, ok

    one(0), one(2), one(4)  # warm-up, not counted
    lat, errors, wrong = [], [], 0
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        for fut in cf.as_completed([pool.submit(one, k) for k in range(args.n)]):
            try:
                seconds, ok = fut.result()
                lat.append(seconds)
                wrong += not ok
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(e).__name__}: {e}")
    wall = time.perf_counter() - t0
    return _figures(label, lat, errors, wrong, wall)


def run_guard_load(guard, want: dict, images, examples, args, label: str) -> dict:
    """The same mixed load on ``guard`` directly from threads (no HTTP, no Gradio)."""

    def one(k: int) -> tuple[float, bool]:
        i, kind = k % 2, (k // 2) % 3
        t = time.perf_counter()
        if kind == 2:
            got = tuple(guard.chat_batch([images[i]] * 2, [examples[i][1]] * 2, max_new_tokens=args.max_new_tokens,
                                         protected=[False, True]))
            ok = got == (want[i][False], want[i][True])
        else:
            got = guard.chat(images[i], examples[i][1], max_new_tokens=args.max_new_tokens, protected=kind == 0)
            ok = got == want[i][kind == 0]
        return time.perf_counter() - t, ok

    one(0), one(2)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        results = list(pool.map(one, range(args.n)))
    wall = time.perf_counter() - t0
    return _figures(label, [r[0] for r in results], [], sum(not r[1] for r in results), wall)


def _figures(label: str, lat: list[float], errors: list[str], wrong: int, wall: float) -> dict:
    return {"label": label, "errors": len(errors), "wrong": wrong, "ok": len(lat), "p50": _quantile(lat, .5),
            "p95": _quantile(lat, .95), "max": _quantile(lat, 1.0), "wall": wall, "rps": len(lat) / wall,
            "first_errors": errors[:3]}


def single_latency(patch: str, examples, n: int, max_new_tokens: int) -> dict[str, float]:
    """Median one-request latency (in-process), interleaved: merged protected vs base checkpoint,
    per-row protected vs per-row base."""
    from ngguard.guard import ProtectedLVLM, load_image

    merged = ProtectedLVLM.from_pretrained("organism", patch, device="cpu")
    base = ProtectedLVLM.from_pretrained("organism", None, device="cpu")
    rows = ProtectedLVLM.from_pretrained("organism", patch, device="cpu", per_row=True)
    # the benign question: the same answer protected or not, so both sides generate the same tokens
    img, question = load_image(examples[1][0]), examples[1][1]
    calls = {
        "merged protected": lambda: merged.chat(img, question, max_new_tokens=max_new_tokens),
        "base checkpoint": lambda: base.chat(img, question, max_new_tokens=max_new_tokens),
        "per-row protected": lambda: rows.chat(img, question, max_new_tokens=max_new_tokens, protected=True),
        "per-row base": lambda: rows.chat(img, question, max_new_tokens=max_new_tokens, protected=False),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    answers = {k: f() for k, f in calls.items()}  # warm-up
    if len(set(answers.values())) != 1:
        raise SystemExit(f"serve_throughput: the benign answers differ between the states: {answers}")
    for _ in range(n):
        for k, f in calls.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50, help=f"requests per server and round (1..{MAX_REQUESTS})")
    p.add_argument("--concurrency", type=int, default=50, help=f"requests in flight (1..{MAX_CONCURRENCY})")
    p.add_argument("--max-batch", type=int, default=64, help="the new server's batcher (default 64)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--max-new-tokens", type=int, default=48, help="as `ngguard serve` (default 48)")
    p.add_argument("--rounds", type=int, default=2, help="old/new pairs, alternating (default 2)")
    p.add_argument("--no-guard-level", dest="guard_level", action="store_false",
                   help="skip the in-process run (threads calling the guard, no HTTP)")
    p.add_argument("--single", type=int, default=20, help="repeats of the one-request latency ratios (0: skip)")
    args = p.parse_args(argv)
    if not 1 <= args.n <= MAX_REQUESTS or not 1 <= args.concurrency <= MAX_CONCURRENCY or args.rounds < 1:
        p.error(f"--n must be in 1..{MAX_REQUESTS}, --concurrency in 1..{MAX_CONCURRENCY}, --rounds >= 1")

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from ngguard.guard import ProtectedLVLM, load_image
    from ngguard.organism import CHECKPOINT
    from serve.app import organism_patch_dir, render_examples

    patch = organism_patch_dir()
    if not (CHECKPOINT / "config.json").is_file() or not (patch / "patch.json").is_file():
        raise SystemExit("serve_throughput: the bundled organism checkpoint and patch are needed")
    examples = render_examples()
    images = [load_image(examples[i][0]) for i in (0, 1)]
    reference = ProtectedLVLM.from_pretrained("organism", str(patch), device="cpu")
    want = {i: {s: reference.chat(images[i], examples[i][1], max_new_tokens=args.max_new_tokens, protected=s)
                for s in (False, True)} for i in (0, 1)}
    print(f"organism + patch, {args.n} requests ({args.concurrency} in flight): protected /chat, base /chat and "
          f"/compare mixed; max_new_tokens {args.max_new_tokens}; new: max_batch {args.max_batch}, "
          f"wait {args.batch_wait_ms} ms; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    sections = []
    if args.guard_level:
        old = reference
        new = ProtectedLVLM.from_pretrained("organism", str(patch), device="cpu", per_row=True,
                                            max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms)
        rows = []
        for r in range(args.rounds):
            rows.append(run_guard_load(old, want, images, examples, args, f"old (lock, merged) #{r + 1}"))
            rows.append(run_guard_load(new, want, images, examples, args, f"new (per-row, batched) #{r + 1}"))
        new.close()
        sections.append(("in-process, threads calling the guard (no HTTP)", rows))
    rows = []
    for r in range(args.rounds):
        for mode, label in (("old", "old (lock, merged)"), ("new", "new (per-row, batched)")):
            with served(mode, args) as url:
                rows.append(run_load(url, want, examples, args, f"{label} #{r + 1}"))
    sections.append(("HTTP: `python -m serve.app` in a child process, gradio_client from threads", rows))

    for title, rows in sections:
        print(f"\n{title}")
        print(f"{'server':<28} {'errors':>6} {'wrong':>5} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'req/s':>7}")
        for x in rows:
            print(f"{x['label']:<28} {x['errors']:>6} {x['wrong']:>5} {x['p50']:>7.2f} {x['p95']:>7.2f} "
                  f"{x['max']:>7.2f} {x['rps']:>7.2f}")
            for e in x["first_errors"]:
                print("    error:", e)
        for o, n in zip(rows[0::2], rows[1::2]):
            print(f"  round: throughput new/old {n['rps'] / o['rps']:.2f}x, p50 old/new {o['p50'] / n['p50']:.2f}x, "
                  f"p95 old/new {o['p95'] / n['p95']:.2f}x")
    results = [x for _, rows in sections for x in rows]
    if args.single > 0:
        med = single_latency(str(patch), examples, args.single, args.max_new_tokens)
        print(f"one request at a time (median of {args.single}, interleaved): " +
              ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in med.items()))
        print(f"protected / base latency: merged {med['merged protected'] / med['base checkpoint']:.3f}, "
              f"per-row {med['per-row protected'] / med['per-row base']:.3f}")
    return 1 if any(x["errors"] or x["wrong"] for x in results) else 0


if __name__ == "__main__":
    sys.exit(main())
