"""PrivacyPair queries: the record, readers and the paper's split rule."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from loguru import logger

from .atomic import atomic_write_bytes, atomic_write_text  # re-exported: callers import them from here too
from .limits import DEFAULT_LIMITS, read_text_file


@dataclass(frozen=True)
class Query:
    """One question about one image. ``image`` is a path (relative paths resolve against the file
    that listed the query). ``answer``: ground truth (private value or benign property) if known."""

    image: str
    subject: str
    prompt: str
    sensitive: bool
    answer: str | None = None
    split: str | None = None
    pair_id: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Errors and helpers
# ---------------------------------------------------------------------------------------------
class DataError(ValueError):
    """Malformed query data. The message names the file and line (or record) and the field."""


_FIELD_TYPES: dict[str, tuple[type, bool]] = {  # name -> (type, required)
    "image": (str, True),
    "subject": (str, True),
    "prompt": (str, True),
    "sensitive": (bool, True),
    "answer": (str, False),
    "split": (str, False),
    "pair_id": (str, False),
}

MULTIP2A_FILES = {True: "multi_p2a_leakage_sen.json", False: "multi_p2a_leakage_insen.json"}

# The six PrivacyPair subjects of the Neural Gate paper (Multi-P2A category names).
PRIVACYPAIR_SUBJECTS: tuple[str, ...] = (
    "Phone no.", "Student ID", "Receipts", "Passport", "military vehicles", "documents en",
)


def _image_field(r: dict, where: str) -> str:
    """A record's ``image``: a str, or a list of one str."""
    image = r.get("image")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: field 'image' must be a str or a list of one str")
    return image


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _require_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")


def _read_text(path: Path) -> str:
    """A query file's text: a regular file within ``Limits.max_data_bytes`` (``limits.read_text_file``)."""
    _require_file(path)
    return read_text_file(path, DEFAULT_LIMITS.max_data_bytes, what="query file")


def _resolve_image(image: str, folder: Path) -> str:
    if os.path.isabs(image):
        return os.path.normpath(image)
    return os.path.normpath(os.path.abspath(folder / image))


# ---------------------------------------------------------------------------------------------
# Our JSON Lines format: one Query object per line
# ---------------------------------------------------------------------------------------------
def query_from_dict(record, where: str, folder: Path | None = None) -> Query:
    """Validate one record (``where`` = "file:line" for messages); resolve a relative image path
    against ``folder`` if given."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(record)}")
    values = {}
    for name, (typ, required) in _FIELD_TYPES.items():
        if name not in record or (record[name] is None and not required):
            if required:
                raise DataError(f"{where}: field '{name}' is missing")
            continue
        value = record[name]
        if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
            raise DataError(f"{where}: field '{name}' must be {typ.__name__}, got {_type_name(value)}")
        if typ is str and name in ("image", "subject", "prompt") and not value.strip():
            raise DataError(f"{where}: field '{name}' must not be empty")
        values[name] = value
    if folder is not None:
        values["image"] = _resolve_image(values["image"], folder)
    return Query(**values)


def read_jsonl(path: str | os.PathLike) -> list[Query]:
    """Read our query file (one JSON object per line; blank lines allowed). Relative image paths
    are resolved against the file's folder. Unknown fields are ignored (with a warning)."""
    path = Path(path)
    text = _read_text(path)
    folder = path.parent
    queries: list[Query] = []
    unknown: set[str] = set()
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        queries.append(query_from_dict(record, where, folder))
        unknown.update(set(record) - set(_FIELD_TYPES))
    if unknown:
        logger.warning("{}: ignored unknown fields {}", path, sorted(unknown))
    return queries


def write_jsonl(path: str | os.PathLike, queries: Iterable[Query]) -> Path:
    """Write queries atomically. Image paths inside the file's folder are written relative to it
    (so the folder can be moved); other paths are written as they are."""
    path = Path(path)
    folder = os.path.abspath(path.parent)
    lines = []
    for q in queries:
        d = q.to_dict()
        if os.path.isabs(q.image):
            rel = os.path.relpath(q.image, folder)
            if not rel.startswith(os.pardir + os.sep) and rel != os.pardir:
                d["image"] = rel
        lines.append(json.dumps(d, ensure_ascii=False))
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------
# Multi-P2A (shared/data/multi-p2a): the questions of PrivacyPair
# ---------------------------------------------------------------------------------------------
def _load_json(path: Path):
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def _read_multip2a_file(path: Path, sensitive: bool, wanted: list[str] | None) -> list[Query]:
    records = _load_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {_type_name(records)}")
    queries = []
    for i, r in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(r, dict):
            raise DataError(f"{where}: expected a JSON object, got {_type_name(r)}")
        for key in ("prompt", "category"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise DataError(f"{where}: field '{key}' must be a non-empty str, got {_type_name(r.get(key))}")
        image = _image_field(r, where)
        if wanted is not None and r["category"] not in wanted:
            continue
        queries.append(Query(image=image, subject=r["category"], prompt=r["prompt"],
                             sensitive=sensitive, pair_id=image))
    return queries


def read_multip2a(folder: str | os.PathLike, categories: Iterable[str] | None = None,
                  *, which: str = "both") -> list[Query]:
    """Read the Multi-P2A leakage questions (sensitive file first, then the benign one).

    category -> subject, sen file -> sensitive, insen file -> benign, image = the relative path as
    given (the images are not shipped), pair_id = that image path, no answer, no split.
    ``categories``: keep only these (each must exist in the data). ``which``: "both", "sen" or
    "insen". Note: the paper's image counts (e.g. 185 PrivacyPair images) are those of the
    sensitive file; the benign file has questions on further images of the same categories."""
    folder = Path(folder)
    if which not in ("both", "sen", "insen"):
        raise ValueError(f"read_multip2a: 'which' must be both, sen or insen, got {which!r}")
    wanted = None if categories is None else [categories] if isinstance(categories, str) else list(categories)
    queries: list[Query] = []
    for sensitive, name in MULTIP2A_FILES.items():
        if which == "both" or (which == "sen") == sensitive:
            queries += _read_multip2a_file(folder / name, sensitive, wanted)
    if wanted is not None:
        missing = [c for c in wanted if not any(q.subject == c for q in queries)]
        if missing:
            raise DataError(f"{folder}: unknown Multi-P2A categories {missing}")
    return queries


# ---------------------------------------------------------------------------------------------
# CounterFact-style JSON of the Neural Gate authors
# ---------------------------------------------------------------------------------------------
def read_counterfact(path: str | os.PathLike) -> list[Query]:
    """Read a JSON list of CounterFact-style records::

        {"case_id": 3, "image": "img/3.jpg",
         "requested_rewrite": {"subject": "passport", "prompt": "What is the number of the {}?"},
         "paraphrase_prompts": ["..."],            # sensitive
         "neighborhood_prompts": ["...", {"prompt": "...", "answer": "blue"}]}  # benign

    The queries are exactly the paraphrases (sensitive) and the neighbourhood prompts (benign), as the
    paper counts them (PrivacyPair: 5 + 5 per image); the requested-rewrite prompt is the edit's rewrite
    template, not a query (its type is still checked). Duplicate paraphrases are dropped.
    pair_id = case_id, else the record index. Relative image paths resolve against the file's folder."""
    path = Path(path)
    records = _load_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {_type_name(records)}")
    folder = path.parent
    queries: list[Query] = []
    for i, r in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(r, dict):
            raise DataError(f"{where}: expected a JSON object, got {_type_name(r)}")
        rw = r.get("requested_rewrite")
        if not isinstance(rw, dict):
            raise DataError(f"{where}: field 'requested_rewrite' must be an object, got {_type_name(rw)}")
        subject = rw.get("subject")
        if not isinstance(subject, str) or not subject.strip():
            raise DataError(f"{where}: field 'requested_rewrite.subject' must be a non-empty str")
        image = _image_field(r, where)
        image = _resolve_image(image, folder)
        case_id = r.get("case_id", i)
        if isinstance(case_id, bool) or not isinstance(case_id, (int, str)):
            raise DataError(f"{where}: field 'case_id' must be int or str, got {_type_name(case_id)}")
        pair_id = str(case_id)

        def fill(text: str) -> str:
            return text.replace("{}", subject)

        sensitive: list[str] = []
        rw_prompt = rw.get("prompt")
        if rw_prompt is not None and not isinstance(rw_prompt, str):
            raise DataError(f"{where}: field 'requested_rewrite.prompt' must be str, got {_type_name(rw_prompt)}")
        paraphrases = r.get("paraphrase_prompts", [])
        if not isinstance(paraphrases, list) or not all(isinstance(p, str) for p in paraphrases):
            raise DataError(f"{where}: field 'paraphrase_prompts' must be a list of str")
        for p in paraphrases:
            if fill(p) not in sensitive:
                sensitive.append(fill(p))
        for p in sensitive:
            queries.append(Query(image=image, subject=subject, prompt=p, sensitive=True, pair_id=pair_id))

        neighbours = r.get("neighborhood_prompts", [])
        if not isinstance(neighbours, list):
            raise DataError(f"{where}: field 'neighborhood_prompts' must be a list")
        for j, n in enumerate(neighbours):
            answer = None
            if isinstance(n, dict):
                answer = n.get("answer", n.get("target"))
                n = n.get("prompt")
                if answer is not None and not isinstance(answer, str):
                    raise DataError(f"{where}: field 'neighborhood_prompts[{j}].answer' must be str")
            if not isinstance(n, str) or not n.strip():
                raise DataError(f"{where}: field 'neighborhood_prompts[{j}]' must be a str or {{prompt: str}}")
            queries.append(Query(image=image, subject=subject, prompt=fill(n), sensitive=False,
                                 answer=answer, pair_id=pair_id))
    return queries


# ---------------------------------------------------------------------------------------------
# The paper's split and format dispatch
# ---------------------------------------------------------------------------------------------
def train_image_count(n_images: int, max_train: int = 10, divisor: int = 3) -> int:
    """The paper's rule: min(10, floor(n/3)) training images per subject."""
    return min(max_train, n_images // divisor)


def paper_split(queries: Sequence[Query], *, keep_existing: bool = False,
                max_train: int = 10, divisor: int = 3) -> list[Query]:
    """Per subject, order its images by first appearance; the first min(10, floor(n/3)) images are
    "train", the rest "test". Returns new queries in the same order with ``split`` set. An
    already-set split is overwritten unless ``keep_existing``."""
    images: dict[str, dict[str, None]] = {}
    for q in queries:
        images.setdefault(q.subject, {}).setdefault(q.image, None)
    train: dict[str, set[str]] = {}
    for subject, imgs in images.items():
        order = list(imgs)
        train[subject] = set(order[: train_image_count(len(order), max_train, divisor)])
    out = []
    for q in queries:
        if keep_existing and q.split is not None:
            out.append(q)
        else:
            out.append(replace(q, split="train" if q.image in train[q.subject] else "test"))
    return out


def load_queries(path: str | os.PathLike) -> list[Query]:
    """Load queries from our ``.jsonl``, a Multi-P2A folder (with multi_p2a_leakage_*.json), or a
    CounterFact-style ``.json`` list (records with ``requested_rewrite``)."""
    path = Path(path)
    _require_file(path)
    if path.is_dir():
        if (path / MULTIP2A_FILES[True]).exists() or (path / MULTIP2A_FILES[False]).exists():
            return read_multip2a(path)
        raise DataError(f"{path}: folder has no {MULTIP2A_FILES[True]} / {MULTIP2A_FILES[False]}")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".json":
        data = _load_json(path)
        if isinstance(data, list) and data and isinstance(data[0], dict) and "requested_rewrite" in data[0]:
            return read_counterfact(path)
        if path.name in MULTIP2A_FILES.values():
            return read_multip2a(path.parent, which="sen" if path.name == MULTIP2A_FILES[True] else "insen")
        raise DataError(f"{path}: unrecognised query file (expected a list of records with 'requested_rewrite')")
    raise DataError(f"{path}: unrecognised query file (expected .jsonl, .json or a Multi-P2A folder)")
