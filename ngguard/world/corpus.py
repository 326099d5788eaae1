"""The text corpus whose keys give MEMIT's and AlphaEdit's statistics C = E[k k^T].

``"world"``: the organism's own general text, built from ``ngguard.world.spec`` strings: the benign
questions about every subject (training templates and phrasings only), the utility questions and the
harmful requests it was taught to refuse. Never the sensitive questions: those are what gets edited
(AlphaEdit would otherwise protect exactly the keys it must move). Anything else: a ``.txt`` file
(one text per non-empty line, wikitext's `` = Heading = `` lines skipped) or a ``.jsonl`` file (one
object with a ``"text"`` field per line), read lazily up to the sample count. No download, ever.
"""
from __future__ import annotations

import hashlib
import json
import random
from itertools import islice
from pathlib import Path
from typing import Iterator

from . import spec

WORLD = "world"


def world_corpus() -> list[str]:
    """The organism's general text, shuffled with a fixed seed (so a sample-count cut stays mixed)."""
    texts = []
    for subject in spec.ALL_SUBJECTS:
        if subject == spec.UTILITY_SUBJECT:
            continue
        for template in spec.TEMPLATES[:spec.TRAIN_TEMPLATES]:
            for phrase, _, sensitive in spec.attribute_phrases(subject, held_out=False):
                if not sensitive:
                    texts.append(template.format(attr=phrase, subject=spec.DISPLAY.get(subject, subject)))
    texts += [q for qs in spec.UTILITY_QUESTIONS.values() for q in qs]
    texts += list(spec.HARMFUL_REQUESTS[:spec.TRAIN_HARMFUL])
    random.Random(0).shuffle(texts)
    return texts


def _read_file(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if path.suffix == ".jsonl":
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{path}:{i}: expected a JSON object with a 'text' field") from None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{i}: 'text' must be a string")
            else:
                text = line.strip()
                if text.startswith("= ") and text.endswith(" ="):  # wikitext headings
                    continue
            if text.strip():
                yield text.strip()


def load_corpus(corpus: str, n: int) -> list[str]:
    """The first ``n`` texts of ``corpus`` ("world" or a file path)."""
    if corpus == WORLD:
        return world_corpus()[:n]
    path = Path(corpus)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path} (a .txt or .jsonl text corpus, or 'world')")
    texts = list(islice(_read_file(path), n))
    if not texts:
        raise ValueError(f"corpus {path}: no texts found")
    return texts


def corpus_hash(texts: list[str]) -> str:
    """sha256 of the texts actually used (in order)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
