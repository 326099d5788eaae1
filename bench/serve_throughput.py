"""Serving throughput, old vs new side by side: one lock + weight swaps vs per-row protection + batching.

    python bench/serve_throughput.py                    # 50 concurrent requests per server, 2 rounds
    python bench/serve_throughput.py --n 200 --concurrency 64 --rounds 1
    python bench/serve_throughput.py --single 0         # skip the one-request latency ratios

Two Gradio apps over the organism with its bundled patch, on 127.0.0.1, same process, same requests:

- **old**: merged weights, no batcher, the app's 2 queue workers: every answer and every protection
  toggle holds the guard's lock (``ProtectedLVLM(per_row=False, max_batch=1)``, as before issue 13);
- **new**: per-row protection + the request batcher (``per_row=True, max_batch=--max-batch``, the
  app's workers = max_batch): the ``ngguard serve`` default.

The load: ``--n`` requests, ``--concurrency`` in flight through ``gradio_client``, a mix of
protected /chat, unprotected /chat and /compare (base + protected) on the organism world's
sensitive and benign examples. Every answer is checked against the answer computed alone before
the load (a protected request answered by the base model, or the other way round, counts as
wrong). Rounds alternate old, new, old, new, ... Prints errors, wrong answers, p50 / p95 / max
latency (submit to answer, queueing included), throughput, and the ratios new / old.

``--single N`` (default 20): one request at a time, in-process, interleaved: protected / base
latency for the merged model (the patched checkpoint vs the base checkpoint) and per-row (the same
guard, row protected vs not): the overhead of protection itself, expected 1.00.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from load_test import check_loopback, free_port  # noqa: E402  (bench/ is on sys.path when run as a script)

MAX_REQUESTS = 1000
MAX_CONCURRENCY = 256


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def run_load(guard, examples, args, label: str) -> dict:
    """Serve ``guard``, send the mixed load, return the figures."""
    from gradio_client import Client, handle_file

    from serve.app import build_app, launch

    demo = build_app(guard, examples=examples, max_new_tokens=args.max_new_tokens,
                     concurrency=None if guard.max_batch > 1 else 2, max_queue=max(64, args.n))
    _, url, _ = launch(demo, host="127.0.0.1", port=free_port(), block=False, quiet=True)
    check_loopback(url)
    want = {}
    for i in (0, 1):  # sensitive and benign question about the same passport card
        path, question = examples[i][0], examples[i][1]
        want[i] = {s: guard.chat(path, question, max_new_tokens=args.max_new_tokens, protected=s) for s in (False, True)}
    try:
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
    finally:
        demo.close()
    batcher = guard._batcher
    return {"label": label, "errors": len(errors), "wrong": wrong, "ok": len(lat), "p50": _quantile(lat, .5),
            "p95": _quantile(lat, .95), "max": _quantile(lat, 1.0), "wall": wall, "rps": len(lat) / wall,
            "largest_batch": batcher.largest if batcher is not None else 1, "first_errors": errors[:3]}


def single_latency(patch: str, examples, n: int, max_new_tokens: int) -> dict[str, float]:
    """Median one-request latency (in-process), interleaved: merged protected vs base checkpoint,
    per-row protected vs per-row base."""
    from ngguard.guard import ProtectedLVLM, load_image

    merged = ProtectedLVLM.from_pretrained("organism", patch, device="cpu")
    base = ProtectedLVLM.from_pretrained("organism", None, device="cpu")
    rows = ProtectedLVLM.from_pretrained("organism", patch, device="cpu", per_row=True)
    img, question = load_image(examples[0][0]), examples[0][1]
    calls = {
        "merged protected": lambda: merged.chat(img, question, max_new_tokens=max_new_tokens),
        "base checkpoint": lambda: base.chat(img, question, max_new_tokens=max_new_tokens),
        "per-row protected": lambda: rows.chat(img, question, max_new_tokens=max_new_tokens, protected=True),
        "per-row base": lambda: rows.chat(img, question, max_new_tokens=max_new_tokens, protected=False),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    for f in calls.values():
        f()  # warm-up
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
    p.add_argument("--max-batch", type=int, default=32, help="the new server's batcher (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--max-new-tokens", type=int, default=48, help="as `ngguard serve` (default 48)")
    p.add_argument("--rounds", type=int, default=2, help="old/new pairs, alternating (default 2)")
    p.add_argument("--single", type=int, default=20, help="repeats of the one-request latency ratios (0: skip)")
    args = p.parse_args(argv)
    if not 1 <= args.n <= MAX_REQUESTS or not 1 <= args.concurrency <= MAX_CONCURRENCY or args.rounds < 1:
        p.error(f"--n must be in 1..{MAX_REQUESTS}, --concurrency in 1..{MAX_CONCURRENCY}, --rounds >= 1")

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from ngguard.guard import ProtectedLVLM
    from ngguard.organism import CHECKPOINT
    from serve.app import organism_patch_dir, render_examples

    patch = organism_patch_dir()
    if not (CHECKPOINT / "config.json").is_file() or not (patch / "patch.json").is_file():
        raise SystemExit("serve_throughput: the bundled organism checkpoint and patch are needed")
    examples = render_examples()
    results = []
    for r in range(args.rounds):
        old = ProtectedLVLM.from_pretrained("organism", str(patch), device="cpu")
        results.append(run_load(old, examples, args, f"old (lock, merged) #{r + 1}"))
        new = ProtectedLVLM.from_pretrained("organism", str(patch), device="cpu", per_row=True,
                                            max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms)
        results.append(run_load(new, examples, args, f"new (per-row, batched) #{r + 1}"))
        new.close()

    print(f"organism + patch, {args.n} requests ({args.concurrency} in flight): protected /chat, base /chat and "
          f"/compare mixed; max_new_tokens {args.max_new_tokens}; new server max_batch {args.max_batch}")
    print(f"{'server':<28} {'errors':>6} {'wrong':>5} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'req/s':>7} "
          f"{'largest batch':>13}")
    for x in results:
        print(f"{x['label']:<28} {x['errors']:>6} {x['wrong']:>5} {x['p50']:>7.2f} {x['p95']:>7.2f} {x['max']:>7.2f} "
              f"{x['rps']:>7.2f} {x['largest_batch']:>13}")
        for e in x["first_errors"]:
            print("    error:", e)
    olds, news = results[0::2], results[1::2]
    for o, n in zip(olds, news):
        print(f"round: throughput new/old {n['rps'] / o['rps']:.2f}x, p50 old/new {o['p50'] / n['p50']:.2f}x, "
              f"p95 old/new {o['p95'] / n['p95']:.2f}x")
    if args.single > 0:
        med = single_latency(str(patch), examples, args.single, args.max_new_tokens)
        print(f"one request at a time (median of {args.single}, interleaved): " +
              ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in med.items()))
        print(f"protected / base latency: merged {med['merged protected'] / med['base checkpoint']:.3f}, "
              f"per-row {med['per-row protected'] / med['per-row base']:.3f}")
    return 1 if any(x["errors"] or x["wrong"] for x in results) else 0


if __name__ == "__main__":
    sys.exit(main())
