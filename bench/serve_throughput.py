"""The guard's own serving gain and the cost of protection, in-process (no HTTP; through HTTP: bench/load_test.py).

    python bench/serve_throughput.py                    # 50 concurrent requests per guard, 2 rounds, + ratios
    python bench/serve_throughput.py --n 200 --concurrency 200 --rounds 1 --single 0
    python bench/serve_throughput.py --single-only --single 60   # only the one-request latency ratios

1. Throughput: ``--concurrency`` threads calling ``guard.chat`` / ``guard.chat_batch`` directly, the
   same mixed requests (protected chat, unprotected chat, compare = a base and a protected row, on the
   organism world's sensitive and benign passport examples) to two guards over the organism with its
   bundled patch, rounds alternating old, new, old, new:
   - **old**: merged weights, no batcher: every answer and every protection toggle holds the guard's
     lock (the guard before issue 13);
   - **new**: per-row protection + the request batcher (``ServingOptions(protection="rows", max_batch=N)``).
   Every answer is checked against the answer computed alone before the load (a protected request
   answered by the base model, or the other way round, counts as wrong). Prints errors, wrong answers,
   p50 / p95 / max latency, throughput, and the ratios new / old per round.
2. ``--single N`` (default 40): one request at a time: protected / base latency for the merged model
   (the patched checkpoint vs the base checkpoint) and per-row (the same guard, row protected vs not),
   on the benign question (the same answer, so the same tokens, in both states): the overhead of
   protection itself, expected 1.00. Each repeat times the four calls in a random order; the figure is
   the median of the per-repeat ratios with a bootstrap 95% interval.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
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


def single_latency(patch: str, examples, n: int, max_new_tokens: int, seed: int = 0) -> dict[str, dict]:
    """One request at a time, in-process: protected / base latency for the merged model (the patched
    checkpoint vs the base checkpoint) and per-row (the same guard, row protected vs not), on the
    benign question (the same answer, so the same tokens, in both states). ``n`` repeats; each repeat
    times the four calls in a fresh random order (so drift and order effects hit both sides alike)
    and gives one ratio per mode. Returns, per mode, the per-repeat ratios and their median with a
    bootstrap 95% interval of the median."""
    import random

    from ngguard.guard import ProtectedLVLM, load_image
    from ngguard.serving.options import SERVING, ServingOptions

    one = ServingOptions(protection="merged", max_batch=1)  # one request at a time (no batcher)
    merged = ProtectedLVLM.from_pretrained("organism", patch, device="cpu", serving=one)
    base = ProtectedLVLM.from_pretrained("organism", None, device="cpu", serving=one)
    rows = ProtectedLVLM.from_pretrained("organism", patch, device="cpu", serving=SERVING.replace(max_batch=1))
    img, question = load_image(examples[1][0]), examples[1][1]
    calls = {
        "merged protected": lambda: merged.chat(img, question, max_new_tokens=max_new_tokens),
        "base checkpoint": lambda: base.chat(img, question, max_new_tokens=max_new_tokens),
        "per-row protected": lambda: rows.chat(img, question, max_new_tokens=max_new_tokens, protected=True),
        "per-row base": lambda: rows.chat(img, question, max_new_tokens=max_new_tokens, protected=False),
    }
    answers = {k: f() for k, f in calls.items()}  # warm-up
    if len(set(answers.values())) != 1:
        raise SystemExit(f"serve_throughput: the benign answers differ between the states: {answers}")
    rng = random.Random(seed)
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(n):
        order = list(calls)
        rng.shuffle(order)
        for k in order:
            t = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t)
    out = {}
    for mode, (prot, ref) in {"merged": ("merged protected", "base checkpoint"),
                              "per-row": ("per-row protected", "per-row base")}.items():
        ratios = [a / b for a, b in zip(times[prot], times[ref])]
        boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
        out[mode] = {"ratio": statistics.median(ratios), "lo": boot[50], "hi": boot[1949],
                     "q1": _quantile(ratios, .25), "q3": _quantile(ratios, .75),
                     "ms": (statistics.median(times[prot]) * 1000, statistics.median(times[ref]) * 1000)}
    for g in (merged, base, rows):
        g.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50, help=f"requests per guard and round (1..{MAX_REQUESTS})")
    p.add_argument("--concurrency", type=int, default=50, help=f"requests in flight (1..{MAX_CONCURRENCY})")
    p.add_argument("--max-batch", type=int, default=64, help="the new guard's batcher (default 64)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--max-new-tokens", type=int, default=48, help="as `ngguard serve` (default 48)")
    p.add_argument("--rounds", type=int, default=2, help="old/new pairs, alternating (default 2)")
    p.add_argument("--single", type=int, default=40, help="repeats of the one-request latency ratios (0: skip)")
    p.add_argument("--single-only", action="store_true", help="only the one-request latency ratios")
    args = p.parse_args(argv)
    if not 1 <= args.n <= MAX_REQUESTS or not 1 <= args.concurrency <= MAX_CONCURRENCY or args.rounds < 1:
        p.error(f"--n must be in 1..{MAX_REQUESTS}, --concurrency in 1..{MAX_CONCURRENCY}, --rounds >= 1")

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from ngguard.guard import ProtectedLVLM, load_image
    from ngguard.organism import CHECKPOINT
    from ngguard.serving.options import SERVING, ServingOptions
    from serve.app import organism_patch_dir, render_examples

    patch = organism_patch_dir()
    if not (CHECKPOINT / "config.json").is_file() or not (patch / "patch.json").is_file():
        raise SystemExit("serve_throughput: the bundled organism checkpoint and patch are needed")
    examples = render_examples()
    print(f"organism + patch; max_new_tokens {args.max_new_tokens}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    rows = []
    if not args.single_only:
        images = [load_image(examples[i][0]) for i in (0, 1)]
        old = ProtectedLVLM.from_pretrained("organism", str(patch), device="cpu",
                                            serving=ServingOptions(protection="merged", max_batch=1))
        want = {i: {s: old.chat(images[i], examples[i][1], max_new_tokens=args.max_new_tokens, protected=s)
                    for s in (False, True)} for i in (0, 1)}
        new = ProtectedLVLM.from_pretrained("organism", str(patch), device="cpu",
                                            serving=SERVING.replace(protection="rows", max_batch=args.max_batch,
                                                                    batch_wait_ms=args.batch_wait_ms))
        print(f"{args.n} requests ({args.concurrency} in flight): protected chat, base chat and compare mixed; "
              f"new: max_batch {args.max_batch}, wait {args.batch_wait_ms} ms")
        for r in range(args.rounds):
            rows.append(run_guard_load(old, want, images, examples, args, f"old (lock, merged) #{r + 1}"))
            rows.append(run_guard_load(new, want, images, examples, args, f"new (per-row, batched) #{r + 1}"))
        new.close()
        print("\nin-process, threads calling the guard (no HTTP; through HTTP: bench/load_test.py)")
        print(f"{'guard':<28} {'errors':>6} {'wrong':>5} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'req/s':>7}")
        for x in rows:
            print(f"{x['label']:<28} {x['errors']:>6} {x['wrong']:>5} {x['p50']:>7.2f} {x['p95']:>7.2f} "
                  f"{x['max']:>7.2f} {x['rps']:>7.2f}")
        for o, n in zip(rows[0::2], rows[1::2]):
            print(f"  round: throughput new/old {n['rps'] / o['rps']:.2f}x, p50 old/new {o['p50'] / n['p50']:.2f}x, "
                  f"p95 old/new {o['p95'] / n['p95']:.2f}x")
    if args.single > 0 or args.single_only:
        n = args.single or 40
        res = single_latency(str(patch), examples, n, args.max_new_tokens)
        print(f"\none request at a time, in-process, {n} repeats in random order; protected / base latency "
              f"(median of the per-repeat ratios, bootstrap 95% interval of that median, quartiles):")
        for mode, x in res.items():
            print(f"  {mode:<8} {x['ratio']:.3f}  [{x['lo']:.3f}, {x['hi']:.3f}]  quartiles {x['q1']:.3f} .. "
                  f"{x['q3']:.3f}   (medians {x['ms'][0]:.1f} ms / {x['ms'][1]:.1f} ms)")
    return 1 if any(x["errors"] or x["wrong"] for x in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
