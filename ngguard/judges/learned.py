"""The learned judge (``judge: learned``): a small linear classifier over hashed word n-grams,
shipped with the package as safetensors (no pickle), trained by ``ngguard judge train``.

Features (``Featurizer``): the response is normalised like the rules read it (``rules.normalize``),
cut into word tokens (letters/digits/apostrophes; every other non-space character is a token of
its own; every number is the token ``0``), and the first ``max_words`` tokens give hashed
n-grams up to ``ngrams``; the first
``opening_words`` tokens give them again, marked as the opening (refusals live there). Each
feature is ``crc32(text) % buckets`` (zlib: the same on every machine), counted once per answer.

Model: multinomial logistic regression over ``LABELS`` (``refusal`` / ``partial`` /
``compliance``), ``scores = W[features].sum(0) + b`` (Eq. "softmax regression"; no normalisation
needed for the argmax). Training (``train``) is full-batch Adam on CPU from zero weights with L2,
in a fixed order: the same rows and settings give the same weights bit for bit on the same
machine (checked by the tests). Inference is numpy only.

``info()`` carries a fingerprint: sha256 over the weights, the bias and the featurizer settings
(everything that decides a label), like the model judges fingerprint their checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ngguard.judges.base import LABELS, _JudgeBase, check_batch
from ngguard.judges.rules import normalize
from ngguard.limits import read_regular_file

BUNDLED = Path(__file__).resolve().parent / "learned.safetensors"
FORMAT = "ngguard-learned-judge/1"
MAX_WEIGHTS_BYTES = 64 << 20  # the bundled file is 1.6 MB; a weights file past this is refused unread
_TOKEN = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")
_DIGITS = re.compile(r"\d+")  # every number is the token "0": what matters is that a value is given


@dataclass(frozen=True)
class Featurizer:
    """Hashed word n-gram features of one response (see the module docstring)."""

    buckets: int = 1 << 17
    max_words: int = 120
    opening_words: int = 30
    ngrams: int = 2

    def __post_init__(self) -> None:
        for name in ("buckets", "max_words", "opening_words", "ngrams"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"learned judge featurizer: {name} must be a positive integer, got {v!r}")

    def features(self, text: str | None) -> np.ndarray:
        """Unique bucket indices (int64) of ``text``'s features; an empty answer has the single
        feature ``<empty>``."""
        toks = _TOKEN.findall(_DIGITS.sub("0", normalize(text)))[: self.max_words]
        grams = [] if toks else ["<empty>"]
        for n in range(1, self.ngrams + 1):
            g_n = toks if n == 1 else [" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1)]
            grams += [f"{n}:{g}" for g in g_n]
            grams += [f"o{n}:{g}" for g in g_n[: max(0, self.opening_words - n + 1)]]
        b = self.buckets
        return np.fromiter({zlib.crc32(g.encode()) % b for g in grams}, dtype=np.int64)


@dataclass
class LearnedJudge(_JudgeBase):
    """Softmax regression over ``Featurizer`` features; ``weight`` [buckets, 3], ``bias`` [3]."""

    weight: np.ndarray
    bias: np.ndarray
    featurizer: Featurizer = field(default_factory=Featurizer)
    path: str = ""
    meta: dict = field(default_factory=dict)
    _fingerprint: str = field(default="", repr=False)

    def scores(self, responses: Sequence[str | None]) -> np.ndarray:
        """[N, 3] class scores (logits) in ``LABELS`` order."""
        rows = [self.featurizer.features(r) for r in responses]
        starts = np.cumsum([0] + [len(x) for x in rows[:-1]])
        return np.add.reduceat(self.weight[np.concatenate(rows)], starts, axis=0) + self.bias  # [N, 3]

    def labels(self, responses: Sequence[str | None], prompts: Sequence[str | None] | None = None) -> list[str]:
        check_batch(responses, prompts, "learned judge")
        if not len(responses):
            return []
        return [LABELS[i] for i in self.scores(responses).argmax(1).tolist()]

    def info(self) -> dict:
        return {"kind": "learned", "name": f"learned:{Path(self.path).stem}" if self.path else "learned (in memory)",
                "path": self.path, "fingerprint": self._fingerprint or self.fingerprint()}

    def config(self) -> "TrainConfig":
        """The training configuration these weights were trained with (from their metadata)."""
        raw = dict(self.meta.get("config") or {})
        raw.pop("featurizer", None)
        return TrainConfig(featurizer=self.featurizer,
                           **{k: v for k, v in raw.items() if k in ("l2", "steps", "lr", "balanced")})

    def refit(self, responses: Sequence[str], labels: Sequence[str]) -> "LearnedJudge":
        """A new judge trained on (responses, labels) with this judge's configuration
        (``ngguard judge validate --cross``)."""
        return train(responses, labels, self.config(), {"refit_of": self.info()["fingerprint"]})

    def fingerprint(self) -> str:
        """sha256 over the weights, the bias and the featurizer settings (what decides a label)."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.weight, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(self.bias, dtype=np.float32).tobytes())
        h.update(json.dumps(asdict(self.featurizer), sort_keys=True).encode())
        return h.hexdigest()[:16]

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the weights as safetensors (featurizer settings and ``meta`` as JSON metadata),
        atomically."""
        from safetensors.numpy import save

        from ngguard.data import atomic_write_bytes

        metadata = {"format": FORMAT, "labels": json.dumps(list(LABELS)),
                    "featurizer": json.dumps(asdict(self.featurizer), sort_keys=True),
                    "meta": json.dumps(self.meta, sort_keys=True, ensure_ascii=True)}
        data = save({"weight": np.ascontiguousarray(self.weight, dtype=np.float32),
                     "bias": np.ascontiguousarray(self.bias, dtype=np.float32)}, metadata=metadata)
        return atomic_write_bytes(path, data, mode=0o644)  # a data file like any other

    @classmethod
    def load(cls, path: str | Path | None = None) -> "LearnedJudge":
        """The weights file at ``path`` (default: the one bundled with the package)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        p = Path(path).expanduser() if path else BUNDLED
        if not p.exists():
            hint = " (the bundled weights are missing: run `ngguard judge train`)" if p == BUNDLED else ""
            raise FileNotFoundError(f"{p}: learned judge weights not found{hint}")
        raw = read_regular_file(p, MAX_WEIGHTS_BYTES, what="learned judge weights")  # never a FIFO or /dev/zero
        try:
            tensors = load(raw)
            n = int.from_bytes(raw[:8], "little")
            metadata = json.loads(raw[8:8 + n]).get("__metadata__") or {}
        except (SafetensorError, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: not a learned judge weights file ({str(e).splitlines()[0]})") from None
        if metadata.get("format") != FORMAT or set(tensors) != {"weight", "bias"}:
            raise ValueError(f"{p}: not a learned judge weights file (format {metadata.get('format')!r})")
        try:
            feat = Featurizer(**json.loads(metadata["featurizer"]))
            labels = tuple(json.loads(metadata["labels"]))
            meta = json.loads(metadata.get("meta", "{}"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{p}: learned judge metadata is unreadable ({e})") from None
        w, b = tensors["weight"], tensors["bias"]
        if labels != LABELS or w.shape != (feat.buckets, len(LABELS)) or b.shape != (len(LABELS),):
            raise ValueError(f"{p}: learned judge weights have shape {w.shape}, expected ({feat.buckets}, {len(LABELS)}) "
                             f"for labels {', '.join(LABELS)}")
        judge = cls(w, b, feat, str(p), meta)
        judge._fingerprint = judge.fingerprint()
        return judge


# ---- training -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """What ``train`` fits: the featurizer, L2 strength, Adam steps and learning rate, and whether
    classes are weighted by inverse frequency (partial refusals are rare)."""

    featurizer: Featurizer = field(default_factory=Featurizer)
    l2: float = 1e-5
    steps: int = 300
    lr: float = 0.05
    balanced: bool = True

    def to_dict(self) -> dict:
        return {**asdict(self), "featurizer": asdict(self.featurizer)}


def train(responses: Sequence[str], labels: Sequence[str], config: TrainConfig = TrainConfig(),
          meta: Mapping | None = None) -> LearnedJudge:
    """Fit ``LearnedJudge`` on (response, label) pairs: full-batch Adam from zero weights, CPU,
    deterministic (fixed order, no sampling, deterministic torch kernels)."""
    import torch

    if len(responses) != len(labels) or not responses:
        raise ValueError(f"learned judge: {len(responses)} responses and {len(labels)} labels (need the same, > 0)")
    bad = sorted({lab for lab in labels if lab not in LABELS})
    if bad:
        raise ValueError(f"learned judge: unknown label {bad[0]!r} (labels: {', '.join(LABELS)})")
    feat = config.featurizer
    rows = [feat.features(r) for r in responses]
    offsets = torch.tensor(np.cumsum([0] + [len(x) for x in rows[:-1]]), dtype=torch.long)
    flat = torch.from_numpy(np.concatenate(rows))
    y = torch.tensor([LABELS.index(lab) for lab in labels], dtype=torch.long)
    counts = torch.bincount(y, minlength=len(LABELS)).float()
    cw = (len(y) / (len(LABELS) * counts.clamp(min=1))) if config.balanced else torch.ones(len(LABELS))
    cw = torch.where(counts > 0, cw, torch.zeros_like(cw))
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        emb = torch.nn.EmbeddingBag(feat.buckets, len(LABELS), mode="sum")
        torch.nn.init.zeros_(emb.weight)
        bias = torch.zeros(len(LABELS), requires_grad=True)
        opt = torch.optim.Adam([emb.weight, bias], lr=config.lr)
        loss_fn = torch.nn.CrossEntropyLoss(weight=cw)
        for _ in range(config.steps):
            opt.zero_grad()
            logits = emb(flat, offsets) + bias  # [N, 3]
            loss = loss_fn(logits, y) + config.l2 * emb.weight.pow(2).sum()
            loss.backward()
            opt.step()
    finally:
        torch.use_deterministic_algorithms(prev)
    judge = LearnedJudge(emb.weight.detach().numpy().copy(), bias.detach().numpy().copy(), feat,
                         meta={"config": config.to_dict(), "n_train": len(y), **(meta or {})})
    return judge
