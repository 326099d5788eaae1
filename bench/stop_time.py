"""Time from SIGTERM to process exit of `ngguard serve`, idle and under load (the JSON API).

    python bench/stop_time.py                       # organism + bundled patch, 3 repeats of each
    python bench/stop_time.py --n 200 --repeats 5 --protection merged --max-batch 1

Each repeat starts ``python -m serve.app`` (= ``ngguard serve``) on a free 127.0.0.1 port, waits for
HTTP 200, and either sends SIGTERM at once (**idle**) or first puts ``--n`` ``/v1/chat`` requests in
flight (a third protected, a third base, a third ``/v1/compare``) and sends SIGTERM once the server
has answered ``--answered-before`` of them (**load**: SIGTERM in the middle of the work). It prints
the seconds from SIGTERM to exit, the exit status, and what the clients got: answers, HTTP 503
("shutting down" / "busy"), other errors (connection refused or reset, ...). ``docker stop`` waits
10 s by default before it kills a container.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load_test import KINDS, JsonClient, Server  # noqa: E402


def stop(server: Server, timeout: float) -> tuple[float, int | None]:
    """SIGTERM -> (seconds until the process exited, its exit status; None if it had to be killed)."""
    t0 = time.perf_counter()
    server.proc.send_signal(signal.SIGTERM)
    try:
        rc = server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        rc = None
    return time.perf_counter() - t0, rc


def one_run(args, examples, *, loaded: bool) -> dict:
    server = Server("serve", ["--protection", args.protection, "--max-batch", str(args.max_batch)],
                    max_new_tokens=args.max_new_tokens, max_queue=max(64, 2 * args.n))
    outcome = {"answered": 0, "503": 0, "other": 0}
    try:
        server.wait_ready()
        if not loaded:
            seconds, rc = stop(server, args.timeout)
            return {"seconds": seconds, "rc": rc, **outcome}
        client, lock, answered = JsonClient(server.url), threading.Lock(), threading.Event()

        def request(k: int) -> None:
            path, question = examples[k % 2][0], examples[k % 2][1]
            kind = KINDS[(k // 2) % len(KINDS)]
            try:
                if kind == "compare":
                    client.compare(path, question)
                else:
                    client.chat(path, question, kind == "protected")
                key = "answered"
            except Exception as e:  # noqa: BLE001 - counted
                key = "503" if "HTTP 503" in str(e) else "other"
            with lock:
                outcome[key] += 1
                if outcome["answered"] >= args.answered_before:
                    answered.set()

        pool = cf.ThreadPoolExecutor(max_workers=args.n)
        futures = [pool.submit(request, k) for k in range(args.n)]
        answered.wait(args.timeout)
        seconds, rc = stop(server, args.timeout)
        cf.wait(futures, timeout=args.timeout)
        pool.shutdown(wait=False, cancel_futures=True)
        return {"seconds": seconds, "rc": rc, **outcome}
    finally:
        server.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n", type=int, default=200, help="requests in flight for the loaded runs (default 200)")
    p.add_argument("--answered-before", type=int, default=10,
                   help="SIGTERM once this many requests were answered (default 10)")
    p.add_argument("--protection", choices=("rows", "merged"), default="rows")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--timeout", type=float, default=120.0, help="kill the server if it has not exited by then")
    args = p.parse_args(argv)

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from serve.app import render_examples

    examples = render_examples()
    print(f"ngguard serve --protection {args.protection} --max-batch {args.max_batch}; {args.repeats} repeats; "
          f"load: {args.n} requests in flight, SIGTERM after {args.answered_before} answers; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    status = 0
    for loaded in (False, True):
        runs = [one_run(args, examples, loaded=loaded) for _ in range(args.repeats)]
        secs = [r["seconds"] for r in runs]
        print(f"{'load' if loaded else 'idle':<5} SIGTERM -> exit: median {statistics.median(secs):.2f} s "
              f"(min {min(secs):.2f}, max {max(secs):.2f}); exit status {sorted({r['rc'] for r in runs}, key=str)}"
              + (f"; clients: {sum(r['answered'] for r in runs)} answered, {sum(r['503'] for r in runs)} HTTP 503, "
                 f"{sum(r['other'] for r in runs)} other errors (of {args.n * args.repeats})" if loaded else ""))
        status |= any(r["rc"] != 0 for r in runs)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
