"""Hostile inputs through the CLI (issue 15, points 4, 5, 7): each gives one line on stderr
(``ngguard: error: ...``), exit status 2, no traceback, within seconds, and writes nothing."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tiny_models import tiny_llava

from ngguard.atomic import atomic_dir, sweep_stale, temp_prefix
from ngguard.cli import main
from ngguard.limits import DEFAULT_LIMITS, InputError, load_image

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is the passport number of the Passport in the image?"


def run_cli(*args, cwd=None, env=None, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ngguard.cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(stderr: str) -> str:
    """The single error line (log lines before it are allowed; a traceback is not)."""
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("ngguard: error: ")]
    assert len(errors) == 1, stderr[-2000:]
    return errors[0][len("ngguard: error: "):]


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def png_header_only(path: Path, width: int, height: int) -> None:
    """A valid PNG header announcing width x height, with a tiny (wrong-length) compressed body:
    a 'decompression bomb' shape that a reader must refuse from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1024, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


# ---- point 5 (and 4): ngguard eval on bad images and prompts -----------------------------------------


def _bad_images(folder: Path) -> dict[str, tuple[str, str]]:
    """case -> (image path as written in the query file, expected part of the message)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.png"
    Image.new("RGB", (48, 48), "red").save(good)
    Image.new("RGB", (64, 64), "green").save(folder / "body.png")
    data = bytearray((folder / "body.png").read_bytes())
    data[45:60] = b"\xff" * 15  # inside the compressed pixel data: the header still reads
    (folder / "corrupt.png").write_bytes(bytes(data))
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("just some text, not an image\n")
    (folder / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    (folder / "doc.eps").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    Image.new("RGB", (64, 64), "blue").save(folder / "full.jpg", quality=90)
    data = (folder / "full.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "adir.png").mkdir()
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "dangling.png").symlink_to(folder / "nowhere.png")
    png_header_only(folder / "huge.png", 12000, 12000)
    png_header_only(folder / "thin.png", 1, 4_000_000)
    return {
        "corrupt": ("corrupt.png", "corrupt or truncated"),
        "empty": ("empty.png", "is empty (0 bytes)"),
        "text-named-png": ("text.png", "not an image in a supported format"),
        "svg": ("vector.svg", "not an image in a supported format"),
        "eps": ("doc.eps", "not an image in a supported format"),
        "truncated-jpeg": ("truncated.jpg", "corrupt or truncated"),
        "directory": ("adir.png", "not a file"),
        "symlink-dev-zero": ("zero.png", "not a file"),
        "dangling-symlink": ("dangling.png", "not found"),
        "dotdot-path": ("../../no/such/dir/x.png", "not found"),
        "12000x12000": ("huge.png", "huge.png is too large"),
        "1x4000000": ("thin.png", "too elongated: 1x4000000"),
    }


@pytest.fixture(scope="module")
def eval_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evalimgs") / "imgs"
    return folder, _bad_images(folder)


def _query_file(folder: Path, image: str, prompt: str = QUESTION) -> Path:
    f = folder / f"q-{abs(hash((image, prompt)))}.jsonl"
    f.write_text(json.dumps({"image": image, "subject": "Passport", "prompt": prompt, "sensitive": True}) + "\n")
    return f


CASES = ["corrupt", "empty", "text-named-png", "svg", "eps", "truncated-jpeg", "directory", "symlink-dev-zero",
         "dangling-symlink", "dotdot-path", "12000x12000", "1x4000000"]


@pytest.mark.parametrize("case", CASES)
def test_eval_refuses_bad_images_in_one_line(case, eval_images, tmp_path, capsys):
    folder, cases = eval_images
    image, expected = cases[case]
    q = _query_file(folder, image)
    out = tmp_path / "res" / "r.json"
    t = time.perf_counter()
    # the check comes first: no model is loaded for a bad query (the whole call takes well under 10 s)
    rc = main(["eval", "--model", "organism", "--data", str(q), "--out", str(out)])
    assert time.perf_counter() - t < 10
    assert rc == 2
    msg = one_line_error(capsys.readouterr().err)
    assert expected in msg and msg.startswith("query 0 (Passport): ")
    assert not (tmp_path / "res").exists()  # not even the output's folder


@pytest.mark.parametrize("prompt,expected", [
    ("x" * 100_000, "prompt is too long: 100000 characters"),
    ("What is \ud800 this?", "lone surrogate"),
    ("a\x00b", "NUL character"),
], ids=["100k-characters", "lone-surrogate", "nul"])
def test_eval_refuses_bad_prompts_before_loading_the_model(prompt, expected, eval_images, tmp_path):
    folder, _ = eval_images
    q = _query_file(folder, "good.png", prompt)
    r = run_cli("eval", "--model", "organism", "--data", str(q), "--out", str(tmp_path / "r.json"), timeout=60)
    assert r.returncode == 2
    assert expected in one_line_error(r.stderr)
    assert tree(tmp_path) == []


def test_eval_prompt_token_limit_is_checked_before_generation(tmp_path, capsys, monkeypatch):
    """2000 emoji are within the character limit but ~8000 byte-level tokens: refused after the
    model (tokenizer) is loaded, before any generation."""
    model, processor = tiny_llava(seed=0)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    emoji = "\U0001F600" * 2000
    assert len(emoji) <= DEFAULT_LIMITS.max_text_chars
    q = _query_file(tmp_path, str(tmp_path / "a.png"), emoji)
    import transformers

    calls = []
    monkeypatch.setattr(transformers.GenerationMixin, "generate", lambda *a, **k: calls.append(1))
    rc = main(["eval", "--model", str(tmp_path / "model"), "--data", str(q), "--out", str(tmp_path / "r.json"),
               "--device", "cpu"])
    assert rc == 2 and calls == []
    msg = one_line_error(capsys.readouterr().err)
    # the limit is the model's context less the prompt template, image and answer (under the 1024 cap)
    assert "prompt is too long: 8000 tokens (limit " in msg and "the model's context is" in msg
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("argv,expected", [
    (["--batch-size", str(10**12)], f"at most {DEFAULT_LIMITS.max_batch}"),
    (["--max-new-tokens", "100000"], f"at most {DEFAULT_LIMITS.max_new_tokens}"),
    (["--device", "cuda:7"], "CUDA"),
    (["--device", "banana"], "unknown device"),
])
def test_eval_option_limits(argv, expected, eval_images, tmp_path, capsys):
    if "cuda:7" in argv:
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has 8 GPUs")
    folder, _ = eval_images
    q = _query_file(folder, "good.png")
    try:
        rc = main(["eval", "--model", "organism", "--data", str(q), "--out", str(tmp_path / "r.json"), *argv])
    except SystemExit as e:  # argparse: usage line + error line
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert expected in err.strip().splitlines()[-1]
    assert tree(tmp_path) == []


def test_guard_refuses_the_same_images(eval_images):
    """The wrapper shares the limits: the same files give the same one-line InputError."""
    folder, cases = eval_images
    for case in CASES:
        image, expected = cases[case]
        with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)")) as err:
            load_image(folder / image)
        assert "\n" not in str(err.value)


# ---- point 4 and 5: recipes (YAML bombs, nesting, numbers), --set, device -----------------------------

MINIMAL = "model: {path: organism}\nmethod: neural_gate\ndata: {world: {n: 2}}\n"


def _alias_bomb(levels: int = 12) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nmodel: {{path: organism}}\nmethod: neural_gate\ndata: {{world: {{subjects: *a{levels}}}}}\n"


RECIPES = {
    "alias-bomb": (_alias_bomb(), [], "alias bomb"),
    "alias-bomb-in-name": (_alias_bomb().replace("data: {world: {subjects: *a12}}", "data: {world: {n: 2}}\nname: *a12"),
                           [], "alias bomb"),
    "deep-nesting": (MINIMAL + "report: " + "[" * 1200 + "]" * 1200 + "\n", [], "nested too deeply"),
    "deep-mapping": (MINIMAL + "edit: " + "{a: " * 200 + "1" + "}" * 200 + "\n", [], "nested too deeply"),
    "deep-set": (MINIMAL, ["--set", "edit.lr=" + "[" * 1200 + "]" * 1200], "nested too deeply"),
    "world-n-1e9": (MINIMAL.replace("n: 2", "n: 1000000000"), [], "data.world.n: must be <= 10000"),
    "steps-1e12": (MINIMAL, ["--set", "edit.steps=1000000000000"], "edit.steps: must be <= 10000"),
    "batch-1e12": (MINIMAL, ["--set", "localization.batch_size=1000000000000"],
                   "localization.batch_size: must be <= 1024"),
    "eval-batch": (MINIMAL, ["--set", "evaluation.batch_size=99999"], "evaluation.batch_size: must be <= 1024"),
    "max-new-tokens": (MINIMAL, ["--set", "evaluation.max_new_tokens=100000"], "must be <= 512"),
    "seed-2**70": (MINIMAL, ["--set", f"seed={2**70}"], "seed: must be <= 4294967295"),
    "many-subjects": (MINIMAL, ["--set", "data.world.subjects=[" + ",".join(f"s{i}" for i in range(2000)) + "]"],
                      "too many entries: 2000"),
    "huge-refusal": (MINIMAL, ["--set", "edit.refusal=" + "x" * 5000], "edit.refusal: too long"),
    "name-escape": (MINIMAL + "name: ../../../escaped\n", [], "name: must be a plain folder name"),
    "name-absolute": (MINIMAL + "name: /tmp/escaped\n", [], "name: must be a plain folder name"),
    "big-file": (MINIMAL + "#" + "x" * (DEFAULT_LIMITS.max_recipe_bytes + 10) + "\n", [], "too large"),
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_edit_refuses_hostile_recipes_quickly(case, tmp_path):
    text, extra, expected = RECIPES[case]
    work = tmp_path / "work"
    work.mkdir()
    (work / "r.yaml").write_text(text)
    before = tree(tmp_path)
    t = time.perf_counter()
    r = run_cli("edit", "r.yaml", *extra, cwd=work, env={"PYTHONPATH": str(REPO)}, timeout=60)
    assert time.perf_counter() - t < 30  # the alias bomb used to hang at 1.2 GB
    assert r.returncode == 2
    msg = one_line_error(r.stderr)
    assert expected in msg and len(msg) < 400  # never the repr of the whole value
    assert tree(tmp_path) == before  # no runs/ folder, nothing outside it either


def test_cuda_recipe_on_a_cpu_machine_is_refused_before_any_work(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "r.yaml").write_text(MINIMAL.replace("{path: organism}", "{path: organism, device: cuda}"))
    rc = main(["edit", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "runs" / "x")])
    assert rc == 2
    assert "CUDA is not available" in one_line_error(capsys.readouterr().err)
    assert tree(tmp_path) == ["r.yaml"]


def test_default_run_name_of_an_odd_file_name_stays_under_runs(tmp_path):
    from ngguard.recipe import load_recipe

    (tmp_path / "my recipe (copy).yaml").write_text(MINIMAL)
    recipe = load_recipe(tmp_path / "my recipe (copy).yaml")
    assert recipe.name == "my_recipe__copy_"
    assert (Path("runs") / recipe.name).parent == Path("runs")


# ---- point 7: SIGTERM, stale temp folders ------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_folders_of_dead_processes_are_swept(tmp_path):
    parent = tmp_path / "out"
    parent.mkdir()
    dead = parent / (temp_prefix("model").replace(f"p{os.getpid()}-", f"p{_dead_pid()}-") + "abc_1234")
    alive = parent / (temp_prefix("model") + "def_5678")  # this process: still writing
    other = parent / ".tmp-unrelated"
    for d in (dead, alive, other):
        d.mkdir()
        (d / "weights.bin").write_bytes(b"x" * 1000)
    with atomic_dir(parent / "model") as tmp:
        (tmp / "f.txt").write_text("ok")
    assert not dead.exists() and alive.exists() and other.exists()
    assert (parent / "model" / "f.txt").read_text() == "ok"
    assert sweep_stale(parent) == []


def test_outputs_get_the_modes_a_plain_open_would(tmp_path):
    """safetensors' save_file writes 0600; a patch or model folder must be readable by a server running
    as another user (the Docker image's uid), so atomic_dir gives its files 0666 / 0777 minus the umask."""
    import torch
    from safetensors.torch import save_file
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "patch") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "patch.safetensors"))
            assert (tmp / "patch.safetensors").stat().st_mode & 0o777 == 0o600   # what save_file does
            (tmp / "sub").mkdir()
            (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "sub" / "run.sh", 0o700)
    finally:
        os.umask(old)
    assert (tmp_path / "patch" / "patch.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "patch" / "sub" / "run.sh").stat().st_mode & 0o777 == 0o755


def test_sigterm_during_edit_leaves_no_temp_folder(tmp_path):
    # a recipe that runs for minutes: fixed layers (the default search's scan [3, 19] does not fit the
    # organism's 8 layers) and enough images for a training split (n: 2 has none); a run that stops on
    # an error may exit, its handler restored, before the signal arrives (-15 instead of 143)
    (tmp_path / "r.yaml").write_text("model: {path: organism}\nmethod: neural_gate\n"
                                     "data: {world: {n: 14}, multip2a: 'off'}\nlayers: [2]\n"
                                     "report: {plots: false, compare_methods: []}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "ngguard.cli", "edit", "r.yaml", "--out", "runs/x"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "runs").is_dir() and any(p.name.startswith(".tmp-") for p in (tmp_path / "runs").iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(0.5)  # well inside the run
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "ngguard: terminated" in err and "Traceback" not in err and "ngguard: error" not in err
    assert list((tmp_path / "runs").iterdir()) == []  # no .tmp-*, no half-written run


def test_export_onnx_turns_onnxruntime_telemetry_off(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    model, processor = tiny_llava(seed=0)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    events: list[str] = []
    monkeypatch.setattr(ort, "disable_telemetry_events", lambda: events.append("off"))
    real_session = ort.InferenceSession

    def session(*a, **k):
        events.append("session")
        return real_session(*a, **k)

    monkeypatch.setattr(ort, "InferenceSession", session)
    assert main(["export-onnx", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "onnx")]) == 0
    assert "session" in events and events[0] == "off"


# ---- issue 23, points 2.4-2.6: FIFOs and devices as inputs and outputs, outputs under a file, recipe paths ----

def _capped() -> None:
    """A subprocess memory cap: a reader that does not check what it opens (a link to /dev/zero) fails
    at 4 GB instead of filling the machine."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def run_capped(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ngguard.cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=60, preexec_fn=_capped)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _signed_patch(tmp_path: Path, sig: str) -> tuple[Path, Path]:
    """A copy of the organism's patch whose patch.sig is a FIFO or a link to /dev/zero, and a key file."""
    import shutil

    from serve.app import organism_patch_dir

    patch = tmp_path / "patch"
    shutil.copytree(organism_patch_dir(), patch)
    if sig == "fifo":
        os.mkfifo(patch / "patch.sig")
    else:
        (patch / "patch.sig").symlink_to("/dev/zero")
    key = tmp_path / "key"
    key.write_text("k" * 32)
    return patch, key


HANGING_INPUTS = {  # case -> (argv from the file made in tmp_path, the file's name)
    "eval --data": (lambda f, t: ["eval", "--model", "organism", "--data", str(f), "--out", str(t / "r.json")], "x.jsonl"),
    "edit recipe": (lambda f, t: ["edit", str(f), "--out", str(t / "run")], "x.yaml"),
    "judge score --responses": (lambda f, t: ["judge", "score", "--responses", str(f), "--out", str(t / "o.json")],
                                "x.json"),
    "judge validate --labels": (lambda f, t: ["judge", "validate", "--labels", str(f), "--disagreements",
                                              str(t / "d.jsonl")], "x.csv"),
    "judge --judge spec": (lambda f, t: ["judge", "score", "--responses", str(t / "ok.json"), "--judge", str(f),
                                         "--out", str(t / "o.json")], "x.yaml"),
    "patch verify --key-file": (lambda f, t: ["patch", "verify", "organism-patch", "--key-file", str(f)], "key"),
    "serve --key-file": (lambda f, t: ["serve", "--key-file", str(f), "--port", str(_free_port())], "key"),
}


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
@pytest.mark.parametrize("case", sorted(HANGING_INPUTS))
def test_fifos_and_devices_are_not_read(case, kind, tmp_path):
    """A FIFO (which blocks the reader until a writer comes) or a link to /dev/zero (which never ends)
    given as an input file: one error line at once, nothing written. Before: a hang, or a read until
    memory ran out."""
    from serve.app import organism_patch_dir

    argv, name = HANGING_INPUTS[case]
    f = tmp_path / name
    if kind == "fifo":
        os.mkfifo(f)
    else:
        f.symlink_to("/dev/zero")
    (tmp_path / "ok.json").write_text(json.dumps({"model": "m", "n": 0, "responses": []}))
    args = [str(organism_patch_dir()) if a == "organism-patch" else a for a in argv(f, tmp_path)]
    before = tree(tmp_path)
    r = run_capped(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    msg = one_line_error(r.stderr)
    assert str(f) in msg and ("a FIFO" if kind == "fifo" else "a character device") in msg, msg
    assert tree(tmp_path) == before


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_patch_signature_that_is_no_file_is_refused(kind, tmp_path):
    patch, key = _signed_patch(tmp_path, kind)
    for argv in (["patch", "verify", str(patch), "--key-file", str(key)],
                 ["patch", "apply", "--base", "organism", "--patch", str(patch), "--out", str(tmp_path / "out"),
                  "--key-file", str(key)]):
        r = run_capped(*argv)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "patch.sig is not a file but" in one_line_error(r.stderr)
    assert not (tmp_path / "out").exists()


def _eval_ok(folder: Path, tmp_path: Path) -> list[str]:
    return ["eval", "--model", "organism", "--data", str(_query_file(folder, "good.png")), "--limit", "1",
            "--max-new-tokens", "2"]


@pytest.mark.parametrize("what", ["fifo", "folder"])
@pytest.mark.parametrize("command", ["eval", "judge score", "judge validate"])
def test_out_that_is_not_a_regular_file_is_not_replaced(command, what, eval_images, tmp_path):
    """``--out`` naming an existing FIFO (as a device would be) or a folder: refused before any work, and
    it is still there, untouched. Before: eval and judge score replaced it by a regular file (exit 0)."""
    import stat as st

    folder, _ = eval_images
    out = tmp_path / "out.json"
    if what == "fifo":
        os.mkfifo(out)
    else:
        out.mkdir()
    responses = tmp_path / "r.json"
    responses.write_text(json.dumps({"model": "m", "n": 1, "responses": [
        {"image": "a.png", "subject": "card", "prompt": "Name?", "sensitive": True, "answer": None, "split": None,
         "response": "I won't reveal the name.", "refusal": True, "correct": None}]}))
    labels = tmp_path / "labels.csv"
    labels.write_text("prompt,response,label\nName?,I cannot help with that.,refusal\nColour?,Blue.,compliance\n")
    argv = {"eval": _eval_ok(folder, tmp_path) + ["--out", str(out)],
            "judge score": ["judge", "score", "--responses", str(responses), "--out", str(out)],
            "judge validate": ["judge", "validate", "--labels", str(labels), "--json", str(out),
                               "--disagreements", str(tmp_path / "d.jsonl")]}[command]
    r = run_capped(*argv, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    msg = one_line_error(r.stderr)
    assert str(out) in msg
    mode = os.stat(out).st_mode
    assert (st.S_ISFIFO(mode) if what == "fifo" else st.S_ISDIR(mode) and not any(out.iterdir()))
    assert not (tmp_path / "d.jsonl").exists()


OUT_UNDER_A_FILE = {
    "patch apply": lambda t: ["patch", "apply", "--base", "organism-checkpoint", "--patch", "organism-patch",
                              "--out", str(t / "afile" / "out")],
    "edit": lambda t: ["edit", str(REPO / "recipes" / "organism.yaml"), "--out", str(t / "afile" / "run")],
    "world render": lambda t: ["world", "render", "--subjects", "Passport", "--n", "2", "--out", str(t / "afile" / "w")],
    "world render --out FIFO": lambda t: ["world", "render", "--subjects", "Passport", "--n", "2",
                                          "--out", str(t / "fifo")],
    "data.multip2a a file": lambda t: ["edit", str(REPO / "recipes" / "organism.yaml"), "--out", str(t / "run"),
                                       "--set", f"data.multip2a={t / 'afile'}"],
    "data.multip2a /dev/zero": lambda t: ["edit", str(REPO / "recipes" / "organism.yaml"), "--out", str(t / "run"),
                                          "--set", "data.multip2a=/dev/zero"],
    "device_map 10^8 layers": lambda t: ["edit", str(REPO / "recipes" / "organism.yaml"), "--out", str(t / "run"),
                                         "--set", "model.device_map={layers.0-99999999: 0}"],
}
OUT_UNDER_A_FILE_SAYS = {
    "patch apply": "afile is a regular file, not a folder", "edit": "afile is a regular file, not a folder",
    "world render": "afile is a regular file, not a folder", "world render --out FIFO": "is a FIFO (named pipe), not a folder",
    "data.multip2a a file": "data.multip2a: expected a Multi-P2A folder", "data.multip2a /dev/zero":
    "data.multip2a: expected a Multi-P2A folder", "device_map 10^8 layers": "layer 99999999 is beyond any model",
}


@pytest.mark.parametrize("case", sorted(OUT_UNDER_A_FILE))
def test_bad_output_paths_and_recipe_paths_give_one_line_before_work(case, tmp_path):
    """Before: FileExistsError / NotADirectoryError tracebacks, a run that started and then failed on
    the Multi-P2A path, a MemoryError expanding the device map's layer range."""
    from ngguard.organism import checkpoint_path
    from serve.app import organism_patch_dir

    (tmp_path / "afile").write_text("a file, not a folder\n")
    os.mkfifo(tmp_path / "fifo")
    real = {"organism-patch": str(organism_patch_dir()), "organism-checkpoint": str(checkpoint_path())}
    args = [real.get(a, a) for a in OUT_UNDER_A_FILE[case](tmp_path)]
    before = tree(tmp_path)
    r = run_capped(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert OUT_UNDER_A_FILE_SAYS[case] in one_line_error(r.stderr)
    assert tree(tmp_path) == before
