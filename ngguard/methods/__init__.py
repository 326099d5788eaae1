"""Editing methods beside the gated-edit loop of ``ngguard.edit`` (neural_gate, no_gate, dinm).

``REGISTRY``: method name -> (hyperparameter dataclass = its recipe section, apply function). An apply
function has the signature ``fn(adapter, samples, layers, *, module, refusal, hparams) -> EditResult``
(``ngguard.edit.EditResult``: new weights, fp32 deltas, a log) and changes only the matrices it edits.
A new method = one module here + one line in ``REGISTRY`` + its section in ``ngguard.recipe``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ..recipe import AlphaEditHParams, MemitHParams, Recipe
from .alphaedit import apply_alphaedit
from .memit import apply_memit

REGISTRY: dict[str, tuple[type, Callable]] = {
    "memit": (MemitHParams, apply_memit),
    "alphaedit": (AlphaEditHParams, apply_alphaedit),
}

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
        if name not in REGISTRY:
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
