"""Exact reuse across runs: the stages of a run that do not depend on the edit, stored under a
fingerprint of everything they read, so that a sweep over edit settings does not redo them.

- the base model's answers before the edit (every evaluated split, and the original answers the edit
  keeps): they depend on the model's weights, the queries (prompt, fields and the image's bytes), the
  generation settings (``evaluation.max_new_tokens`` / ``batch_size``, ``edit.max_answer_words``) and
  the code. The judge is not part of it: the stored answers are judged again by the run's judge.
- the localization of a layer (Eq. 1-5): the model, the samples (images, questions, original
  answers), the layer, the ``localization`` section, the edit's refusal and alpha, and the code.

Every fingerprint includes the sha256 of the package's source (any code change recomputes) and a
format number. Entries are folders written atomically (``atomic.atomic_dir``): ``key.json`` (what was
fingerprinted, for a reader) and ``value.json`` or ``value.safetensors``; never pickle. The root is
``$NGGUARD_CACHE`` (else ``$XDG_CACHE_HOME/ngguard`` or ``~/.cache/ngguard``) + ``/runs``; ``ngguard
edit --no-cache`` (``run_recipe(cache=False)``) turns it off.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from loguru import logger
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir

FORMAT = 1  # bump when what is stored changes meaning


def default_root() -> Path:
    root = os.environ.get("NGGUARD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ngguard"
    return Path(root) / "runs"


def _plain(x: Any) -> Any:
    """JSON-able: dataclasses as dicts, tuples as lists, anything else by its repr."""
    if is_dataclass(x) and not isinstance(x, type):
        return _plain(asdict(x))
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x if isinstance(x, (str, int, float, bool, type(None))) else repr(x)


def digest(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts``."""
    return hashlib.sha256(json.dumps(_plain(list(parts)), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_CODE: str | None = None


def code_fingerprint() -> str:
    """sha256 over the source of every module of the package (sorted by path)."""
    global _CODE
    if _CODE is None:
        h = hashlib.sha256()
        root = Path(__file__).resolve().parent
        for p in sorted(root.rglob("*.py")):
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
        _CODE = h.hexdigest()
    return _CODE


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the config and every parameter and buffer (name, dtype, shape, bytes) as loaded, and
    where each lives (a device can change the numbers)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{t.device.type}".encode())
        if t.numel() and t.device.type != "meta":
            h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file_sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def queries_fingerprint(queries: Sequence) -> str:
    """sha256 over each query's fields except the image path, and the image file's bytes."""
    shas: dict[str, str] = {}
    rows = []
    for q in queries:
        d = q.to_dict()
        path = d.pop("image")
        shas[path] = shas.get(path) or _file_sha(path)
        rows.append([d, shas[path]])
    return digest(rows)


def samples_fingerprint(samples: Sequence) -> str:
    """sha256 over each sample's subject, questions, original answers and image pixels."""
    h = hashlib.sha256()
    for s in samples:
        h.update(digest(s.subject, s.sensitive, s.benign).encode())
        h.update(f"{s.image.mode}{s.image.size}".encode() + s.image.tobytes())
    return h.hexdigest()


class StageCache:
    """Folders ``root/kind/key`` holding one stored value each (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None, *, enabled: bool = True):
        self.root, self.enabled = Path(root) if root is not None else default_root(), enabled
        self.hits: list[str] = []
        self._models: dict[int, str] = {}

    def model_fingerprint(self, adapter) -> str:
        """``model_fingerprint`` of the adapter's model, computed once per run (the weights it is taken
        of: the loaded model; every edit is restored before the next stage reads it)."""
        if id(adapter) not in self._models:
            self._models[id(adapter)] = model_fingerprint(adapter.model) if self.enabled else ""
        return self._models[id(adapter)]

    def key(self, kind: str, *parts: Any) -> tuple[str, str, Any]:
        """(kind, the fingerprint, what it covers) for ``parts`` + the code and format."""
        return kind, digest(FORMAT, code_fingerprint(), *parts), parts

    def _folder(self, key: tuple[str, str, Any]) -> Path:
        return self.root / key[0] / key[1]

    def load_json(self, key) -> Any | None:
        f = self._folder(key) / "value.json"
        if not self.enabled or not f.is_file():
            return None
        self.hits.append(key[0])
        logger.info(f"cache: {key[0]} reused ({self._folder(key)})")
        return json.loads(f.read_text())

    def save_json(self, key, value: Any) -> None:
        self._save(key, lambda tmp: (tmp / "value.json").write_text(json.dumps(value)))

    def load_tensors(self, key) -> tuple[dict[str, torch.Tensor], dict] | None:
        folder = self._folder(key)
        if not self.enabled or not (folder / "value.safetensors").is_file():
            return None
        self.hits.append(key[0])
        logger.info(f"cache: {key[0]} reused ({folder})")
        return load_file(str(folder / "value.safetensors")), json.loads((folder / "meta.json").read_text())

    def save_tensors(self, key, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        def write(tmp: Path) -> None:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "value.safetensors"))
            (tmp / "meta.json").write_text(json.dumps(meta))
        self._save(key, write)

    def _save(self, key, write) -> None:
        folder = self._folder(key)
        if not self.enabled or folder.exists():
            return
        try:
            with atomic_dir(folder) as tmp:
                (tmp / "key.json").write_text(json.dumps({"kind": key[0], "format": FORMAT, "code": code_fingerprint(),
                                                          "parts": _plain(key[2])}, indent=1))
                write(tmp)
        except (OSError, ValueError) as e:  # a full disk or a concurrent writer: the run goes on without it
            logger.warning(f"cache: {key[0]} not stored ({e})")
