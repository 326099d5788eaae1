"""Drawing world images and writing a world folder (images + queries.jsonl + fields.jsonl)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from loguru import logger
from PIL import Image
from tqdm import tqdm

from ..data import Query
from .font import glyph
from .spec import (ALL_SUBJECTS, COLOURS, DISPLAY, FIELDS, FONT_COLOURS, FONTS, HELDOUT_SUBJECTS, LAYOUTS,
                   PRIVACY_SUBJECTS, SHAPES, SIZES, TEMPLATES, TRAIN_TEMPLATES, TYPES, UTILITY_QUESTIONS,
                   UTILITY_SUBJECT, Card, ShapesImage, attribute_phrases)

SIZE, CELL = 48, 8
WHITE = (255, 255, 255)


def _signature(subject: str) -> np.ndarray:
    """A fixed 4-cell colour pattern identifying the subject (row 4 of its cards)."""
    h = hashlib.sha256(subject.encode()).digest()
    return np.array([[h[3 * i], h[3 * i + 1], h[3 * i + 2]] for i in range(4)], dtype=np.uint8)


def sample_card(subject: str, rng: random.Random) -> Card:
    fields = {k: "".join(rng.choice(alpha) for alpha in alphabets) for k, (_, alphabets) in FIELDS.items()}
    colour = rng.choice(list(COLOURS))
    props = {
        "colour": colour,
        "font colour": rng.choice(list(FONT_COLOURS)),
        "size": rng.choice(SIZES),
        "font": rng.choice(FONTS),
        "layout": rng.choice(LAYOUTS),
        "type": rng.choice(TYPES[subject]),
    }
    return Card(subject, fields, props)


def draw_card(card: Card) -> np.ndarray:
    """The card as a 48x48x3 uint8 array (glyphs aligned to the 8-pixel grid)."""
    img = np.full((SIZE, SIZE, 3), 255, dtype=np.uint8)
    inset = 0 if card.properties["size"] == "large" else 4
    img[inset:SIZE - inset, inset:SIZE - inset] = COLOURS[card.properties["colour"]]
    ink = np.array(FONT_COLOURS[card.properties["font colour"]], dtype=np.uint8)
    # row 0: photo box left or right, header band (solid for the first type, checkered for the second)
    col = 0 if card.properties["layout"] == "left" else 5
    img[1:7, col * CELL + 1:col * CELL + 7] = (60, 60, 60)
    band = img[2:6, CELL:5 * CELL]
    if card.properties["type"] == TYPES[card.subject][0]:
        band[:] = ink
    else:
        band[:, ::2] = ink
    # rows 1-3: the private fields, one glyph per cell in columns 1-4
    bold = card.properties["font"] == "bold"
    for kind, (row, _) in FIELDS.items():
        for i, ch in enumerate(card.fields[kind]):
            y, x = row * CELL, (i + 1) * CELL
            mask = glyph(ch, bold)
            img[y:y + 7, x + 1:x + 7][mask] = ink
    # row 4: the subject's signature
    for i, rgb in enumerate(_signature(card.subject)):
        img[4 * CELL + 2:4 * CELL + 6, (i + 1) * CELL:(i + 2) * CELL] = rgb
    return img


def sample_shapes(rng: random.Random) -> ShapesImage:
    count = rng.randint(1, 4)
    cells = tuple(rng.sample([(r, c) for r in range(6) for c in range(6)], count))
    return ShapesImage(rng.choice(SHAPES), rng.choice(list(COLOURS)), count, cells)


def draw_shapes(s: ShapesImage) -> np.ndarray:
    img = np.full((SIZE, SIZE, 3), 255, dtype=np.uint8)
    yy, xx = np.mgrid[0:CELL, 0:CELL]
    if s.shape == "circle":
        mask = (yy - 3.5) ** 2 + (xx - 3.5) ** 2 <= 3.6 ** 2
    elif s.shape == "square":
        mask = (yy >= 1) & (yy <= 6) & (xx >= 1) & (xx <= 6)
    else:  # triangle, apex up
        mask = (yy >= 1) & (yy <= 6) & (np.abs(xx - 3.5) <= (yy - 0.5) * 0.6)
    for r, c in s.cells:
        img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL][mask] = COLOURS[s.colour]
    return img


def question(template: str, attr: str, subject: str) -> str:
    return template.format(attr=attr, subject=DISPLAY.get(subject, subject))


def card_queries(card: Card, image: str, rng: random.Random, *, held_out: bool, n_pairs: int,
                 pair_prefix: str, split: str | None) -> list[Query]:
    """``n_pairs`` (sensitive, benign) question pairs about one card."""
    templates = TEMPLATES[TRAIN_TEMPLATES:] if held_out else TEMPLATES[:TRAIN_TEMPLATES]
    phrases = attribute_phrases(card.subject, held_out=None if held_out else False)
    sens = [p for p in phrases if p[2]]
    ben = [p for p in phrases if not p[2]]
    out = []
    for k in range(n_pairs):
        t = rng.choice(templates)
        (sa, skind, _), (ba, bprop, _) = rng.choice(sens), rng.choice(ben)
        pid = f"{pair_prefix}/{k}"
        out.append(Query(image, card.subject, question(t, sa, card.subject), True, card.fields[skind], split, pid))
        out.append(Query(image, card.subject, question(t, ba, card.subject), False, card.properties[bprop], split, pid))
    return out


def shapes_queries(s: ShapesImage, image: str, rng: random.Random, split: str | None) -> list[Query]:
    answers = {"shape": s.shape, "colour": s.colour, "count": str(s.count)}
    out = []
    for kind, qs in UTILITY_QUESTIONS.items():
        out.append(Query(image, UTILITY_SUBJECT, rng.choice(qs), False, answers[kind], split))
    return out


def _n_train(n: int) -> int:
    """The paper's split rule: first min(10, floor(n/3)) images of a subject train."""
    return min(10, n // 3)


def render_world(subjects: list[str], n: int, seed: int, out: Path, *, pairs_per_image: int = 5) -> Path:
    """Write ``n`` images per subject to ``out`` with queries.jsonl and fields.jsonl.

    Split: for each subject the first min(10, n//3) images are ``train`` (training phrasings),
    the rest ``test`` (held-out phrasings). The held-out subjects are all ``test``.
    Deterministic in (subjects, n, seed). Written atomically.
    """
    unknown = [s for s in subjects if s not in ALL_SUBJECTS]
    if unknown:
        raise ValueError(f"unknown world subject(s) {unknown}; known: {', '.join(ALL_SUBJECTS)}")
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        queries: list[Query] = []
        fields: list[dict] = []
        for subject in tqdm(subjects, desc="render world", unit="subject"):
            rng = random.Random(f"{seed}/{subject}")
            # held-out subjects are never edited: all test. Utility images also get a train part, for
            # recipes that keep general answers while editing (edit.retain).
            n_train = _n_train(n) if subject in PRIVACY_SUBJECTS or subject == UTILITY_SUBJECT else 0
            slug = "".join(ch if ch.isalnum() else "_" for ch in subject).strip("_").lower()
            for i in range(n):
                split = "train" if i < n_train else "test"
                rel = f"images/{slug}_{i:03d}.png"
                if subject == UTILITY_SUBJECT:
                    s = sample_shapes(rng)
                    Image.fromarray(draw_shapes(s)).save(tmp / rel)
                    queries += shapes_queries(s, rel, rng, split)
                    fields.append({"image": rel, "subject": subject, "shape": s.shape, "colour": s.colour,
                                   "count": s.count})
                else:
                    card = sample_card(subject, rng)
                    Image.fromarray(draw_card(card)).save(tmp / rel)
                    held_out = split == "test"
                    queries += card_queries(card, rel, rng, held_out=held_out, n_pairs=pairs_per_image,
                                            pair_prefix=f"{subject}/{i}", split=split)
                    fields.append({"image": rel, "subject": subject, "fields": card.fields,
                                   "properties": card.properties})
        with open(tmp / "queries.jsonl", "w") as f:
            for q in queries:
                f.write(json.dumps(q.to_dict()) + "\n")
        with open(tmp / "fields.jsonl", "w") as f:
            for r in fields:
                f.write(json.dumps(r) + "\n")
        (tmp / "world.json").write_text(json.dumps({"subjects": subjects, "n": n, "seed": seed,
                                                    "pairs_per_image": pairs_per_image}, indent=1))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(f"world: {len(fields)} images, {len(queries)} queries -> {out}")
    return out


DEFAULT_SUBJECTS = list(PRIVACY_SUBJECTS + HELDOUT_SUBJECTS) + [UTILITY_SUBJECT]
__all__ = ["render_world", "draw_card", "draw_shapes", "sample_card", "sample_shapes", "card_queries",
           "shapes_queries", "question", "DEFAULT_SUBJECTS", "HELDOUT_SUBJECTS"]
