"""Editing methods: a registry from method name to (hyperparameter dataclass, apply function).

An apply function has the signature
``fn(adapter, samples, layers, *, module, refusal, hparams, gates=None, retain=(), shortcuts=True) -> EditResult``
(``ngguard.core.EditResult``: new weights, fp32 deltas, a log), edits ``adapter.model`` in place and
changes only the matrices it edits. ``hparams`` is the recipe section named after the method (``memit``,
``alphaedit``), or ``edit`` for the gradient edits that share its settings (``hparams_for``).
A new method = one module here + one line in ``REGISTRY`` + its section in ``ngguard.recipe``
(``EDIT_METHODS`` there lists the names recipes accept; a test holds the two equal).

- ``neural_gate`` (the paper, ``neural_gate.py``: Eq. 1-7), ``no_gate`` (its ablation), ``dinm``
- ``memit``, ``alphaedit`` (locate-then-edit closed forms: ``memit.py``, ``alphaedit.py``)
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ..recipe import AlphaEditHParams, EditSpec, MemitHParams, Recipe
from .alphaedit import apply_alphaedit
from .dinm import apply_dinm
from .memit import apply_memit
from .neural_gate import apply_neural_gate
from .no_gate import apply_no_gate

REGISTRY: dict[str, tuple[type, Callable]] = {
    "neural_gate": (EditSpec, apply_neural_gate),
    "no_gate": (EditSpec, apply_no_gate),
    "dinm": (EditSpec, apply_dinm),
    "memit": (MemitHParams, apply_memit),
    "alphaedit": (AlphaEditHParams, apply_alphaedit),
}


def hparams_for(recipe: Recipe, method: str):
    """The recipe section holding ``method``'s hyperparameters (an instance of its REGISTRY class)."""
    cls = REGISTRY[method][0]
    names = {f.name: f for f in dataclasses.fields(recipe)}
    section = method if method in names else next(n for n in names if isinstance(getattr(recipe, n), cls))
    return getattr(recipe, section)


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
    for name in dict.fromkeys([recipe.method, *recipe.report.compare_methods]):
        if name not in ADAPTATION:  # the gradient edits: their settings are the edit section's
            continue
        cls = REGISTRY[name][0]
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
