"""Refusal judges: does a model response refuse the question?

One package, read bottom to top (no module imports one above it):

- ``base``: the labels (``refusal`` / ``partial`` / ``compliance``), the judge interface, ``check_batch``.
- ``rules``: the rule judge ``RefusalJudge`` (the default).
- ``models``: judges backed by HF checkpoints (``ClassifierJudge``, ``GenerativeJudge``) and their
  question templates (the bundled ``*.yaml`` files beside it); torch/transformers load only when used.
- ``spec``: ``parse_judge_spec`` / ``make_judge``, the factory behind every ``judge:`` value.
- ``validate``: checking a judge against human labels, re-judging saved eval results.

The old module paths ``ngguard.judge``, ``ngguard.judge_models`` and ``ngguard.validate_judge`` are
kept as thin re-exports.
"""
from ngguard.judges.base import LABELS, REFUSAL_LABELS, Judge, Verdict, check_batch
from ngguard.judges.rules import (DEFAULT_REFUSAL_KEYWORDS, DEFAULT_REFUSAL_PREFIXES, RULES_VERSION, RefusalJudge,
                                  normalize)
from ngguard.judges.spec import JUDGE_KINDS, make_judge, parse_judge_spec

__all__ = ["LABELS", "REFUSAL_LABELS", "Judge", "Verdict", "check_batch", "DEFAULT_REFUSAL_KEYWORDS",
           "DEFAULT_REFUSAL_PREFIXES", "RULES_VERSION", "RefusalJudge", "normalize", "JUDGE_KINDS", "make_judge",
           "parse_judge_spec"]
