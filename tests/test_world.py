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
    assert len([f for f in fields if f["split"] != "validation"]) == 30 * len(DEFAULT_SUBJECTS)
    assert len([f for f in fields if f["split"] == "validation"]) == \
        spec.VAL_IMAGES * len(spec.PRIVACY_SUBJECTS + spec.PUBLIC_SUBJECTS) + spec.VAL_UTILITY_IMAGES
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
        expected = "validation" if q.split in _VAL_STREAM else {"train": "train", "overrefusal_train": "train", "val": "val",
                                                                 **{x: "train" for x in _TRAIN_EXTRAS}}.get(q.split, "test")
        assert r == expected, (q.split, r)
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


# ---- the validation stream (issue 27): separate random stream, disjoint from test ---------------------
# sha256 of queries.jsonl of render_world(DEFAULT_SUBJECTS, 30, 0) before the validation stream existed
# (commit a201c5f): every split but the val_* ones must stay byte-identical
_QUERIES_BEFORE_VALIDATION_STREAM = "c0071f78f8f84b5e785928ca2ac2cf6c560785dbe4841b8ff46aa54282c5fd39"
_VAL_STREAM = ("val_pairs", "val_awareness", "val_implicit", "val_adversarial")
# sha256 of the validation-stream lines of the same world before the injected refusals were added (main at
# a3b71cd): they come from a stream of their own, so the earlier validation items stay byte-identical
_VAL_STREAM_BEFORE_INJECTION = "30a881b1ae96de1437f5083558151dfe9f0286eeba29aa7e5917e79c96a44d17"
_TRAIN_EXTRAS = ("awareness_train", "implicit_train", "adversarial_train", "general_train")


def test_validation_stream_leaves_every_other_split_byte_identical(world, tmp_path):
    out, _, _ = world
    lines = (out / "queries.jsonl").read_text().splitlines(keepends=True)
    kept = [l for l in lines if json.loads(l)["split"] not in _VAL_STREAM + _TRAIN_EXTRAS + ("val_utility",)]
    assert hashlib.sha256("".join(kept).encode()).hexdigest() == _QUERIES_BEFORE_VALIDATION_STREAM
    assert lines[:len(kept)] == kept  # the stream comes after everything else
    plain = render_world(DEFAULT_SUBJECTS, 30, 0, tmp_path / "plain", extras=False)
    assert (plain / "queries.jsonl").read_text() == "".join(kept)
    for f in (plain / "images").iterdir():  # the same images, byte for byte
        assert (out / "images" / f.name).read_bytes() == f.read_bytes()
    assert sorted(f.name for f in (out / "images").iterdir() if "_val" in f.stem) and \
        all(f.name in {g.name for g in (plain / "images").iterdir()} for f in (out / "images").iterdir() if "_val" not in f.stem)


def test_validation_stream_is_deterministic_and_seeded(tmp_path):
    a = render_world(["Passport", "bus", "Credit Card"], 4, 3, tmp_path / "a")
    b = render_world(["Passport", "bus", "Credit Card"], 4, 3, tmp_path / "b")
    c = render_world(["Passport", "bus", "Credit Card"], 4, 4, tmp_path / "c")
    assert _digest(a) == _digest(b)
    va = [q for q in read_jsonl(a / "queries.jsonl") if q.split in _VAL_STREAM]
    vc = [q for q in read_jsonl(c / "queries.jsonl") if q.split in _VAL_STREAM]
    assert va and [q.answer for q in va] != [q.answer for q in vc]
    # seen subjects only: an unseen private subject never appears in validation data
    assert {q.subject for q in va} == {"Passport", "bus"}


def test_validation_stream_is_disjoint_from_test(world):
    out, queries, fields = world
    val = [q for q in queries if q.split in _VAL_STREAM]
    other = [q for q in queries if q.split not in _VAL_STREAM + _TRAIN_EXTRAS]
    assert {q.split for q in val} == set(_VAL_STREAM)
    # images: its own files, and no pixel-identical image among the others
    digest = lambda rel: hashlib.sha256(np.asarray(Image.open(out / rel)).tobytes()).hexdigest()  # noqa: E731
    val_images = {q.image for q in val}
    assert not val_images & {q.image for q in other}
    assert not {digest(i) for i in val_images} & {digest(f["image"]) for f in fields if f["split"] != "validation"}
    # subjects: the seen ones only (never the unseen private subjects or the unseen look-alikes)
    assert {q.subject for q in val} == set(spec.PRIVACY_SUBJECTS + spec.PUBLIC_SUBJECTS)
    # phrasings: no validation prompt is a test-role prompt, and their templates are used nowhere else
    test_role = [q for q in other if q.split not in ("train", "overrefusal_train", "val", "utility_train")]
    assert not {q.prompt for q in val} & {q.prompt for q in test_role}
    for q in test_role:
        assert not _templates_used(q.prompt, spec.VAL_AWARENESS_TEMPLATES + spec.VAL_IMPLICIT_TEMPLATES)
        assert not _templates_used(q.prompt, spec.VAL_TEMPLATES)
        assert not any(w.split("{q}")[0].strip() and w.split("{q}")[0] in q.prompt or
                       w.split("{q}")[1].strip() and w.split("{q}")[1] in q.prompt for w in spec.VAL_ADVERSARIAL.values())
    # what each set asks and expects
    by = lambda name: [q for q in val if q.split == name]  # noqa: E731
    assert all(_templates_used(q.prompt, spec.VAL_AWARENESS_TEMPLATES) and q.answer in (spec.YES, spec.NO)
               and not q.sensitive for q in by("val_awareness"))
    assert {q.answer for q in by("val_awareness") if spec.is_private(q.subject)} == {spec.YES, spec.NO}
    assert {q.answer for q in by("val_awareness") if not spec.is_private(q.subject)} == {spec.NO}
    assert all(q.sensitive == spec.is_private(q.subject) for q in by("val_implicit") + by("val_adversarial"))
    assert all(spec.DISPLAY[q.subject] not in q.prompt for q in by("val_implicit"))
    assert {q.pair_id.split("/")[1] for q in by("val_adversarial")} == set(spec.VAL_ADVERSARIAL) | set(spec.VAL_INJECTION)
    pairs = by("val_pairs")
    assert {q.sensitive for q in pairs if spec.is_private(q.subject)} == {True, False}
    assert not any(q.sensitive for q in pairs if not spec.is_private(q.subject))


def test_injected_refusals_validation_only_and_earlier_items_unchanged(world):
    """The validation stream's injected refusals / answer starts (``spec.VAL_INJECTION``): on validation images
    only, in phrasings no test prompt shares (beyond the model's own refusal sentence), one per wrapper and
    image, sensitive exactly on private subjects; the validation items before them are byte-identical."""
    out, queries, fields = world
    lines = (out / "queries.jsonl").read_text().splitlines(keepends=True)
    inj_name = lambda d: d["split"] == "val_adversarial" and d["pair_id"].split("/")[1] in spec.VAL_INJECTION  # noqa: E731
    old = [l for l in lines if json.loads(l)["split"] in _VAL_STREAM and not inj_name(json.loads(l))]
    assert hashlib.sha256("".join(old).encode()).hexdigest() == _VAL_STREAM_BEFORE_INJECTION
    inj = [q for q in queries if q.split == "val_adversarial" and q.pair_id.split("/")[1] in spec.VAL_INJECTION]
    n_images = spec.VAL_IMAGES * len(spec.PRIVACY_SUBJECTS + spec.PUBLIC_SUBJECTS)
    assert len(inj) == n_images * len(spec.VAL_INJECTION)
    role = {f["image"]: f["split"] for f in fields}
    assert {role[Path(q.image).relative_to(out).as_posix()] for q in inj} == {"validation"}
    assert all(q.sensitive == spec.is_private(q.subject) for q in inj)
    assert any(spec.REFUSAL in q.prompt for q in inj)
    test_role = [q for q in queries if q.split not in _VAL_STREAM + _TRAIN_EXTRAS
                 + ("train", "overrefusal_train", "val", "utility_train")]
    assert not {q.prompt for q in inj} & {q.prompt for q in test_role}
    test_images = {q.image for q in test_role}
    assert not {q.image for q in inj} & test_images
    for w in spec.VAL_INJECTION.values():  # each wrapper's own words, with the refusal sentence taken out
        for part in w.replace(spec.REFUSAL, "{q}").split("{q}"):
            if part.strip():
                assert not any(part in q.prompt for q in test_role), part
    # the wrapped question is a validation template's
    for q in inj:
        name = q.pair_id.split("/")[1]
        pre, post = spec.VAL_INJECTION[name].split("{q}")
        assert q.prompt.startswith(pre) and q.prompt.endswith(post)
        assert _templates_used(q.prompt[len(pre):len(q.prompt) - len(post)], spec.VAL_TEMPLATES)


# sha256 of queries.jsonl / fields.jsonl of render_world(DEFAULT_SUBJECTS, 30, 0) before val_utility existed
# (main at b569ba2): with the val_utility lines / shapes_val images left out, byte-identical
_QUERIES_BEFORE_VAL_UTILITY = "7a123b301a6e379d58eb6024f2125e0ae978e2efc93bc2b06074cfb9bde23e15"
_FIELDS_BEFORE_VAL_UTILITY = "fd7aeb51d8bb30f10f54bec96f4e49acf2bd45afbf49aa6322bd1116b1676fe1"


def test_val_utility_leaves_the_world_byte_identical_and_comes_last(world):
    out, _, _ = world
    lines = (out / "queries.jsonl").read_text().splitlines(keepends=True)
    util = [json.loads(l)["split"] == "val_utility" for l in lines]
    n = len(lines) - sum(util)
    assert sum(util) == 3 * spec.VAL_UTILITY_IMAGES and all(util[n:])  # after everything else
    assert hashlib.sha256("".join(lines[:n]).encode()).hexdigest() == _QUERIES_BEFORE_VAL_UTILITY
    flines = (out / "fields.jsonl").read_text().splitlines(keepends=True)
    new = [json.loads(l)["image"].startswith("images/shapes_val") for l in flines]
    assert sum(new) == spec.VAL_UTILITY_IMAGES and all(new[len(flines) - sum(new):])
    assert hashlib.sha256("".join(flines[:len(flines) - sum(new)]).encode()).hexdigest() == _FIELDS_BEFORE_VAL_UTILITY


def test_val_utility_is_deterministic_seeded_and_disjoint_from_test(world, tmp_path):
    """The validation stream's shapes questions: images of their own (no file and no drawing shared with any
    other split), phrasings no other split uses, the right answers; the same for the same seed, not another."""
    out, queries, fields = world
    val = [q for q in queries if q.split == "val_utility"]
    other = [q for q in queries if q.split != "val_utility"]
    assert {q.subject for q in val} == {spec.UTILITY_SUBJECT} and not any(q.sensitive for q in val)
    assert len({q.image for q in val}) == spec.VAL_UTILITY_IMAGES
    assert not {q.image for q in val} & {q.image for q in other}
    digest = lambda rel: hashlib.sha256(np.asarray(Image.open(out / rel)).tobytes()).hexdigest()  # noqa: E731
    val_rel = {Path(q.image).relative_to(out).as_posix() for q in val}
    assert not {digest(r) for r in val_rel} & {digest(f["image"]) for f in fields if f["image"] not in val_rel}
    # phrasings: the validation ones only, none used by another split
    val_phrasings = {p for qs in spec.VAL_UTILITY_QUESTIONS.values() for p in qs}
    assert {q.prompt for q in val} <= val_phrasings
    assert not val_phrasings & {p for qs in spec.UTILITY_QUESTIONS.values() for p in qs}
    assert not val_phrasings & {q.prompt for q in other}
    # answers: what the image shows (fields.jsonl), one shape, colour and count question per image
    rec = {f["image"]: f for f in fields if f["image"] in val_rel}
    assert all(f["split"] == "validation" for f in rec.values())
    for q in val:
        f = rec[Path(q.image).relative_to(out).as_posix()]
        assert q.answer in (f["shape"], f["colour"], str(f["count"]))
    assert sorted(q.answer for q in val if q.prompt in spec.VAL_UTILITY_QUESTIONS["count"]) == \
        sorted(str(f["count"]) for f in rec.values())
    # deterministic in the seed
    a = render_world(["shapes"], 4, 3, tmp_path / "a")
    b = render_world(["shapes"], 4, 3, tmp_path / "b")
    c = render_world(["shapes"], 4, 4, tmp_path / "c")
    assert _digest(a) == _digest(b)
    ua, uc = ([(q.prompt, q.answer) for q in read_jsonl(w / "queries.jsonl") if q.split == "val_utility"] for w in (a, c))
    assert ua and ua != uc
    # no shapes subject, no val_utility
    d = render_world(["Passport"], 4, 3, tmp_path / "d")
    assert not [q for q in read_jsonl(d / "queries.jsonl") if q.split == "val_utility"]


def test_val_holdout_keeps_a_seen_subject_out_of_the_edit(tmp_path):
    """Leave-one-subject-out: a held-out seen subject is in no training set, and its validation
    questions are still there to measure generalisation on."""
    from ngguard.pipeline import build_sets
    from ngguard.recipe import load_recipe
    r = load_recipe(Path(__file__).parents[1] / "recipes" / "organism.yaml",
                    overrides=["data.val_holdout=[Passport, bus]", "data.world.n=12", "data.multip2a=off"])
    data = build_sets(r, tmp_path)
    assert "Passport" not in data.edit_subjects
    sets = data.splits
    assert not [q for q in sets["train"] + sets["overrefusal_train"] if q.subject in ("Passport", "bus")]
    assert {"Passport", "bus"} <= {q.subject for q in sets["val_pairs"]}
    assert {q.subject for q in sets["train"]} == set(spec.PRIVACY_SUBJECTS) - {"Passport"}
    with pytest.raises(ValueError, match="not a seen world subject"):
        load_recipe(Path(__file__).parents[1] / "recipes" / "organism.yaml", overrides=["data.val_holdout=[Credit Card]"])


def test_training_extras_on_training_images_in_the_edits_phrasings(world):
    out, queries, fields = world
    role = {f["image"]: f["split"] for f in fields}
    extras = [q for q in queries if q.split in _TRAIN_EXTRAS]
    assert {q.split for q in extras} == set(_TRAIN_EXTRAS)
    assert all(role[Path(q.image).relative_to(out).as_posix()] == "train" for q in extras)
    assert {q.subject for q in extras} == set(spec.PRIVACY_SUBJECTS + spec.PUBLIC_SUBJECTS)
    by = lambda name: [q for q in extras if q.split == name]  # noqa: E731
    assert all(_templates_used(q.prompt, spec.AWARENESS_TEMPLATES[:spec.TRAIN_AWARENESS]) and not q.sensitive
               for q in by("awareness_train"))
    assert all(_templates_used(q.prompt, spec.IMPLICIT_TEMPLATES[:spec.TRAIN_IMPLICIT]) for q in by("implicit_train"))
    assert all(q.sensitive == spec.is_private(q.subject) for q in by("implicit_train") + by("adversarial_train"))
    assert all(q.prompt in spec.GENERAL_QUESTIONS[:spec.TRAIN_GENERAL] and not q.sensitive for q in by("general_train"))
    # the edit's wrappers are neither the validation nor the test wrappers
    for w in spec.TRAIN_ADVERSARIAL.values():
        assert w not in spec.ADVERSARIAL.values() and w not in spec.VAL_ADVERSARIAL.values()
    wrapped = {q.prompt for q in queries if q.split in ("adversarial", "val_adversarial")}
    assert not wrapped & {q.prompt for q in by("adversarial_train")}


def test_edit_augment_and_awareness_retention_reach_the_edit_data(tmp_path):
    """edit.augment: [adversarial] adds the edited subjects' wrapped questions to the training pairs
    (sensitive) and the look-alikes' to their retention data; edit.retain: [awareness] names a set."""
    from ngguard.pipeline import build_sets
    from ngguard.recipe import RETAIN_SETS, load_recipe
    base = ["data.world.n=12", "data.multip2a=off"]
    recipe = Path(__file__).parents[1] / "recipes" / "organism.yaml"
    plain = build_sets(load_recipe(recipe, overrides=base), tmp_path, world_name="a").splits
    aug = build_sets(load_recipe(recipe, overrides=[*base, "edit.augment=[adversarial]"]), tmp_path, world_name="b").splits
    extra = [q for q in aug["train"] if q.split == "adversarial_train"]
    assert extra and all(q.sensitive and q.subject in spec.PRIVACY_SUBJECTS for q in extra)
    assert len(aug["train"]) == len(plain["train"]) + len(extra)
    pub = [q for q in aug["overrefusal_train"] if q.split == "adversarial_train"]
    assert pub and all(not q.sensitive and q.subject in spec.PUBLIC_SUBJECTS for q in pub)
    assert RETAIN_SETS["awareness"] in aug and all(not q.sensitive for q in aug[RETAIN_SETS["awareness"]])
