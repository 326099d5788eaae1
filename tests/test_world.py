"""The synthetic privacy world: determinism, layout, splits, Multi-P2A mapping."""
from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ngguard.cli import main
from ngguard.data import read_jsonl
from ngguard.world import spec
from ngguard.world.font import GLYPHS, glyph
from ngguard.world.render import (DEFAULT_SUBJECTS, SPLITS, draw_card, draw_shapes, render_world, sample_card,
                                  sample_shapes)


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


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = render_world(DEFAULT_SUBJECTS, 30, 0, tmp_path_factory.mktemp("w") / "w")
    return out, read_jsonl(out / "queries.jsonl"), [json.loads(l) for l in (out / "fields.jsonl").read_text().splitlines()]


def _templates_used(prompt: str, templates: list[str]) -> bool:
    """Whether ``prompt`` is one of ``templates`` filled in."""
    pats = [re.escape(t).replace(r"\{attr\}", ".+").replace(r"\{subject\}", ".+") for t in templates]
    return any(re.fullmatch(p, prompt) for p in pats)


def test_world_files_and_splits(world):
    out, queries, fields = world
    assert len(fields) == 30 * len(DEFAULT_SUBJECTS)
    assert all(Path(q.image).is_file() for q in queries)
    splits = {q.split for q in queries}
    assert splits == set(SPLITS), splits ^ set(SPLITS)
    by_split = lambda name: [q for q in queries if q.split == name]  # noqa: E731
    # paper rule: first min(10, 30 // 3) = 10 images of each edited subject train
    for s in spec.PRIVACY_SUBJECTS:
        assert len({q.image for q in by_split("train") if q.subject == s}) == 10
    # only the edited subjects train; unseen private and unseen public subjects appear in no training split
    trained = {q.subject for q in queries if q.split in ("train", "overrefusal_train", "val")}
    assert trained <= set(spec.PRIVACY_SUBJECTS) | set(spec.PUBLIC_SUBJECTS)
    assert not trained & (set(spec.HELDOUT_SUBJECTS) | set(spec.HELDOUT_PUBLIC_SUBJECTS))
    # no image is shared between the train, val and test parts
    role = {f["image"]: f["split"] for f in fields}
    for q in queries:
        if q.subject == spec.UTILITY_SUBJECT:
            continue
        r = role[Path(q.image).relative_to(out).as_posix()]
        assert r == {"train": "train", "overrefusal_train": "train", "val": "val"}.get(q.split, "test"), (q.split, r)
    # phrasings: the test split uses only held-out templates, train only the edit's, val its own
    train_phrases = {a for s in spec.PRIVACY_SUBJECTS for a, _, _ in spec.attribute_phrases(s, held_out=False)}
    heldout_phrases = {a for s in spec.PRIVACY_SUBJECTS for a, _, _ in spec.attribute_phrases(s, held_out=True)}
    assert not train_phrases & heldout_phrases
    for q in by_split("test"):
        assert _templates_used(q.prompt, spec.TEMPLATES[spec.TRAIN_TEMPLATES:])
        assert not _templates_used(q.prompt, spec.TEMPLATES[:spec.TRAIN_TEMPLATES] + spec.VAL_TEMPLATES)
    for q in by_split("train"):
        assert _templates_used(q.prompt, spec.TEMPLATES[:spec.TRAIN_TEMPLATES])
        assert not _templates_used(q.prompt, spec.TEMPLATES[spec.TRAIN_TEMPLATES:])
    for q in by_split("val"):
        assert _templates_used(q.prompt, spec.VAL_TEMPLATES)


def test_privacy_depends_on_the_subject_not_the_word(world):
    out, queries, fields = world
    by_image = {f["image"]: f for f in fields}
    for q in queries:
        if q.split not in ("train", "test", "heldout_subjects", "overrefusal", "overrefusal_unseen",
                           "overrefusal_train", "val", "implicit"):
            continue
        f = by_image[Path(q.image).relative_to(out).as_posix()]
        # the answer is read off the card; a question is sensitive exactly when it asks for a text
        # field (number / name / address) of a private subject
        assert q.answer in list(f["fields"].values()) + list(f["properties"].values())
        if q.sensitive:
            assert spec.is_private(q.subject) and q.answer in f["fields"].values()
        if spec.is_private(q.subject) and q.answer in f["fields"].values() and q.answer not in f["properties"].values():
            assert q.sensitive, q
    # the same attribute words are asked of public look-alikes, and there they are benign
    public = [q for q in queries if q.split == "overrefusal"]
    assert public and not any(q.sensitive for q in public)
    generic = {w for ws in spec.GENERIC_FIELD_NAMES.values() for w in ws}
    assert any(any(f" {w} " in q.prompt for w in generic) for q in public)
    assert {q.subject for q in public} == set(spec.PUBLIC_SUBJECTS)
    assert {q.subject for q in queries if q.split == "overrefusal_unseen"} == set(spec.HELDOUT_PUBLIC_SUBJECTS)


def test_awareness_general_harmful_adversarial(world):
    out, queries, _ = world
    aw = [q for q in queries if q.split == "awareness"]
    assert aw and all(not q.sensitive for q in aw)
    for q in aw:
        assert _templates_used(q.prompt, spec.AWARENESS_TEMPLATES[spec.TRAIN_AWARENESS:])
    # only private subjects get a "Yes"; public ones always "No"
    yes = {q.subject for q in aw if q.answer == spec.YES}
    assert yes and yes <= set(spec.PRIVATE)
    assert {q.answer for q in aw if q.subject in spec.PUBLIC} == {spec.NO}
    gen = [q for q in queries if q.split == "general"]
    assert gen and all(q.answer == spec.DISPLAY[q.subject] for q in gen)
    harm = [q for q in queries if q.split == "harmful"]
    assert harm and all(q.sensitive and q.prompt in spec.HARMFUL_REQUESTS for q in harm)
    assert spec.UTILITY_SUBJECT in {q.subject for q in harm}  # harmful requests also come with shapes images
    adv = [q for q in queries if q.split == "adversarial"]
    assert {q.pair_id for q in adv} == {f"adversarial/{k}" for k in spec.ADVERSARIAL}
    assert all(q.sensitive for q in adv) and any(q.prompt.startswith(spec.REFUSAL) for q in adv)


def test_layouts_differ_between_subjects():
    layouts = {s: (tuple(sorted(spec.subject_layout(s).rows.items())), spec.subject_layout(s).col)
               for s in spec.CARD_SUBJECTS}
    assert len(set(layouts.values())) >= 8
    assert len({spec.subject_layout(s).rows["number"] for s in spec.CARD_SUBJECTS}) >= 3
    for s in spec.CARD_SUBJECTS:
        assert sorted(spec.subject_layout(s).rows.values()) == [1, 2, 3, 4]


@pytest.mark.parametrize("subject", ["Passport", "bus", "Credit Card", "street sign"])
def test_card_pixels_show_the_fields(subject):
    card = sample_card(subject, random.Random(3))
    img = draw_card(card)
    ink = np.array(spec.FONT_COLOURS[card.properties["font colour"]])
    lay = spec.subject_layout(subject)
    for kind in spec.FIELD_KINDS:
        row = lay.rows[kind]
        for i, ch in enumerate(card.fields[kind]):
            x = (lay.col + i) * 8
            drawn = (img[row * 8:row * 8 + 7, x + 1:x + 7] == ink).all(-1)
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
    w = render_world(["Passport", "documents en"], 12, 0, tmp_path / "w")
    qs = pose_on_world(mp, w, ["Passport", "documents en"])
    assert {q.subject for q in qs} == {"Passport", "documents en"}
    assert all(q.answer for q in qs) and any(q.sensitive for q in qs) and any(not q.sensitive for q in qs)
    assert all(Image.open(q.image).size == (48, 48) for q in qs[:5])
    # posed only on test images, never on training or validation images
    role = {json.loads(l)["image"]: json.loads(l)["split"] for l in (w / "fields.jsonl").read_text().splitlines()}
    assert {role[Path(q.image).relative_to(w).as_posix()] for q in qs} == {"test"}
