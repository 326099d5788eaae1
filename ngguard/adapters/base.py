"""The model adapter interface: everything the algorithm needs to know about a model family.

The algorithm (localize, edit, evaluate, guard) talks to models ONLY through an ``Adapter``.
A new family = one new module in ``ngguard/adapters/`` registering its config class names.
"""
from __future__ import annotations

import re
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from PIL import Image


@dataclass
class Batch:
    """Model inputs for a batch of (image, prompt[, prefix][, target]) rows.

    ``inputs`` goes straight into ``model(**inputs)`` (input_ids, attention_mask, pixel_values, ...).
    ``labels``: same shape as input_ids and aligned with it (not shifted): -100 everywhere except the
    target tokens (+ end-of-turn token); None without targets.
    ``subject_index``: [B] position (in input_ids) of the LAST token of the subject words; None without subjects.
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None
    subject_index: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()},
            None if self.labels is None else self.labels.to(device),
            None if self.subject_index is None else self.subject_index.to(device),
        )


class Adapter(ABC):
    """Wraps a loaded HF model + processor of one family."""

    config_classes: ClassVar[tuple[str, ...]] = ()  # names of the HF config classes handled
    # config class name -> name of the ``transformers`` model class that ``load_adapter`` instantiates
    model_classes: ClassVar[dict[str, str]] = {}

    def __init__(self, model: torch.nn.Module, processor) -> None:
        self.model = model
        self.processor = processor

    # ---- structure -------------------------------------------------------------------------
    @property
    @abstractmethod
    def layers(self) -> torch.nn.ModuleList:
        """The decoder layers of the language model."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    @abstractmethod
    def hidden_size(self) -> int: ...

    @abstractmethod
    def component(self, layer: int, name: str) -> torch.nn.Module:
        """A named component of decoder layer ``layer``: "layer", "mlp", "down_proj" (others optional).
        Raises ValueError (one line) for an unknown name or out-of-range layer."""

    @abstractmethod
    def parameter_name(self, layer: int, name: str) -> str:
        """Full key of the weight of component ``name`` in ``layer`` as written by ``save_pretrained``
        (the safetensors key, e.g. "language_model.model.layers.11.mlp.down_proj.weight" for LLaVA
        in transformers 5). The key inside the loaded model is ``state_dict_key``."""

    # ---- prompts and batches -----------------------------------------------------------------
    @abstractmethod
    def chat_prompt(self, text: str) -> str:
        """The full prompt string for one user turn with one image, generation prompt appended."""

    @abstractmethod
    def encode(
        self,
        images: Sequence[Image.Image],
        texts: Sequence[str],
        *,
        targets: Sequence[str] | None = None,
        prefixes: Sequence[str] | None = None,
        subjects: Sequence[str] | None = None,
    ) -> Batch:
        """Tokenise a batch. ``prefixes``: answer-start text placed after the generation prompt, not
        labelled. ``targets``: answer text (labelled, followed by the end-of-turn/eos token).
        With targets: right padding (training). Without: left padding (generation)."""

    @abstractmethod
    def subject_token_index(self, input_ids: torch.Tensor, text: str, subject: str) -> int:
        """Position in ``input_ids`` (1-D, one row as encoded by ``encode``) of the last token of the
        subject words inside the user text. Case-insensitive, robust to BPE splits and leading spaces.
        Raises ValueError if the subject is not in the text."""

    @torch.no_grad()
    @abstractmethod
    def generate(self, images: Sequence[Image.Image], texts: Sequence[str], *, max_new_tokens: int = 32) -> list[str]:
        """Greedy answers, batched, decoded without special tokens and stripped."""

    # Inputs that only feed the vision encoder: they may be dropped when the decoder layers that
    # would consume the image features are replayed from a cache (see localize.replayed_prefix).
    vision_only_inputs: ClassVar[tuple[str, ...]] = ()

    # True when the language model takes a pre-filled ``DynamicCache`` for a prefix of the prompt and
    # places the remaining tokens after it by the cache length alone (1-D RoPE positions): localization
    # then computes the frozen prefix before the subject token once (see localize.prefix_length).
    # M-RoPE (Qwen2-VL) and models that always re-run the vision tower (BLIP-2) keep it off.
    prefix_cache: ClassVar[bool] = False

    @classmethod
    def load_processor(cls, path, *, trust_remote_code: bool = False):
        """Load the processor saved in the model folder ``path`` (``load_adapter`` calls this). Families
        whose stock processor needs optional packages override it with a fallback."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- helpers shared by all families ----------------------------------------------------------
    def state_dict_key(self, layer: int, name: str) -> str:
        """Key of the weight of component ``name`` in the LOADED model (``model.state_dict()`` /
        ``model.get_parameter``). It can differ from ``parameter_name`` (the key in the saved files):
        transformers 5 renames some families' weights on load and back on save."""
        weight = getattr(self.component(layer, name), "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            raise ValueError(f"component {name!r} has no single weight matrix")
        for key, param in self.model.named_parameters():
            if param is weight:
                return key
        raise ValueError(f"weight of component {name!r} in layer {layer} is not a parameter of the model")


def subject_candidates(subject: str) -> list[str]:
    """The subject, then fallbacks: without trailing punctuation / a trailing " en", then each of
    those in singular/plural (a trailing "s" dropped or added). Order = preference."""
    base = [subject.strip()]
    cut = subject
    while True:
        new = re.sub(r"\s+en$", "", cut.rstrip(string.punctuation + string.whitespace), flags=re.IGNORECASE)
        if new == cut:
            break
        cut = new
    base.append(cut.strip())
    out: list[str] = []
    for s in base + [s[:-1] if s.lower().endswith("s") else s + "s" for s in base]:
        if s and s.lower() not in (o.lower() for o in out):
            out.append(s)
    return out


def find_subject_span(text: str, subject: str) -> tuple[int, int]:
    """Character span [start, end) of the LAST occurrence of ``subject`` in ``text``, case-insensitive,
    any run of whitespace matching any other. Whole-word matches are preferred over matches inside a
    word ("ID" in "Did"), then the fallbacks of ``subject_candidates`` are tried.
    Raises ValueError naming the subject and the text when nothing matches."""
    cands = subject_candidates(subject)
    for whole_word in (True, False):
        for cand in cands:
            pattern = r"\s+".join(re.escape(w) for w in cand.split())
            if whole_word:
                pattern = rf"(?<!\w){pattern}(?!\w)"
            matches = list(re.finditer(pattern, text, flags=re.IGNORECASE))
            if matches:
                return matches[-1].span()
    raise ValueError(f"subject {subject!r} not found in text {text!r}")
