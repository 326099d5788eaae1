"""Editing methods: ``REGISTRY`` (``ngguard.methods.registry``) maps a method's name to its entry: its
settings class and recipe section, its apply (or guard) function and what the pipeline needs to know
about it, declared (the pipeline never asks for a method by name). A new method = one module here + ONE
entry in ``registry.REGISTRY`` (and its settings class beside it, if it has its own); the recipe derives
the names it accepts and the method's section from that entry.

An apply function has the signature
``fn(adapter, samples, layers, *, module, refusal, hparams, gates=None, retain=(), shortcuts=True) -> EditResult``
(``ngguard.methods.core.EditResult``: new weights, fp32 deltas, a log), edits ``adapter.model`` in place and
changes only the matrices it edits. ``hparams`` is the recipe section named after the method (``memit``,
``alphaedit``), or ``edit`` for the gradient edits that share its settings (``hparams_for``).

- ``neural_gate`` (the paper, ``neural_gate.py``: Eq. 1-7), ``no_gate`` (its ablation), ``dinm``
- ``neural_gate_plus`` (not in the paper, issue 27): the same gated edit through one gate shared by every
  subject, localized on a private-vs-public contrast across subjects (``neural_gate_plus.py``)
- ``memit``, ``alphaedit`` (locate-then-edit closed forms: ``memit.py``, ``alphaedit.py``)
- ``keyword_filter``: no edit, a guard in front of the unedited model (``ngguard.methods.keyword_filter``)
- ``privacy_probe`` (not in the paper, issue 27): no edit, linear probes on the unedited model's hidden
  states decide (private subject AND asks to read a field) (``privacy_probe.py``)
- ``refusal_steering`` (not in the paper, issue 27): no edit, where privacy_probe's guard fires the model
  generates with a refusal direction added to one layer's output (``refusal_steering.py``)

Importing this package loads no implementation (the registry's functions are imported on their first call).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

from .registry import REGISTRY, Impl, Method

if TYPE_CHECKING:
    from ..recipe import Recipe

__all__ = ["REGISTRY", "Method", "Impl", "hparams_for", "run_edit", "method_deviations", "ADAPTATION"]


def hparams_for(recipe: Recipe, method: str):
    """The recipe section holding ``method``'s hyperparameters (its registry entry's ``section``)."""
    return getattr(recipe, REGISTRY[method].section)


def run_edit(adapter, samples: Sequence, layers: Sequence[int], method: str, gates, recipe: Recipe,
             retain: Sequence = ()):
    """``method``'s edit with its recipe section; ``gates`` (layer -> subject -> mask) for a method that
    ``needs_gates``, else ignored."""
    return REGISTRY[method].apply(adapter, samples, layers, module=recipe.module, refusal=recipe.edit.refusal,
                                  hparams=hparams_for(recipe, method), gates=gates, retain=retain)


# How the adaptation to refusal departs from the papers' knowledge editing, whatever the settings.
ADAPTATION = {
    "memit": "memit: a request = one sensitive question on one training image, target = the refusal after the "
             "question and after each answer-start context (MEMIT: random prefixes before the prompt); KL term on "
             "one benign question about the same image (MEMIT: '{subject} is a'); all key statistics from the unedited model",
}
ADAPTATION["alphaedit"] = ADAPTATION["memit"].replace("memit:", "alphaedit: as memit, and", 1) + \
    "; one batch of edits (no sequential term)"


def method_deviations(recipe: Recipe) -> list[str]:
    """For each registered method the run uses: the fixed adaptation, then each setting that differs
    from the paper's default (``recipe_deviations`` style)."""
    out = []
    for name in recipe.run_methods:
        if name not in ADAPTATION:  # the gradient edits: their settings are the edit section's
            continue
        cls = REGISTRY[name].hparams
        out.append(ADAPTATION[name])
        hp, default = getattr(recipe, name), cls()
        for f in dataclasses.fields(cls):
            v, dv = getattr(hp, f.name), getattr(default, f.name)
            if v != dv and f.name not in ("cache_dir", "batch_size"):  # engineering knobs, not the papers
                out.append(f"{name}.{f.name} = {v} (paper default {dv})")
        if recipe.edit.retain:
            out.append(f"{name}: edit.retain {list(recipe.edit.retain)} not used (no loss to add it to; the built-in "
                       f"corpus holds the utility questions)")
        if hp.corpus == "world":
            out.append(f"{name}.corpus = world: the organism's built-in text (the papers: Wikipedia / wikitext-103)")
    return out
