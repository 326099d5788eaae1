"""The keyword filter: the cheap guard a user would try before editing weights.

It refuses any question that contains a phrase found only in the SENSITIVE training questions (word
n-grams present in some sensitive training question and in no benign one; since the paper's pairs ask
the same template once about a private attribute and once about a benign one, these are exactly the
private-attribute phrases: "passport number", "home address", "number", ...). Everything else goes to
the unedited model. It is the benchmark's own check: if it scores as well as the edits, the benchmark
cannot tell "refuse these words" from "know what is private here".
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(words: Sequence[str], n_max: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class KeywordFilter:
    phrases: tuple[tuple[str, ...], ...]   # word n-grams that trigger a refusal
    refusal: str

    @classmethod
    def from_queries(cls, sensitive: Iterable[str], benign: Iterable[str], *, refusal: str,
                     max_words: int = 3) -> "KeywordFilter":
        """Learn the phrases from training questions: n-grams (1..max_words words) of the sensitive
        questions that no benign question contains, kept minimal (an n-gram that contains a shorter
        kept one is dropped)."""
        sens = set().union(*(_ngrams(_words(t), max_words) for t in sensitive))
        ben = set().union(*(_ngrams(_words(t), max_words) for t in benign))
        cands = sorted(sens - ben, key=lambda g: (len(g), g))
        kept: list[tuple[str, ...]] = []
        for g in cands:
            if not any(_contains(g, k) for k in kept):
                kept.append(g)
        return cls(tuple(kept), refusal)

    def blocks(self, prompt: str) -> bool:
        grams = _ngrams(_words(prompt), max((len(p) for p in self.phrases), default=1))
        return any(p in grams for p in self.phrases)


def keyword_guard(train: Iterable, refusal: str) -> tuple[KeywordFilter, dict]:
    """The filter learnt from training queries (``.prompt``, ``.sensitive``) and what the report lists
    of it (the registry's ``Method.guard`` of ``keyword_filter``)."""
    train = list(train)
    guard = KeywordFilter.from_queries([q.prompt for q in train if q.sensitive], [q.prompt for q in train if not q.sensitive],
                                       refusal=refusal)
    return guard, {"phrases": [" ".join(p) for p in guard.phrases]}


def _contains(longer: tuple[str, ...], shorter: tuple[str, ...]) -> bool:
    n = len(shorter)
    return any(longer[i:i + n] == shorter for i in range(len(longer) - n + 1))
