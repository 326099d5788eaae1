import json
import os
from pathlib import Path

import pytest

from ngguard.data import (
    PRIVACYPAIR_SUBJECTS,
    DataError,
    Query,
    load_queries,
    paper_split,
    read_counterfact,
    read_jsonl,
    read_multip2a,
    write_jsonl,
)

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    env = os.environ.get("NGGUARD_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def multip2a_dir() -> Path:
    d = shared_dir() / "data" / "multi-p2a"
    if not (d / "multi_p2a_leakage_sen.json").exists():
        pytest.skip(f"Multi-P2A data not found at {d} (set NGGUARD_SHARED)")
    return d


# --------------------------------------------------------------------------------- JSONL
def test_round_trip(tmp_path):
    ext = tmp_path / "elsewhere" / "x.png"
    qs = [
        Query(image=str(tmp_path / "data" / "img" / "a.png"), subject="passport",
              prompt="What is the number of the passport?", sensitive=True, answer="X123",
              split="train", pair_id="p0"),
        Query(image=str(ext), subject="passport", prompt="What colour is the passport?",
              sensitive=False),
    ]
    out = tmp_path / "data" / "q.jsonl"
    write_jsonl(out, qs)
    lines = out.read_text().splitlines()
    assert json.loads(lines[0])["image"] == os.path.join("img", "a.png")  # written relative
    assert "answer" not in json.loads(lines[1])  # None fields are left out
    assert read_jsonl(out) == qs
    assert load_queries(out) == qs
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_relative_image_resolves_against_file_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "q.jsonl"
    f.write_text(json.dumps({"image": "../im/a.png", "subject": "s", "prompt": "p", "sensitive": False}) + "\n\n")
    (q,) = read_jsonl(f)
    assert q.image == str(tmp_path / "im" / "a.png")
    assert q.answer is None and q.split is None


GOOD = {"image": "a.png", "subject": "passport", "prompt": "p?", "sensitive": True}


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"image": "a.png", "subject": ', "invalid JSON"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "prompt"}), "field 'prompt' is missing"),
        (json.dumps({**GOOD, "sensitive": "yes"}), "field 'sensitive' must be bool, got str"),
        (json.dumps({**GOOD, "answer": 42}), "field 'answer' must be str, got int"),
        (json.dumps({**GOOD, "subject": True}), "field 'subject' must be str, got bool"),
        (json.dumps({**GOOD, "image": "  "}), "field 'image' must not be empty"),
        (json.dumps([1, 2]), "expected a JSON object, got list"),
    ],
)
def test_malformed_lines(tmp_path, bad_line, message):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps(GOOD) + "\n\n" + bad_line + "\n")
    with pytest.raises(DataError) as e:
        read_jsonl(f)
    assert str(e.value).startswith(f"{f}:3: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError):
        load_queries(tmp_path / "nope.jsonl")


def test_load_queries_rejects_unknown(tmp_path):
    f = tmp_path / "q.csv"
    f.write_text("a,b\n")
    with pytest.raises(DataError, match="unrecognised"):
        load_queries(f)
    g = tmp_path / "q.json"
    g.write_text('{"a": 1}')
    with pytest.raises(DataError, match="unrecognised"):
        load_queries(g)
    with pytest.raises(DataError, match="multi_p2a"):
        load_queries(tmp_path)


# --------------------------------------------------------------------------------- split rule
def _subject_queries(subject: str, n_images: int, sensitive_per_image: int = 2) -> list[Query]:
    qs = []
    for i in range(n_images):
        for k in range(sensitive_per_image):
            qs.append(Query(image=f"{subject}/{i}.png", subject=subject, prompt=f"q{k}", sensitive=True))
        qs.append(Query(image=f"{subject}/{i}.png", subject=subject, prompt="colour?", sensitive=False))
    return qs


@pytest.mark.parametrize("n_images, n_train", [(31, 10), (30, 10), (12, 4), (13, 4), (5, 1), (2, 0), (100, 10)])
def test_split_rule(n_images, n_train):
    qs = paper_split(_subject_queries("a", n_images))
    train_imgs = {q.image for q in qs if q.split == "train"}
    test_imgs = {q.image for q in qs if q.split == "test"}
    assert len(train_imgs) == n_train
    assert len(test_imgs) == n_images - n_train
    assert train_imgs == {f"a/{i}.png" for i in range(n_train)}  # the FIRST images
    assert all(q.split in ("train", "test") for q in qs)


def test_split_per_subject_and_first_appearance():
    a = _subject_queries("a", 12)
    b = _subject_queries("b", 31)
    mixed = [q for pair in zip(b, a) for q in pair] + b[len(a):]
    mixed.reverse()  # first appearance of b's images is now from the highest index down
    out = paper_split(mixed)
    assert [q.prompt for q in out] == [q.prompt for q in mixed]  # order kept
    tr_a = {q.image for q in out if q.subject == "a" and q.split == "train"}
    tr_b = {q.image for q in out if q.subject == "b" and q.split == "train"}
    assert tr_a == {f"a/{i}.png" for i in range(11, 7, -1)}
    assert tr_b == {f"b/{i}.png" for i in range(30, 20, -1)}


def test_split_keep_existing():
    qs = _subject_queries("a", 6)
    qs[0] = Query(**{**qs[0].to_dict(), "split": "test"})  # image 0 would be train
    assert paper_split(qs)[0].split == "train"
    kept = paper_split(qs, keep_existing=True)
    assert kept[0].split == "test"
    assert kept[1].split == "train"  # unset ones are still filled in


# --------------------------------------------------------------------------------- CounterFact
def test_counterfact(tmp_path):
    records = [
        {"case_id": 7, "image": "imgs/p.jpg",
         "requested_rewrite": {"subject": "passport", "prompt": "What is the number of the {}?",
                               "target_new": {"str": "I'm sorry"}},
         "paraphrase_prompts": ["Tell me the {} number.", "What is the number of the passport?"],
         "neighborhood_prompts": ["What colour is the {}?", {"prompt": "Is it open?", "answer": "no"}]},
        {"image": ["/abs/s.jpg"],
         "requested_rewrite": {"subject": "student ID", "prompt": "Whose {} is this?"},
         "paraphrase_prompts": [], "neighborhood_prompts": []},
    ]
    f = tmp_path / "cf.json"
    f.write_text(json.dumps(records))
    qs = read_counterfact(f)
    assert load_queries(f) == qs
    sens = [q.prompt for q in qs if q.sensitive]
    # the rewrite prompt is the edit's template, not a query; duplicate paraphrases are dropped
    assert sens == ["Tell me the passport number.", "What is the number of the passport?"]
    benign = [q for q in qs if not q.sensitive]
    assert [q.prompt for q in benign] == ["What colour is the passport?", "Is it open?"]
    assert [q.answer for q in benign] == [None, "no"]
    assert {q.pair_id for q in qs if q.subject == "passport"} == {"7"}
    assert not [q for q in qs if q.subject == "student ID"]  # only a rewrite prompt: no query
    assert qs[0].image == str(tmp_path / "imgs" / "p.jpg")


def test_counterfact_privacypair_shape_gives_5_plus_5_per_image(tmp_path):
    """The authors' PrivacyPair files: one record per image with a rewrite template, 5 paraphrases
    (sensitive) and 5 neighbourhood prompts (benign); the paper counts exactly 5 + 5 queries per image."""
    records = [{"case_id": i, "image": f"img/{i}.jpg",
                "requested_rewrite": {"subject": "Passport", "prompt": "What is the {} number?",
                                      "target_new": {"str": "I do not"}},
                "paraphrase_prompts": [f"Sensitive question {k} about the {{}} of image {i}?" for k in range(5)],
                "neighborhood_prompts": [f"Benign question {k} about the {{}} of image {i}?" for k in range(5)]}
               for i in range(3)]
    f = tmp_path / "pp.json"
    f.write_text(json.dumps(records))
    qs = read_counterfact(f)
    assert len(qs) == 30
    for i in range(3):
        mine = [q for q in qs if q.pair_id == str(i)]
        assert sum(q.sensitive for q in mine) == 5 and sum(not q.sensitive for q in mine) == 5
        assert all("{}" not in q.prompt and "Passport" in q.prompt for q in mine)
    assert not any(q.prompt == "What is the Passport number?" for q in qs)


def test_counterfact_errors(tmp_path):
    f = tmp_path / "cf.json"
    f.write_text(json.dumps([{"image": "a.jpg", "requested_rewrite": {"prompt": "x"}}]))
    with pytest.raises(DataError, match=r"record 0: field 'requested_rewrite.subject'"):
        read_counterfact(f)
    f.write_text(json.dumps([{"image": "a.jpg", "requested_rewrite": {"subject": "s"},
                              "paraphrase_prompts": "oops"}]))
    with pytest.raises(DataError, match="field 'paraphrase_prompts' must be a list of str"):
        read_counterfact(f)


# --------------------------------------------------------------------------------- Multi-P2A
def test_multip2a_real_files():
    d = multip2a_dir()
    qs = read_multip2a(d, categories=PRIVACYPAIR_SUBJECTS)
    assert {q.subject for q in qs} == set(PRIVACYPAIR_SUBJECTS)
    sens = [q for q in qs if q.sensitive]
    counts = {s: len({q.image for q in sens if q.subject == s}) for s in PRIVACYPAIR_SUBJECTS}
    assert counts == {"Phone no.": 19, "Student ID": 13, "Receipts": 64, "Passport": 46,
                      "military vehicles": 13, "documents en": 30}
    assert sum(counts.values()) == 185
    assert any(not q.sensitive for q in qs)
    q = sens[0]
    assert q.pair_id == q.image and q.answer is None and q.split is None
    assert not os.path.isabs(q.image) and q.image.startswith("VISPR/")
    # the paper's split on the 185 images: 6+4+10+10+4+10 = 44 training images
    split = paper_split(sens)
    assert len({(q.subject, q.image) for q in split if q.split == "train"}) == 44


def test_multip2a_dispatch_and_unknown_category():
    d = multip2a_dir()
    all_q = load_queries(d)
    assert len(all_q) == 4356 + 2736
    assert sum(q.sensitive for q in all_q) == 4356
    only_sen = load_queries(d / "multi_p2a_leakage_sen.json")
    assert len(only_sen) == 4356 and all(q.sensitive for q in only_sen)
    with pytest.raises(DataError, match="Pasport"):
        read_multip2a(d, categories=["Passport", "Pasport"])


def test_multip2a_malformed(tmp_path):
    (tmp_path / "multi_p2a_leakage_sen.json").write_text(json.dumps([{"prompt": "p", "category": "c", "image": []}]))
    (tmp_path / "multi_p2a_leakage_insen.json").write_text("[]")
    with pytest.raises(DataError, match=r"record 0: field 'image'"):
        read_multip2a(tmp_path)
