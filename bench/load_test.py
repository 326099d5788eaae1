"""Load test of the Gradio app: N concurrent /chat requests through gradio_client, loopback only.

    python bench/load_test.py                       # starts the app in-process, 50 chats, 50 at once
    python bench/load_test.py --n 100 --concurrency 20 --endpoint compare
    python bench/load_test.py --serve-only --port 7860   # just serve (used by bench/screenshot.sh)

The app is started on 127.0.0.1 with a free port (or --port) over the organism with its bundled
patch when those exist, else over a random model of the organism's shape (answers are noise then;
the timings are what matter). Prints the error count and p50 / p95 / max latency (submit to
answer, so queueing is included) and the throughput.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import ipaddress
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

MAX_REQUESTS = 1000
MAX_CONCURRENCY = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_guard(model: str, patch: str | None, vision: str):
    """The guard to serve: the organism (+ bundled patch) when built, else a random organism-shaped model."""
    import torch

    from ngguard.guard import ProtectedLVLM

    if model != "organism":
        return ProtectedLVLM.from_pretrained(model, patch, vision=vision, device="cpu"), model
    from ngguard.organism import CHECKPOINT

    if (CHECKPOINT / "config.json").is_file():
        from serve.app import organism_patch_dir

        if patch is None and (organism_patch_dir() / "patch.json").is_file():
            patch = str(organism_patch_dir())
        desc = "organism" + (f" + patch {patch}" if patch else " (no patch)")
        return ProtectedLVLM.from_pretrained("organism", patch, vision=vision, device="cpu"), desc
    from transformers import LlavaForConditionalGeneration

    from ngguard.adapters import adapter_for
    from ngguard.organism.build import build_config, build_processor, build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    mdl = LlavaForConditionalGeneration(build_config(tok)).eval()
    mdl.generation_config.pad_token_id = tok.pad_token_id
    mdl.generation_config.eos_token_id = tok.eos_token_id
    adapter = adapter_for(mdl, build_processor(tok))
    return ProtectedLVLM.from_pretrained(adapter, vision=vision), "random organism-shaped model (checkpoint not built)"


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"load_test: refusing non-loopback target {url} (loopback only)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50, help=f"requests (1..{MAX_REQUESTS})")
    p.add_argument("--concurrency", type=int, default=50, help=f"requests in flight (1..{MAX_CONCURRENCY})")
    p.add_argument("--endpoint", choices=("chat", "compare"), default="chat")
    p.add_argument("--model", default="organism")
    p.add_argument("--patch", default=None)
    p.add_argument("--vision", choices=("torch", "onnx"), default="torch")
    p.add_argument("--max-new-tokens", type=int, default=48, help="as `ngguard serve` (default 48)")
    p.add_argument("--app-concurrency", type=int, default=2, help="the app's queue workers per event")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--serve-only", action="store_true", help="start the app and block (no load)")
    args = p.parse_args(argv)
    if not 1 <= args.n <= MAX_REQUESTS or not 1 <= args.concurrency <= MAX_CONCURRENCY:
        p.error(f"--n must be in 1..{MAX_REQUESTS} and --concurrency in 1..{MAX_CONCURRENCY}")

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="INFO" if args.serve_only else "WARNING")
    from gradio_client import Client, handle_file

    from serve.app import build_app, launch, render_examples

    guard, desc = build_guard(args.model, args.patch, args.vision)
    examples = render_examples()
    demo = build_app(guard, examples=examples, max_new_tokens=args.max_new_tokens,
                     concurrency=args.app_concurrency, max_queue=max(64, args.n))
    port = args.port or free_port()
    _, url, _ = launch(demo, host="127.0.0.1", port=port, block=args.serve_only, quiet=not args.serve_only)
    if args.serve_only:
        return 0
    check_loopback(url)
    try:
        client = Client(url, verbose=False)
        work = [examples[i % 2] for i in range(args.n)]  # sensitive and benign questions, alternating

        def one(i: int) -> float:
            path, question = work[i][0], work[i][1]
            t = time.perf_counter()
            if args.endpoint == "chat":
                out = client.predict({"text": question, "files": [handle_file(path)]}, True, api_name="/chat")
                if not isinstance(out, str) or out.startswith("⚠️"):
                    raise RuntimeError(f"unexpected reply {out!r}")
            else:
                out = client.predict(handle_file(path), question, api_name="/compare")
                if not (isinstance(out, (list, tuple)) and len(out) == 2):
                    raise RuntimeError(f"unexpected reply {out!r}")
            return time.perf_counter() - t

        one(0)  # warm-up (first request compiles/caches), not counted
        lat, errors = [], []
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            for fut in cf.as_completed([pool.submit(one, i) for i in range(args.n)]):
                try:
                    lat.append(fut.result())
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(f"{type(e).__name__}: {e}")
        wall = time.perf_counter() - t0
    finally:
        demo.close()
    lat.sort()

    def q(x: float) -> float:
        return lat[min(len(lat) - 1, int(round(x * (len(lat) - 1))))] if lat else float("nan")

    print(f"model: {desc}; endpoint /{args.endpoint}; {args.n} requests, {args.concurrency} in flight; "
          f"app workers {args.app_concurrency}; max_new_tokens {args.max_new_tokens}; vision {args.vision}")
    print(f"errors: {len(errors)}   ok: {len(lat)}")
    print(f"latency p50 {q(.5):.2f} s   p95 {q(.95):.2f} s   max {q(1):.2f} s   "
          f"wall {wall:.1f} s   throughput {len(lat) / wall:.2f} req/s")
    for e in errors[:5]:
        print("  error:", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
