"""Load test of `ngguard serve`: batching on vs off, side by side in one run, through HTTP on 127.0.0.1.

    python bench/load_test.py                          # 50 mixed requests, all in flight, on vs off, 2 rounds
    python bench/load_test.py --n 200 --concurrency 200 --rounds 1
    python bench/load_test.py --servers on --endpoint chat --client gradio   # through gradio_client
    python bench/load_test.py --client http            # Gradio's own HTTP API (upload, call, event stream)
    python bench/load_test.py --serve-only --port 7860  # just serve (used by bench/screenshot.sh)
    python bench/load_test.py --images 25              # 25 distinct cards (50 distinct image+question pairs)
    python bench/load_test.py --server-args "--dedup off --vision-cache 0 --decode generate"   # both servers
    python bench/load_test.py --n 200 --concurrency 200 --bad 0.25 --servers on --rounds 1   # 1 in 4 requests bad

Two servers, each ``python -m serve.app`` (= ``ngguard serve``) in a child process over the organism
with its bundled patch:

- **off**: ``--protection merged --max-batch 1`` (one request at a time under the guard's lock, the
  merged checkpoint: the server before issue 13, and still the zero-overhead mode for protected-only
  serving);
- **on**: ``--protection rows --max-batch B --batch-wait-ms W`` (per-row protection + the request
  batcher, Gradio's queue and thread pool sized to let B requests reach the batcher at once).

Rounds alternate off, on, off, on, ...; while one server is loaded the other is paused (SIGSTOP), so
the two never compete for the CPU. Before the counted rounds each server runs the same load
``--warmup`` times (default 1) uncounted: the batched server's first run of a load meets batch shapes
it has not seen and was measured 2-3x slower than its later runs (the steady state a long-running
server is in); errors or wrong answers in a warm-up run still fail the script.

The load: ``--n`` requests with ``--concurrency`` in flight, a third protected ``/chat``, a third
unprotected ``/chat`` and a third ``/compare`` (a base and a protected row), on the organism world's
sensitive and benign passport questions (``--endpoint`` restricts it to one kind). With ``--images
K`` the load uses K distinct passport cards, each with the sensitive and the benign question (2K
distinct image + question pairs; request k asks pair k mod 2K), so that identical requests are rare:
the servers' duplicate-row merging (``--dedup``) and image feature cache (``--vision-cache``) then
save little, and the figures show batching alone. ``--server-args`` adds ``ngguard serve`` options
to both servers. Every answer is checked against the answer the guard gives alone, computed before
the load (a protected request answered by the base model, or the other way round, counts as wrong).

The client (``--client``): ``json`` (default) calls the server's JSON API (``POST /v1/chat``,
``/v1/compare``: one HTTP call per request with the image as base64 in the body, answered outside
Gradio's queue; the image is encoded once per file, by the client); ``http`` speaks Gradio's HTTP API
directly (upload the image, ``POST /gradio_api/call/<api>``, read the result from its event stream),
a few ms of CPU per request; ``gradio`` uses ``gradio_client``, which costs about as much CPU per
request as the batched server itself. On a machine whose cores the client shares with the server, a
heavy client caps every ratio; each row reports the client's and the server's CPU seconds so the
cost is visible. Both servers are driven by the same client in a run.

``--bad F`` (JSON client only): a share F of the requests are bad ones, mixed in among the good:
a question over the token limit (2000 emoji: counted in the request thread, 413), over the character
limit (413), an image that is not base64 (400), a body with an unknown field (400). Each must get its
4xx (anything else is an error); the good requests are checked as above, so a bad request that
disturbs a good one (the tokenizer race of issue 23) shows up as an error or a wrong answer.

Prints, per run: errors, wrong answers, p50 / p95 / max latency (submit to answer, queueing
included), throughput, server CPU (total and per request) and client CPU; then per round the ratios:
throughput on/off, p50 and p95 off/on, server CPU per request off/on, errors and wrong answers.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import contextlib
import http.client
import ipaddress
import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

MAX_REQUESTS = 1000
MAX_CONCURRENCY = 256
KINDS = ("protected", "base", "compare")
CLIENTS = ("json", "http", "gradio")
BAD_KINDS = ("tokens", "chars", "base64", "field")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"load_test: refusing non-loopback target {url} (loopback only)")


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def build_guard(model: str, patch: str | None, vision: str):
    """The guard to serve (--serve-only): the organism (+ bundled patch) when built, else a random
    organism-shaped model."""
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


# ---- the servers ---------------------------------------------------------------------------------------


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """``python -m serve.app OPTIONS`` on 127.0.0.1 in a child process; ``pause``/``resume`` with
    SIGSTOP/SIGCONT (so an idle server takes no CPU from the one under load)."""

    def __init__(self, name: str, options: list[str], *, max_new_tokens: int, max_queue: int):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        check_loopback(self.url)
        cmd = [sys.executable, "-m", "serve.app", "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
               "--max-new-tokens", str(max_new_tokens), "--max-queue", str(max_queue), *options]
        self.command = " ".join(["ngguard serve", *cmd[3:]])
        self._log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block logging
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._log, text=True)

    def wait_ready(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"load_test: the {self.name} server exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"load_test: the {self.name} server did not answer within {timeout:.0f} s")
            time.sleep(0.5)

    def log_tail(self, n: int = 2000) -> str:
        self._log.seek(0)
        return self._log.read()[-n:]

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def cpu(self) -> float:
        return server_cpu_seconds(self.proc.pid)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


# ---- the clients ---------------------------------------------------------------------------------------


class HttpClient:
    """Gradio's HTTP API with one keep-alive connection per thread: ``POST /gradio_api/upload``,
    ``POST /gradio_api/call/<api>`` -> event id, ``GET /gradio_api/call/<api>/<id>`` (server-sent
    events) -> the outputs."""

    def __init__(self, url: str):
        u = urlparse(url)
        self.host, self.port = u.hostname, u.port
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        return c

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> bytes:
        for attempt in (0, 1):  # a keep-alive connection the server closed: reconnect once
            c = self._conn()
            try:
                c.request(method, path, body=body, headers=headers or {})
                r = c.getresponse()
                data = r.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                c.close()
                self._local.conn = None
                if attempt:
                    raise
                continue
            if r.status != 200:
                raise RuntimeError(f"{method} {path}: HTTP {r.status}: {data[:200]!r}")
            return data
        raise AssertionError("unreachable")

    def upload(self, path: str) -> dict:
        boundary = uuid.uuid4().hex
        content = Path(path).read_bytes()
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{Path(path).name}\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
        out = json.loads(self._request("POST", "/gradio_api/upload", body,
                                       {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        return {"path": out[0], "meta": {"_type": "gradio.FileData"}, "orig_name": Path(path).name}

    def call(self, api: str, data: list) -> list:
        event = json.loads(self._request("POST", f"/gradio_api/call/{api}", json.dumps({"data": data}).encode(),
                                         {"Content-Type": "application/json"}))["event_id"]
        stream = self._request("GET", f"/gradio_api/call/{api}/{event}").decode()
        kind = None
        for line in stream.splitlines():
            if line.startswith("event: "):
                kind = line[7:].strip()
            elif line.startswith("data: ") and kind in ("complete", "error"):
                payload = json.loads(line[6:])
                if kind == "error":
                    raise RuntimeError(f"/{api}: server error {payload!r}")
                return payload
        raise RuntimeError(f"/{api}: no result in the event stream {stream[-300:]!r}")

    def chat(self, path: str, question: str, protected: bool) -> str:
        return self.call("chat", [{"text": question, "files": [self.upload(path)]}, protected])[0]

    def compare(self, path: str, question: str) -> tuple[str, str]:
        return tuple(self.call("compare", [self.upload(path), question]))


class JsonClient(HttpClient):
    """The server's JSON API (``POST /v1/chat``, ``/v1/compare``: one call per request, the image as
    base64 in the body, answered outside Gradio's queue), keep-alive connections as above."""

    def __init__(self, url: str):
        super().__init__(url)
        self._images: dict[str, str] = {}

    def _post(self, api: str, body: dict) -> dict:
        return json.loads(self._request("POST", f"/v1/{api}", json.dumps(body).encode(),
                                        {"Content-Type": "application/json"}))

    def _image(self, path: str) -> str:
        if path not in self._images:  # the client's own cost, not the server's: encode each file once
            self._images[path] = base64.b64encode(Path(path).read_bytes()).decode()
        return self._images[path]

    def chat(self, path: str, question: str, protected: bool) -> str:
        out = self._post("chat", {"image": self._image(path), "text": question, "protected": protected})
        if out["protected"] != protected:
            raise RuntimeError(f"/v1/chat: asked protected={protected}, answered protected={out['protected']}")
        return out["answer"]

    def compare(self, path: str, question: str) -> tuple[str, str]:
        out = self._post("compare", {"image": self._image(path), "text": question})
        return out["base"], out["protected"]

    def bad(self, path: str, k: int) -> bool:
        """Bad request number ``k`` (of ``BAD_KINDS``, in turn): True when it got its 4xx status."""
        body, status = {"image": self._image(path), "text": "What colour is the card?"}, 413
        kind = BAD_KINDS[k % len(BAD_KINDS)]
        if kind == "tokens":
            body["text"] = "\U0001F600" * 1999
        elif kind == "chars":
            body["text"] = "x" * 2001
        elif kind == "base64":
            body["image"], status = "not base64 !", 400
        else:
            body["colour"], status = "red", 400
        try:
            self._post("chat", body)
        except RuntimeError as e:
            return f"HTTP {status}:" in str(e)
        return False


class GradioClient:
    """The same calls through ``gradio_client``."""

    def __init__(self, url: str):
        from gradio_client import Client

        self.client = Client(url, verbose=False)

    def chat(self, path: str, question: str, protected: bool) -> str:
        from gradio_client import handle_file

        return self.client.predict({"text": question, "files": [handle_file(path)]}, protected, api_name="/chat")

    def compare(self, path: str, question: str) -> tuple[str, str]:
        from gradio_client import handle_file

        return tuple(self.client.predict(handle_file(path), question, api_name="/compare"))


# ---- the load ------------------------------------------------------------------------------------------


def reference_answers(examples, max_new_tokens: int) -> dict:
    """{example: {protected: answer}} computed alone, in this process, through transformers' own
    ``generate`` (the servers' fast decoding, duplicate merging and feature cache are not used here):
    what every answer must equal."""
    from ngguard.guard import ProtectedLVLM, load_image
    from ngguard.serving.options import SERVING
    from serve.app import organism_patch_dir

    plain = SERVING.replace(decode="generate", vision_cache=0, dedup=False)
    guard = ProtectedLVLM.from_pretrained("organism", str(organism_patch_dir()), device="cpu", serving=plain)
    want = {i: {s: guard.chat(load_image(examples[i][0]), examples[i][1], max_new_tokens=max_new_tokens, protected=s)
                for s in (False, True)} for i in range(len(examples))}
    guard.close()
    return want


def distinct_examples(k: int, folder: str) -> list[tuple[str, str]]:
    """``k`` distinct passport cards (organism world), each with the sensitive and the benign question."""
    import random

    from PIL import Image

    from ngguard.world.render import draw_card, sample_card
    from serve.app import BENIGN_Q, SENSITIVE_Q

    out = []
    for j in range(k):
        path = os.path.join(folder, f"card{j}.png")
        Image.fromarray(draw_card(sample_card("Passport", random.Random(1000 + j)))).save(path)
        out += [(path, SENSITIVE_Q), (path, BENIGN_Q)]
    return out


def run_load(client, want: dict, examples, *, n: int, concurrency: int, kinds: tuple[str, ...],
             server_cpu=lambda: 0.0, bad: float = 0.0) -> dict:
    """``n`` requests, ``concurrency`` in flight: request k asks example k % len(examples), kind
    kinds[(k // 2) % len]; with ``bad``, request k is a bad one when int(k * bad) grows at k (a share
    ``bad`` of them, spread evenly). ``server_cpu()``: the server's CPU seconds so far (read after the
    warm-up and after the load)."""

    def one(k: int) -> tuple[float, bool]:
        i, kind = k % len(examples), kinds[(k // 2) % len(kinds)]
        path, question = examples[i][0], examples[i][1]
        t = time.perf_counter()
        if bad and int((k + 1) * bad) > int(k * bad):
            return time.perf_counter() - t, client.bad(path, int(k * bad))
        if kind == "compare":
            ok = client.compare(path, question) == (want[i][False], want[i][True])
        else:
            ok = client.chat(path, question, kind == "protected") == want[i][kind == "protected"]
        return time.perf_counter() - t, ok

    for k in range(2 * len(kinds)):  # warm-up (each kind and example once), not counted
        one(k)
    lat, errors, wrong = [], [], 0
    c0, s0 = resource.getrusage(resource.RUSAGE_SELF), server_cpu()
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=concurrency) as pool:
        for fut in cf.as_completed([pool.submit(one, k) for k in range(n)]):
            try:
                seconds, ok = fut.result()
                lat.append(seconds)
                wrong += not ok
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(e).__name__}: {e}")
    wall = time.perf_counter() - t0
    c1, s1 = resource.getrusage(resource.RUSAGE_SELF), server_cpu()
    return {"errors": len(errors), "wrong": wrong, "ok": len(lat), "p50": quantile(lat, .5), "p95": quantile(lat, .95),
            "max": quantile(lat, 1.0), "wall": wall, "rps": len(lat) / wall, "first_errors": errors[:3],
            "client_cpu": (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime), "server_cpu": s1 - s0}


def serve_only(args) -> int:
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="INFO")
    from serve.app import build_app, launch, render_examples

    guard, _ = build_guard(args.model, args.patch, args.vision)
    demo = build_app(guard, examples=render_examples(), max_new_tokens=args.max_new_tokens)
    launch(demo, host="127.0.0.1", port=args.port or free_port(), block=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50, help=f"requests per run (1..{MAX_REQUESTS})")
    p.add_argument("--concurrency", type=int, default=None, help=f"requests in flight (default --n, at most "
                                                                 f"{MAX_CONCURRENCY})")
    p.add_argument("--endpoint", choices=("mixed", "chat", "compare"), default="mixed",
                   help="mixed (default): protected /chat, base /chat and /compare; chat: protected /chat only")
    p.add_argument("--servers", choices=("both", "on", "off"), default="both")
    p.add_argument("--rounds", type=int, default=2, help="off/on pairs, alternating (default 2)")
    p.add_argument("--warmup", type=int, default=1,
                   help="uncounted runs of the same load per server before the rounds (default 1; 0: none)")
    p.add_argument("--max-batch", type=int, default=64, help="the batching server's --max-batch (default 64)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--off-protection", choices=("merged", "rows"), default="merged",
                   help="--protection of the unbatched server (default merged: the pre-batching server)")
    p.add_argument("--client", choices=CLIENTS, default="json",
                   help="json (default): the JSON API /v1/chat, /v1/compare; http: Gradio's HTTP API (upload, "
                        "call, event stream); gradio: gradio_client")
    p.add_argument("--max-new-tokens", type=int, default=48, help="as `ngguard serve` (default 48)")
    p.add_argument("--images", type=int, default=None,
                   help="K distinct passport cards x 2 questions (default: one card, the demo's two questions)")
    p.add_argument("--server-args", default="",
                   help="extra `ngguard serve` options for both servers, e.g. \"--dedup off --vision-cache 0\"")
    p.add_argument("--bad", type=float, default=0.0,
                   help="share of bad requests (0..0.9, JSON client only; default 0), each must get its 4xx")
    p.add_argument("--serve-only", action="store_true", help="start the app in-process and block (no load)")
    p.add_argument("--model", default="organism", help="--serve-only: the model")
    p.add_argument("--patch", default=None, help="--serve-only: the patch")
    p.add_argument("--vision", choices=("torch", "onnx"), default="torch", help="--serve-only: vision path")
    p.add_argument("--port", type=int, default=None, help="--serve-only: the port")
    args = p.parse_args(argv)
    if args.serve_only:
        return serve_only(args)
    args.concurrency = args.concurrency or min(args.n, MAX_CONCURRENCY)
    if not 1 <= args.n <= MAX_REQUESTS or not 1 <= args.concurrency <= MAX_CONCURRENCY or args.rounds < 1 \
            or not 0 <= args.warmup <= 10:
        p.error(f"--n must be in 1..{MAX_REQUESTS}, --concurrency in 1..{MAX_CONCURRENCY}, --rounds >= 1, "
                "--warmup in 0..10")

    if not 0 <= args.bad <= 0.9 or (args.bad and args.client != "json"):
        p.error("--bad must be in 0..0.9, with --client json")

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from ngguard.organism import CHECKPOINT
    from serve.app import organism_patch_dir, render_examples

    if not (CHECKPOINT / "config.json").is_file() or not (organism_patch_dir() / "patch.json").is_file():
        raise SystemExit("load_test: the bundled organism checkpoint and patch are needed")
    kinds = {"mixed": KINDS, "chat": ("protected",), "compare": ("compare",)}[args.endpoint]
    if args.images is not None and not 1 <= args.images <= 500:
        p.error("--images must be in 1..500")
    tmp = tempfile.TemporaryDirectory(prefix="ngguard-load-")
    examples = render_examples()[:2] if args.images is None else distinct_examples(args.images, tmp.name)
    want = reference_answers(examples, args.max_new_tokens)
    extra = shlex.split(args.server_args)
    queue = max(64, 2 * args.n)
    specs = {"off": ["--protection", args.off_protection, "--max-batch", "1", *extra],
             "on": ["--protection", "rows", "--max-batch", str(args.max_batch), "--batch-wait-ms",
                    str(args.batch_wait_ms), *extra]}
    names = ["off", "on"] if args.servers == "both" else [args.servers]
    servers = {}
    try:
        for name in names:
            servers[name] = Server(name, specs[name], max_new_tokens=args.max_new_tokens, max_queue=queue)
        for s in servers.values():
            s.wait_ready()
            s.pause()
        load = os.getloadavg()[0]
        inputs = "1 card x 2 questions" if args.images is None else f"{args.images} distinct cards x 2 questions"
        print(f"organism + bundled patch; {args.n} requests, {args.concurrency} in flight; endpoint {args.endpoint}; "
              f"inputs: {inputs}; {args.warmup} uncounted warm-up run(s) per server; "
              f"client {args.client}; max_new_tokens {args.max_new_tokens}; bad requests {args.bad:.0%}; "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {os.cpu_count()} CPUs, "
              f"load average {load:.1f} at the start")
        for s in servers.values():
            print(f"  {s.name:>3}: {s.command}")
        rows, warm = [], []
        for r in range(-args.warmup, args.rounds):  # negative: warm-up runs, not counted
            for name, s in servers.items():
                s.resume()
                try:
                    client = {"json": JsonClient, "http": HttpClient, "gradio": GradioClient}[args.client](s.url)
                    x = run_load(client, want, examples, n=args.n, concurrency=args.concurrency, kinds=kinds,
                                 server_cpu=s.cpu, bad=args.bad)
                finally:
                    s.pause()
                x["label"] = f"{name} #{r + 1}" if r >= 0 else f"{name} w{r + args.warmup + 1}"
                (rows if r >= 0 else warm).append(x)
                print(f"  {x['label']:<7} done: {x['rps']:.2f} req/s, {x['errors']} errors, {x['wrong']} wrong"
                      + ("" if r >= 0 else " (warm-up, not counted)"), file=sys.stderr, flush=True)
    finally:
        for s in servers.values():
            s.close()

    print(f"\n{'run':<7} {'errors':>6} {'wrong':>5} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'req/s':>7} "
          f"{'srv CPU s':>9} {'CPU/req ms':>10} {'cli CPU s':>9} {'wall s':>7}")
    for x in rows:
        print(f"{x['label']:<7} {x['errors']:>6} {x['wrong']:>5} {x['p50']:>7.2f} {x['p95']:>7.2f} {x['max']:>7.2f} "
              f"{x['rps']:>7.2f} {x['server_cpu']:>9.1f} {1000 * x['server_cpu'] / max(1, x['ok']):>10.1f} "
              f"{x['client_cpu']:>9.1f} {x['wall']:>7.1f}")
        for e in x["first_errors"]:
            print("    error:", e)
    if len(names) == 2:
        print(f"\n{'round':<6} {'throughput on/off':>17} {'p50 off/on':>10} {'p95 off/on':>10} "
              f"{'CPU/req off/on':>14} {'errors off+on':>13} {'wrong off+on':>12}")
        for off, on in zip(rows[0::2], rows[1::2]):
            cpu = (off["server_cpu"] / max(1, off["ok"])) / max(1e-9, on["server_cpu"] / max(1, on["ok"]))
            print(f"{off['label'][-1]:<6} {on['rps'] / off['rps']:>16.2f}x {off['p50'] / on['p50']:>9.2f}x "
                  f"{off['p95'] / on['p95']:>9.2f}x {cpu:>13.2f}x {off['errors'] + on['errors']:>13} "
                  f"{off['wrong'] + on['wrong']:>12}")
        print(f"load average at the end: {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min) "
              f"on {os.cpu_count()} CPUs")
    bad = [x["label"] for x in warm if x["errors"] or x["wrong"]]
    if bad:
        print(f"errors or wrong answers in the warm-up runs {', '.join(bad)}")
    return 1 if bad or any(x["errors"] or x["wrong"] for x in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
