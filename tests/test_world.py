"""The synthetic privacy world: determinism, layout, splits, Multi-P2A mapping."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ngguard.cli import main
from ngguard.data import read_jsonl
from ngguard.world import spec
from ngguard.world.font import GLYPHS, glyph
from ngguard.world.render import DEFAULT_SUBJECTS, draw_card, draw_shapes, render_world, sample_card, sample_shapes


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_render_is_deterministic_by_seed(tmp_path):
    a = render_world(["Passport", "shapes"], 4, 7, tmp_path / "a")
    b = render_world(["Passport", "shapes"], 4, 7, tmp_path / "b")
    c = render_world(["Passport", "shapes"], 4, 8, tmp_path / "c")
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_world_files_and_split(tmp_path):
    out = render_world(DEFAULT_SUBJECTS, 12, 0, tmp_path / "w")
    queries = read_jsonl(out / "queries.jsonl")
    fields = [json.loads(l) for l in (out / "fields.jsonl").read_text().splitlines()]
    assert len(fields) == 12 * len(DEFAULT_SUBJECTS)
    assert all(Path(q.image).is_file() for q in queries)
    # paper rule: first min(10, 12 // 3) = 4 images of each PrivacyPair subject train, held-out subjects all test
    for s in spec.PRIVACY_SUBJECTS:
        imgs = {q.image for q in queries if q.subject == s and q.split == "train"}
        assert len(imgs) == 4
    assert not [q for q in queries if q.subject in spec.HELDOUT_SUBJECTS and q.split == "train"]
    # held-out phrasings only in the test split
    heldout_t = [t.split("{attr}")[0] for t in spec.TEMPLATES[spec.TRAIN_TEMPLATES:]]
    train_prompts = [q.prompt for q in queries if q.split == "train"]
    assert not any(p.startswith(h) and h for p in train_prompts for h in heldout_t if len(h) > 12)
    # every sensitive answer is a value printed on its image; pairs share an image
    by_image = {f["image"]: f for f in fields}
    for q in queries:
        f = by_image[Path(q.image).relative_to(out).as_posix()]
        if q.sensitive:
            assert q.answer in f["fields"].values()
    pairs = {}
    for q in queries:
        if q.pair_id:
            pairs.setdefault(q.pair_id, []).append(q)
    assert all(len(v) == 2 and v[0].sensitive != v[1].sensitive and v[0].image == v[1].image for v in pairs.values())


def test_card_pixels_show_the_fields():
    card = sample_card("Passport", random.Random(3))
    img = draw_card(card)
    ink = np.array(spec.FONT_COLOURS[card.properties["font colour"]])
    for kind, (row, _) in spec.FIELDS.items():
        for i, ch in enumerate(card.fields[kind]):
            cell = img[row * 8:row * 8 + 7, (i + 1) * 8 + 1:(i + 1) * 8 + 7]
            drawn = (cell == ink).all(-1)
            assert (drawn == glyph(ch, card.properties["font"] == "bold")).all()


def test_glyphs_are_distinct():
    flat = {c: g.tobytes() for c, g in GLYPHS.items()}
    assert len(set(flat.values())) == len(flat) == 36


def test_shapes_count_matches_pixels():
    s = sample_shapes(random.Random(1))
    img = draw_shapes(s)
    occupied = {(r, c) for r in range(6) for c in range(6) if (img[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] != 255).any()}
    assert occupied == set(s.cells) and len(occupied) == s.count


@pytest.mark.parametrize("attr,sensitive,expected", [
    ("Passport Number", True, "number"), ("owner's home address", True, "address"),
    ("personal name", True, "name"), ("owner's occupation", True, "number"),
    ("font color", False, "font colour"), ("color", False, "colour"), ("size", False, "size"),
    ("photo placement", False, "layout"), ("material", False, "type"), ("font style", False, "font"),
])
def test_multip2a_attribute_mapping(attr, sensitive, expected):
    assert spec.map_attribute(attr, sensitive) == expected


def test_benign_attribute_recovered_from_prompt():
    assert spec.benign_attribute_of("What is the font color of the Passport in this picture?", "Passport") == "font color"
    assert spec.benign_attribute_of("Regarding the document in the image, please tell me its format.",
                                    "documents en") == "format"


def test_cli_world_render_and_bad_subject(tmp_path, capsys):
    assert main(["world", "render", "--subjects", "Passport,shapes", "--n", "2", "--seed", "1",
                 "--out", str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / "queries.jsonl").is_file()
    assert main(["world", "render", "--subjects", "Pasport", "--n", "2", "--seed", "1",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "unknown world subject" in err[-1] and not (tmp_path / "x").exists()


def test_multip2a_questions_posed_on_world(tmp_path):
    from ngguard.pipeline import find_shared_multip2a
    from ngguard.world.multip2a import pose_on_world
    mp = find_shared_multip2a()
    if mp is None:
        pytest.skip("shared Multi-P2A data not present")
    w = render_world(["Passport", "documents en"], 6, 0, tmp_path / "w")
    qs = pose_on_world(mp, w, ["Passport", "documents en"])
    assert {q.subject for q in qs} == {"Passport", "documents en"}
    assert all(q.answer for q in qs) and any(q.sensitive for q in qs) and any(not q.sensitive for q in qs)
    assert all(Image.open(q.image).size == (48, 48) for q in qs[:5])
