"""Editing methods: a registry from method name to a ``Method``: its hyperparameter dataclass, its
apply function and what the pipeline needs to know about it, declared (the pipeline never asks for
a method by name).

An apply function has the signature
``fn(adapter, samples, layers, *, module, refusal, hparams, gates=None, retain=(), shortcuts=True) -> EditResult``
(``ngguard.methods.core.EditResult``: new weights, fp32 deltas, a log), edits ``adapter.model`` in place and
changes only the matrices it edits. ``hparams`` is the recipe section named after the method (``memit``,
``alphaedit``), or ``edit`` for the gradient edits that share its settings (``hparams_for``).
A new method = one module here + one line in ``REGISTRY`` + its hyperparameter class and one line in
``ngguard.recipe.METHOD_SECTIONS`` (the names recipes accept, each method's class and section: recipes
must know them without importing the implementations). The two are checked against each other on import.

- ``neural_gate`` (the paper, ``neural_gate.py``: Eq. 1-7), ``no_gate`` (its ablation), ``dinm``
- ``neural_gate_plus`` (not in the paper, issue 27): the same gated edit through one gate shared by every
  subject, localized on a private-vs-public contrast across subjects (``neural_gate_plus.py``)
- ``memit``, ``alphaedit`` (locate-then-edit closed forms: ``memit.py``, ``alphaedit.py``)
- ``keyword_filter``: no edit, a guard in front of the unedited model (``ngguard.methods.keyword_filter``)
- ``privacy_probe`` (not in the paper, issue 27): no edit, linear probes on the unedited model's hidden
  states decide (private subject AND asks to read a field) (``privacy_probe.py``)
- ``refusal_steering`` (not in the paper, issue 27): no edit, where privacy_probe's guard fires the model
  generates with a refusal direction added to one layer's output (``refusal_steering.py``)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from .keyword_filter import keyword_guard
from ..recipe import METHOD_SECTIONS, MethodSection, Recipe
from .alphaedit import apply_alphaedit
from .dinm import apply_dinm, dinm_layers
from .memit import apply_memit
from .neural_gate import apply_neural_gate
from .neural_gate_plus import apply_neural_gate_plus
from .no_gate import apply_no_gate
from .privacy_probe import privacy_probe_guard
from .refusal_steering import refusal_steering_guard


@dataclass(frozen=True)
class Method:
    """A registry entry (its hyperparameter class and recipe section: ``recipe.METHOD_SECTIONS[name]``)."""

    name: str
    apply: Callable | None               # the edit (signature above); None: it edits no weights
    needs_gates: bool = False            # ``apply`` takes the gates of localization (Eq. 6)
    # under a layer search (recipe ``layers: {search: ...}``): the method's own choice of layers,
    # ``fn(adapter, samples, unsafe, refusal, scan) -> (layers, search info)``; None: the paper's search
    choose_layers: Callable | None = None
    # a method that edits no weights: ``fn(training queries, refusal) -> (guard, fields for its report entry)``;
    # its results are the unedited model's, rescored behind the guard (``evaluate.rescore_with_guard``)
    guard: Callable | None = None
    # the guard reads the model too: ``guard(train, refusal, adapter=, sets=, recipe=)`` and the guard
    # decides on whole queries (``guard.blocks_queries(queries)``: image and prompt)
    guard_needs_model: bool = False
    # the guard steers generation instead of answering with the refusal: a query it blocks is generated
    # again inside ``guard.steering()`` (a context manager of hooks; ``evaluate.rescore_with_guard``)
    steers: bool = False
    ablation_of: str | None = None       # the method this one ablates (the report sets them side by side)

    @property
    def edits_weights(self) -> bool:
        return self.apply is not None

    @property
    def hparams(self) -> type | None:
        """Its recipe section's class (None: no settings of its own)."""
        return METHOD_SECTIONS[self.name].hparams


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("neural_gate", apply_neural_gate, needs_gates=True),
    Method("no_gate", apply_no_gate, ablation_of="neural_gate"),
    Method("dinm", apply_dinm, choose_layers=dinm_layers),
    Method("neural_gate_plus", apply_neural_gate_plus),
    Method("memit", apply_memit),
    Method("alphaedit", apply_alphaedit),
    Method("keyword_filter", None, guard=keyword_guard),
    Method("privacy_probe", None, guard=privacy_probe_guard, guard_needs_model=True),
    Method("refusal_steering", None, guard=refusal_steering_guard, guard_needs_model=True, steers=True),
)}


def check_registry(registry: Mapping[str, Method], sections: Mapping[str, MethodSection]) -> None:
    """TypeError unless ``registry`` implements exactly the methods ``sections`` (``recipe.METHOD_SECTIONS``)
    declares, and agrees on which edit weights. Run on import: a mismatch is a programming error."""
    for name in dict.fromkeys([*sections, *registry]):
        if name not in registry or name not in sections or registry[name].edits_weights != sections[name].edits_weights:
            raise TypeError(f"methods.REGISTRY and recipe.METHOD_SECTIONS disagree on {name!r} (missing from one, "
                            f"or one says it edits weights and the other not)")


check_registry(REGISTRY, METHOD_SECTIONS)


def hparams_for(recipe: Recipe, method: str):
    """The recipe section holding ``method``'s hyperparameters (``recipe.METHOD_SECTIONS``)."""
    return getattr(recipe, METHOD_SECTIONS[method].section)


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
    for name in dict.fromkeys([recipe.method, *recipe.report.compare_methods]):
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
