"""The methods, one entry each: ``REGISTRY`` (name, settings class, recipe section, implementation and
what the pipeline needs to know about it) and the settings classes above it.

Light on purpose: ``ngguard.recipe`` derives from this table the method names a recipe accepts
(``recipe.METHODS``) and one recipe section per settings class (``SECTIONS``: a ``Recipe`` field with
the class's defaults), so it imports no implementation. An entry names its functions as
``"module:function"`` of ``ngguard.methods`` (``Impl``), imported on the first call.

A new method = its module in ``ngguard/methods/`` + (if it has settings of its own) its settings class
here + ONE entry in ``REGISTRY``. Sharing the gradient edits' ``edit`` section::

    Method("neural_gate_plus", EditSpec, "edit", apply="neural_gate_plus:apply_neural_gate_plus", needs_gates=True),

or with a section of its own (``neural_gate_plus:`` in recipes, defaults from the class)::

    Method("neural_gate_plus", NeuralGatePlusHParams, "neural_gate_plus", apply="neural_gate_plus:apply_neural_gate_plus"),

An apply function has the signature
``fn(adapter, samples, layers, *, module, refusal, hparams, gates=None, retain=(), shortcuts=True) -> EditResult``
(``ngguard.methods.core.EditResult``), edits ``adapter.model`` in place and changes only the matrices it
edits; ``hparams`` is the method's recipe section.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, ClassVar

from ngguard.limits import DEFAULT_LIMITS as _L
from ngguard.schema import boolean as _bool
from ngguard.schema import checked as _f
from ngguard.schema import choice as _choice
from ngguard.schema import integer as _int
from ngguard.schema import list_of as _list
from ngguard.schema import number as _float
from ngguard.schema import optional as _optional
from ngguard.schema import text as _str
from ngguard.world.spec import PROBE_CONTEXTS, REFUSAL

__all__ = ["Method", "Impl", "REGISTRY", "SECTIONS", "EditSpec", "LocateEditHParams", "MemitHParams",
           "AlphaEditHParams", "PrivacyProbeHParams", "RefusalSteeringHParams", "RETAIN_SETS", "AUGMENT_SETS",
           "DEFAULT_CONTEXTS", "DEFAULT_REFUSAL"]


# sets a recipe may keep answering while editing (edit.retain) -> the training split that holds them
RETAIN_SETS = {"utility": "utility_train", "public": "overrefusal_train", "awareness": "awareness_train",
               "general": "general_train"}
# training-role extras the edit may also see (edit.augment) -> the split that holds them: the edited subjects'
# questions there join the training samples (refused), the seen look-alikes' join their retention data
AUGMENT_SETS = {"adversarial": "adversarial_train"}
DEFAULT_CONTEXTS = (
    "The image shows that.",
    "Therefore, it is.",
    "Because I am just.",
    "I am an AI.",
    "You want to.",
)
DEFAULT_REFUSAL = REFUSAL  # ngguard.world.spec: the one definition


# ---- the settings classes (each the recipe section its methods name) ------------------------------


@dataclass(frozen=True)
class EditSpec:
    lr: float = _f(1.0e-5, _float(gt=0))
    eps: float = _f(1.0e-3, _float(gt=0))
    steps: int = _f(10, _int(ge=1, le=_L.max_steps))
    stop_loss: float = _f(1.0e-3, _float(ge=0))
    alpha: float = _f(1.25, _float(ge=0))
    refusal: str = _f(DEFAULT_REFUSAL, _str(max_len=_L.max_text_chars))
    max_answer_words: int = _f(5, _int(ge=1, le=_L.max_new_tokens))
    # Not in the paper: also keep the original answers on these query sets while editing, weight
    # ``alpha`` (like DINM's general-knowledge term): utility = non-document images, public = the
    # public look-alikes' training questions (benign retention). [] = the paper.
    retain: tuple[str, ...] = _f((), _list(_choice(tuple(RETAIN_SETS))))
    # Not in the paper (1 = the paper: each subject once, in sequence): the number of passes over the
    # subjects. On a small model a later subject's edit undoes part of an earlier one's (the retention
    # of public look-alikes pulls the shared attribute words back); a second pass revisits each subject.
    passes: int = _f(1, _int(ge=1, le=100))
    # Not in the paper (issue 27's data lever; the paper's context augmentation is the same idea on the
    # answer side): also train on these training-role extras (AUGMENT_SETS). [] = the paper.
    augment: tuple[str, ...] = _f((), _list(_choice(tuple(AUGMENT_SETS))))
    # Not in the paper; read by neural_gate_plus only (ngguard/methods/neural_gate_plus.py): its one gate for all
    # subjects, from a contrast private vs public subjects at the subject token ("mean_diff" or "probe" weights),
    # the top gate_top_k % dims by |contrast|, or with gate_soft every dim weighted by |contrast| / max;
    # gate_columns: its matrix also changes only on the top gate_top_k % input columns by the same contrast
    gate_contrast: str = _f("mean_diff", _choice(("mean_diff", "probe")))
    gate_top_k: float = _f(10.0, _float(gt=0, le=100))
    gate_soft: bool = _f(False, _bool)
    gate_columns: bool = _f(False, _bool)
    # the settings above that the paper does not have (the report calls their defaults ngguard's, not the paper's)
    NOT_IN_PAPER: ClassVar[tuple[str, ...]] = ("retain", "passes", "augment", "gate_contrast", "gate_top_k",
                                               "gate_soft", "gate_columns")


@dataclass(frozen=True)
class LocateEditHParams:
    """What MEMIT and AlphaEdit share (see ``ngguard/methods/``): the target values (MEMIT's compute_v:
    Adam on one vector per sensitive question added to the last edited layer's output at the subject
    token) and the key statistics C = E[k k^T] from a text corpus. Defaults: the authors' LLaMA
    (Llama3-8B) hyperparameters."""

    v_steps: int = _f(25, _int(ge=1))
    v_lr: float = _f(0.1, _float(gt=0))
    v_weight_decay: float = _f(0.5, _float(ge=0))
    clamp_norm_factor: float = _f(0.75, _float(gt=0))
    kl_factor: float = _f(0.0625, _float(ge=0))
    stop_loss: float = _f(0.05, _float(ge=0))
    contexts: tuple[str, ...] = _f(DEFAULT_CONTEXTS, _list(_str()))
    # "world": the organism's built-in corpus (ngguard.world.spec strings); else a .txt (one text per
    # line) or .jsonl ("text" field) file, resolved against the recipe's folder (e.g. wikitext-103)
    corpus: str = _f("world", _str())
    cov_samples: int = _f(100000, _int(ge=1, le=100_000_000))
    cov_max_tokens: int = _f(2048, _int(ge=1))
    # where the statistics are cached (null: $NGGUARD_CACHE or ~/.cache/ngguard, + /stats)
    cache_dir: str | None = _f(None, _optional(_str()))
    batch_size: int = _f(32, _int(ge=1))


@dataclass(frozen=True)
class MemitHParams(LocateEditHParams):
    """MEMIT (Meng et al., ICLR 2023): ``mom2_update_weight`` = lambda in (lambda C + K K^T)^-1."""

    mom2_update_weight: float = _f(15000.0, _float(ge=0))


@dataclass(frozen=True)
class AlphaEditHParams(LocateEditHParams):
    """AlphaEdit (Fang et al., ICLR 2025): null space of C = eigenvectors with eigenvalue <
    ``null_threshold``; ``l2``: the identity term of its solve."""

    null_threshold: float = _f(2.0e-2, _float(gt=0))
    l2: float = _f(10.0, _float(ge=0))


@dataclass(frozen=True)
class PrivacyProbeHParams:
    """``privacy_probe`` (not in the paper; ``ngguard/methods/privacy_probe.py``): linear probes on the
    unedited model's hidden states, read after decoder layer ``*_layer``; a question is refused when
    its subject reads private AND it asks to read a text field. Layers chosen on the validation sets
    (``bench/choose_val.py``; recipes/organism.yaml says which figures)."""

    subject_layer: int = _f(3, _int(ge=0, le=4096))    # private vs public subject, at its token
    locator_layer: int = _f(1, _int(ge=0, le=4096))    # which token is the subject
    request_layer: int = _f(4, _int(ge=0, le=4096))    # asks to read a text field / names a subject (last token)
    image_layer: int = _f(3, _int(ge=0, le=4096))      # private card from the image (no subject named)
    l2: float = _f(1.0e-3, _float(ge=0))
    # training-role sets besides the edit's pairs (``train``) that name card subjects / that are about no card
    train_sets: tuple[str, ...] = _f(("overrefusal_train", "awareness_train", "implicit_train", "adversarial_train",
                                      "general_train"), _list(_str()))
    neutral_sets: tuple[str, ...] = _f(("utility_train",), _list(_str()))
    batch_size: int = _f(64, _int(ge=1, le=_L.max_recipe_batch))
    # the probes also learn from the training questions (sensitive and benign pairs, look-alikes) inside
    # these training-role contexts (world.spec.PROBE_CONTEXTS), one context per question in turn; [] = none
    contexts: tuple[str, ...] = _f((), _list(_choice(tuple(PROBE_CONTEXTS))))
    # how the guard decides that a question names its subject (else the image decides): "probe" (the named
    # probe at the last token), "locator" (the locator reads some token as a subject's, probability above
    # locator_threshold) or "both"
    named_by: str = _f("probe", _choice(("probe", "locator", "both")))
    locator_threshold: float = _f(0.5, _float(ge=0, le=1))
    # the subject probe also learns that the other tokens of a question are no private subject (so a token
    # the locator takes wrongly reads "not private")
    subject_negatives: bool = _f(False, _bool)
    # a question that names no subject is judged by "image" (the image probe), "description" (the subject
    # probe read at the model's own answer to "What is shown in the image?", put in a question) or "mean"
    # (the mean of the two probabilities)
    unnamed_by: str = _f("image", _choice(("image", "description", "mean")))
    # a question that names its subject is judged by the subject probe alone (false) or by the mean of its
    # probability and those of the readings unnamed_by names (true)
    ensemble: bool = _f(False, _bool)
    # what the request probe reads: the last prompt token, the mean over the prompt's text tokens, or both
    request_tokens: str = _f("last", _choice(("last", "mean", "both")))
    # the image probe also learns the images of neutral_sets (about no card) as "no private card"
    neutral_images: bool = _f(False, _bool)


@dataclass(frozen=True)
class RefusalSteeringHParams:
    """``refusal_steering`` (not in the paper; ``ngguard/methods/refusal_steering.py``): where privacy_probe's
    guard (its ``privacy_probe`` section) fires, add ``alpha`` x (the mean state norm) x the unit refusal
    direction (difference of means at the last prompt token, from ``direction``'s training prompts) to the
    output of decoder layer ``layer`` at every position while the answer is generated. No weight changes.
    Defaults chosen on the validation sets (``bench/steer_sweep.py``; docs/benchmark.md says which figures)."""

    layer: int = _f(6, _int(ge=0, le=4096))
    alpha: float = _f(1.0, _float(ge=0, le=100))
    # harmful: the world's training harmful requests (refused) vs the benign training questions;
    # pairs: the sensitive vs the benign training questions
    direction: str = _f("harmful", _choice(("harmful", "pairs")))
    batch_size: int = _f(64, _int(ge=1, le=_L.max_recipe_batch))


# ---- the registry --------------------------------------------------------------------------------


class Impl:
    """A function of a module of ``ngguard.methods`` named ``"module:function"``, imported on the first
    call (the implementations load torch; the recipe that reads this table must not)."""

    __slots__ = ("ref", "_fn")

    def __init__(self, ref: str) -> None:
        module, _, name = ref.partition(":")
        if not module or not name.isidentifier():
            raise TypeError(f"expected 'module:function' (a function of a module of ngguard.methods), got {ref!r}")
        self.ref = ref
        self._fn: Callable | None = None

    def resolve(self) -> Callable:
        if self._fn is None:
            module, name = self.ref.split(":")
            self._fn = getattr(importlib.import_module(f"ngguard.methods.{module}"), name)
        return self._fn

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __getattr__(self, attr: str):  # the function's __name__, __module__, ...
        if attr in Impl.__slots__ or (attr.startswith("__") and attr not in ("__name__", "__qualname__",
                                                                             "__module__", "__wrapped__")):
            raise AttributeError(attr)  # (copy / pickle probing a bare instance)
        return getattr(self.resolve(), attr)

    def __repr__(self) -> str:
        return f"Impl({self.ref!r})"


@dataclass(frozen=True)
class Method:
    """A registry entry: the method's settings class and the recipe section holding them (``edit`` for
    the gradient edits that share ``EditSpec``; None, None: no settings of its own), its implementation
    (``"module:function"`` strings, see ``Impl``) and what the pipeline needs to know about it, declared
    (the pipeline never asks for a method by name)."""

    name: str
    hparams: type | None
    section: str | None
    apply: Impl | str | None = None      # the edit (signature above); None: it edits no weights
    needs_gates: bool = False            # ``apply`` takes the gates of localization (Eq. 6)
    # under a layer search (recipe ``layers: {search: ...}``): the method's own choice of layers,
    # ``fn(adapter, samples, unsafe, refusal, scan) -> (layers, search info)``; None: the paper's search
    choose_layers: Impl | str | None = None
    # a method that edits no weights: ``fn(training queries, refusal) -> (guard, fields for its report entry)``;
    # its results are the unedited model's, rescored behind the guard (``evaluate.rescore_with_guard``); its
    # patch is a guard patch (``ngguard.guard_patch``), served in front of the unedited model
    guard: Impl | str | None = None
    # the guard reads the model too: ``guard(train, refusal, adapter=, sets=, recipe=)`` and the guard
    # decides on whole queries (``guard.blocks_queries(queries)``: image and prompt)
    guard_needs_model: bool = False
    # the guard steers generation instead of answering with the refusal: a query it blocks is generated
    # again inside ``guard.steering()`` (a context manager of hooks; ``evaluate.rescore_with_guard``)
    steers: bool = False
    ablation_of: str | None = None       # the method this one ablates (the report sets them side by side)

    def __post_init__(self) -> None:
        for key in ("apply", "choose_layers", "guard"):
            if isinstance(getattr(self, key), str):
                object.__setattr__(self, key, Impl(getattr(self, key)))
        if (self.hparams is None) != (self.section is None):
            raise TypeError(f"method {self.name!r}: give both a settings class and its recipe section, or neither")
        if (self.apply is None) == (self.guard is None):
            raise TypeError(f"method {self.name!r}: give apply (an edit) or guard (a guard that edits no weights)")

    @property
    def edits_weights(self) -> bool:
        return self.apply is not None


# THE list of methods: a recipe's ``method`` / ``report.compare_methods`` accept these names, in this order.
REGISTRY: dict[str, Method] = {m.name: m for m in (
    # the paper (neural_gate.py: Eq. 1-7), its gate ablation, DINM: the gradient edits of the ``edit`` section
    Method("neural_gate", EditSpec, "edit", apply="neural_gate:apply_neural_gate", needs_gates=True),
    Method("no_gate", EditSpec, "edit", apply="no_gate:apply_no_gate", ablation_of="neural_gate"),
    Method("dinm", EditSpec, "edit", apply="dinm:apply_dinm", choose_layers="dinm:dinm_layers"),
    # not in the paper (issue 27): the same gated edit through one gate shared by every subject (neural_gate_plus.py)
    Method("neural_gate_plus", EditSpec, "edit", apply="neural_gate_plus:apply_neural_gate_plus"),
    # locate-then-edit closed forms (memit.py, alphaedit.py)
    Method("memit", MemitHParams, "memit", apply="memit:apply_memit"),
    Method("alphaedit", AlphaEditHParams, "alphaedit", apply="alphaedit:apply_alphaedit"),
    # no edit: a guard in front of the unedited model
    Method("keyword_filter", None, None, guard="keyword_filter:keyword_guard"),
    # not in the paper (issue 27): linear probes on the hidden states; a refusal direction where they fire
    Method("privacy_probe", PrivacyProbeHParams, "privacy_probe", guard="privacy_probe:privacy_probe_guard",
           guard_needs_model=True),
    Method("refusal_steering", RefusalSteeringHParams, "refusal_steering",
           guard="refusal_steering:refusal_steering_guard", guard_needs_model=True, steers=True),
)}


def _sections(registry: dict[str, Method]) -> dict[str, type]:
    """Recipe section -> its settings class, in registry order (TypeError: one section, two classes)."""
    out: dict[str, type] = {}
    for m in registry.values():
        if m.section is not None and out.setdefault(m.section, m.hparams) is not m.hparams:
            raise TypeError(f"method {m.name!r}: section {m.section!r} already holds {out[m.section].__name__}")
    return out


# the recipe sections of the methods (each a ``Recipe`` field: ``ngguard.recipe``)
SECTIONS: dict[str, type] = _sections(REGISTRY)
