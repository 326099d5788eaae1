"""The model adapter interface: everything the algorithm needs to know about a model family.

The algorithm (localize, edit, evaluate, guard) talks to models ONLY through an ``Adapter``.
A new family = one new module in ``ngguard/adapters/`` registering its config class names.
"""
from __future__ import annotations

import copy
import functools
import re
import string
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import AutoProcessor

from ..devices import input_device, module_device


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


@dataclass(frozen=True)
class VisionExport:
    """Where a family's image features come from, as data (``ngguard.onnx_vision`` exports and checks
    them; nothing there knows a family). On the loaded model, the first of ``owners`` (attribute paths,
    "" = the model itself) that has ``features`` and every one of ``parts`` owns the vision path:
    ``owner.<features>(pixel_values=..., **{a: config.a for a in feature_config})`` gives one fixed-size
    [N, D] block per image, the output of the LAST part (the projector). ``parts``: the vision modules
    (the export copies them, the fingerprint covers them); ``image_token_config``: the config attributes
    that may hold the image token id (the first one set wins)."""

    features: str
    parts: tuple[str, ...]
    feature_config: tuple[str, ...] = ()
    image_token_config: tuple[str, ...] = ("image_token_id",)
    owners: tuple[str, ...] = ("model", "")


class Adapter(ABC):
    """Wraps a loaded HF model + processor of one family."""

    config_classes: ClassVar[tuple[str, ...]] = ()  # names of the HF config classes handled
    # config class name -> name of the ``transformers`` model class that ``load_adapter`` instantiates
    model_classes: ClassVar[dict[str, str]] = {}
    # ONNX export of the image features (``VisionExport``); None: this family's are not exportable
    vision_export: ClassVar[VisionExport | None] = None
    # (saved prefix, loaded prefix) pairs: how ``save_pretrained`` names differ from the loaded model's,
    # for patches (checkpoint names <-> parameters) when transformers' own renaming API is not there
    # (``compat.saved_key`` / ``compat.checkpoint_renames`` fall back to them)
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, model: torch.nn.Module, processor) -> None:
        self.model = model
        self.processor = processor
        self.__dict__.setdefault("_tokenizer_lock", threading.RLock())

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
    def encode(self, images: Sequence[Image.Image], texts: Sequence[str], *, targets: Sequence[str] | None = None,
               prefixes: Sequence[str] | None = None, subjects: Sequence[str] | None = None) -> Batch:
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
    def generate(self, images: Sequence[Image.Image], texts: Sequence[str], *, max_new_tokens: int = 32,
                 stop=None) -> list[str]:
        """Greedy answers, batched, decoded without special tokens and stripped. ``stop``: a
        ``ngguard.serving.stop.StopAfter``: each answer ends at the end of that refusal (serving)."""

    # Inputs that only feed the vision encoder: they may be dropped when the decoder layers that
    # would consume the image features are replayed from a cache (see hooks.replayed_prefix).
    vision_only_inputs: ClassVar[tuple[str, ...]] = ()

    # True when the language model takes a pre-filled ``DynamicCache`` for a prefix of the prompt and
    # places the remaining tokens after it by the cache length alone (1-D RoPE positions): localization
    # then computes the frozen prefix before the subject token once (see fastpath.prefix_length).
    # M-RoPE (Qwen2-VL) and models that always re-run the vision tower (BLIP-2) keep it off.
    prefix_cache: ClassVar[bool] = False

    @classmethod
    def load_processor(cls, path, *, trust_remote_code: bool = False):
        """Load the processor saved in the model folder ``path`` (``load_adapter`` calls this). Families
        whose stock processor needs optional packages override it with a fallback."""
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)

    @property
    def device(self) -> torch.device:
        """Where inputs go (the main device of a model spread over several, see ``ngguard.devices``)."""
        return input_device(self.model)

    def layer_device(self, layer: int) -> torch.device:
        """Where decoder layer ``layer`` computes: its scaling vectors, gates, deltas and recorded
        states are kept there."""
        return module_device(self.component(layer, "layer"), self.model)

    # ---- user text inside a served prompt -------------------------------------------------------
    @functools.cached_property
    def special_strings(self) -> frozenset[str]:
        """The tokenizer's special tokens (bos/eos/pad, ``<|im_start|>``, ...) and the image placeholder."""
        tok = self.text_tokenizer
        specials = set(getattr(tok, "all_special_tokens", None) or [])
        for added in (getattr(tok, "added_tokens_decoder", None) or {}).values():
            if getattr(added, "special", False):
                specials.add(str(getattr(added, "content", added)))
        image_token = getattr(self, "image_token", None)
        if image_token:
            specials.add(str(image_token))
        return frozenset(s for s in specials if s and s.strip())

    @functools.cached_property
    def control_strings(self) -> tuple[str, ...]:
        """Strings that structure this family's prompt and must never come from a user, longest
        first: ``special_strings`` and the role markers and tags the chat template writes around
        the turns ("USER:", "Assistant:", "[INST]", "<Img>", ...). Derived, not listed: the prompt
        is rendered around sentinel texts (one user turn via ``chat_prompt``; user / assistant /
        user turns via the chat template when there is one) and what lies between the sentinels is
        searched for role names followed by a colon and for bracketed tags."""
        specials = self.special_strings
        markers = set(specials)
        for frag in _template_fragments(self):
            for s in sorted(specials, key=len, reverse=True):
                frag = frag.replace(s, "\n")
            markers.update(m.group(0) for m in _TAG.finditer(frag))
            markers.update(f"{m.group(1)}:" for m in _ROLE_COLON.finditer(frag))
        return tuple(sorted(markers, key=lambda m: (-len(m), m)))

    @functools.cached_property
    def assistant_markers(self) -> tuple[str, ...]:
        """The role markers / tags that open the ASSISTANT's turn ("ASSISTANT:", "[/INST]"): those
        of ``control_strings`` (special tokens aside) in the generation prompt after the user's
        text but not before it. Empty when the assistant's turn opens with special tokens only
        (Qwen's "<|im_start|>assistant")."""
        sentinel = _SENTINELS[0]
        before, _, after = self.chat_prompt(sentinel).partition(sentinel)
        return tuple(m for m in self.control_strings if m not in self.special_strings
                     and re.search(_marker_regex(m), after) and not re.search(_marker_regex(m), before))

    def neutralize(self, text: str) -> str:
        """``text`` as plain user words: a fake assistant turn (from an ``assistant_markers`` entry
        to the next other control string or the end) is dropped, then every ``control_strings``
        entry is replaced by a space (role markers matched case-insensitively, with any spaces before
        the colon), runs of spaces collapsed and outer whitespace stripped. User text can no longer
        open a turn, close one, put words in the assistant's mouth, or add an image placeholder.
        Idempotent."""
        fake_turn, pattern = self._control_patterns
        if pattern is None:
            return text.strip()
        for _ in range(8):  # a replacement inserts a space, so nothing re-forms; loop for safety
            new = pattern.sub(" ", fake_turn.sub(" ", text) if fake_turn is not None else text)
            if new == text:
                break
            text = new
        text = re.sub(r"[ \t]*\n[ \t]*", "\n", re.sub(r"[ \t]{2,}", " ", text))
        return text.strip()

    @functools.cached_property
    def _control_patterns(self) -> "tuple[re.Pattern[str] | None, re.Pattern[str] | None]":
        """(a fake assistant turn: opener up to the next other control string or the end, any control string)."""
        if not self.control_strings:
            return None, None
        every = re.compile("|".join(_marker_regex(m) for m in self.control_strings))
        openers = self.assistant_markers
        others = [m for m in self.control_strings if m not in openers]
        if not openers:
            return None, every
        until = "|".join(_marker_regex(m) for m in others) or "(?!)"
        fake = re.compile(f"(?:{'|'.join(_marker_regex(m) for m in openers)})[\\s\\S]*?(?={until}|\\Z)")
        return fake, every

    # ---- tokens (used by localization's prefix cache, MEMIT's statistics, serving, ONNX) -------------
    @property
    def tokenizer(self):
        """The tokenizer of the processor (or the processor itself if it is one)."""
        return getattr(self.processor, "tokenizer", None) or self.processor

    @property
    def text_tokenizer(self):
        """The same as ``tokenizer`` (the older name)."""
        return self.tokenizer

    @property
    @abstractmethod
    def image_token(self) -> str:
        """The image placeholder string of a prompt, before the processor expands it."""

    @property
    @abstractmethod
    def image_token_id(self) -> int:
        """The id every image position carries in ``input_ids``."""

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def greedy_config(self, max_new_tokens: int):
        """The generation config of ``generate`` (and of serving): the model's, greedy, ``max_new_tokens``
        new tokens, pad/eos filled in from the tokenizer when the model's config lacks them."""
        config = copy.deepcopy(self.model.generation_config)
        config.do_sample = False
        config.num_beams = 1
        config.temperature = None
        config.top_p = None
        config.top_k = None
        config.max_new_tokens = int(max_new_tokens)
        config.max_length = None
        if config.pad_token_id is None:
            config.pad_token_id = self.pad_token_id
        if config.eos_token_id is None:
            config.eos_token_id = self.tokenizer.eos_token_id
        return config

    # A Hugging Face tokenizer is NOT safe to call from several threads at once: each ``__call__`` of a
    # fast tokenizer first sets the Rust backend's padding and truncation (``set_truncation_and_padding``
    # -> ``enable_padding`` / ``no_padding``) and then encodes with whatever the backend holds by then,
    # so a call without padding (a request thread counting tokens) can switch padding off under a padded
    # batch call (the batcher's thread): rows of different lengths, "Unable to create tensor". Hence:
    # every call through the shared tokenizer or processor holds ``tokenizer_lock`` (``tokenize``,
    # ``encode``, ``subject_token_index``), the padding side is passed per call (never set on the
    # shared object), and counting (request threads, many at once) uses a backend of its own that
    # nobody reconfigures (``count_tokens``: no lock, no shared state).
    @property
    def tokenizer_lock(self) -> "threading.RLock":
        """Held around every call of the shared tokenizer / processor that sets its state."""
        return self.__dict__.setdefault("_tokenizer_lock", threading.RLock())

    def tokenize(self, text, **kwargs):
        """``self.tokenizer(text, **kwargs)`` under ``tokenizer_lock`` (see above)."""
        with self.tokenizer_lock:
            return self.tokenizer(text, **kwargs)

    @functools.cached_property
    def _token_counter(self):
        """A private copy of the fast tokenizer's Rust backend, without padding or truncation, for
        ``count_tokens`` (encoding with it changes no state, so any thread may use it at once); None
        for a tokenizer without a Rust backend."""
        with self.tokenizer_lock:
            backend = getattr(self.text_tokenizer, "backend_tokenizer", None)
            if backend is None:
                return None
            counter = Tokenizer.from_str(backend.to_str())
        counter.no_padding()
        counter.no_truncation()
        counter.encode_special_tokens = bool(getattr(self.text_tokenizer, "split_special_tokens", False))
        return counter

    @functools.cached_property
    def prompt_overhead(self) -> int:
        """Positions a prompt takes besides the user's text: the chat template and the image tokens,
        measured once on a 336x336 image (exact for families with a fixed number of image tokens;
        families that tile larger images use more for those). ``ngguard.limits.TokenBudget`` uses it."""
        text = "x"
        batch = self.encode([Image.new("RGB", (336, 336))], [text])
        return max(0, int(batch.inputs["attention_mask"][0].sum()) - self.count_tokens(text))

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` alone (no special tokens added), as ``tokenizer(text,
        add_special_tokens=False)`` counts them; safe from any number of threads beside ``encode``."""
        counter = self._token_counter
        if counter is None:
            return len(self.tokenize(text, add_special_tokens=False)["input_ids"])
        return len(counter.encode(text, add_special_tokens=False).ids)

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


# role names followed by a colon ("USER:", "Assistant :") and bracketed tags ("[INST]", "</Img>", "<<SYS>>")
_ROLE_COLON = re.compile(r"(?i)\b(user|assistant|system|human|gpt)[ \t]*:")
_TAG = re.compile(r"\[/?[A-Za-z_]{1,16}\]|<<?/?\|?[A-Za-z_]{1,16}\|?>>?")
def _marker_regex(marker: str) -> str:
    """The pattern that finds ``marker`` in user text: role markers ("USER:") in any case and with
    spaces before the colon, tags ("[INST]") in any case, special tokens exactly."""
    role = _ROLE_COLON.fullmatch(marker)
    if role:
        return rf"(?i:\b{re.escape(role.group(1))}[ \t]*:)"
    if _TAG.fullmatch(marker):
        return f"(?i:{re.escape(marker)})"
    return re.escape(marker)


_SENTINELS = ("qzxsentineluserzeroqzx", "qzxsentinelassistantqzx", "qzxsentineluseroneqzx", "qzxsentinelsystemqzx")


def _template_fragments(adapter: "Adapter") -> list[str]:
    """The prompt text around the user's (and assistant's) words: ``chat_prompt`` of one sentinel
    turn split at the sentinel, plus (when the processor or tokenizer has a chat template) a
    system / user / assistant / user conversation rendered with a generation prompt, split at its
    sentinels. Templates that refuse a system role or list content are tried without them."""
    s_user, s_asst, s_user2, s_sys = _SENTINELS
    rendered = [adapter.chat_prompt(s_user)]
    owner = next((o for o in (adapter.processor, adapter.text_tokenizer)
                  if getattr(o, "chat_template", None)), None)
    if owner is not None:
        turns = [("user", s_user), ("assistant", s_asst), ("user", s_user2)]
        for system in (True, False):
            for as_list in (True, False):
                conv = ([{"role": "system", "content": s_sys}] if system else []) + [
                    {"role": r, "content": [{"type": "text", "text": t}] if as_list else t} for r, t in turns]
                try:
                    text = owner.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
                except Exception:  # noqa: BLE001 - a template may refuse this shape; try the next
                    continue
                if isinstance(text, str) and s_asst in text:
                    rendered.append(text)
                    break
    split = re.compile("|".join(_SENTINELS))
    return [frag for text in rendered for frag in split.split(text) if frag.strip()]
