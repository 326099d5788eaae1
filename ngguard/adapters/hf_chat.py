"""The shared base of the Hugging Face families (``HFChatAdapter``): everything that only assumes a
processor expanding one image placeholder string (``image_token``) into a run of image tokens and a
language model with LLaMA-style decoder layers.

Families (``llava.py``, ``llava_next.py``, ``qwen2_vl.py``, ``blip2.py``) subclass it and change the
structure part only. Hooks for subclasses: ``language_model`` (where the decoder layers live),
``_process`` (processor call), ``chat_prompt``, ``image_token`` / ``image_token_id``; per-token
processor outputs other than input_ids and attention_mask (e.g. Qwen2-VL's ``mm_token_type_ids``) are
re-laid-out with the rows. The default structure is transformers 5's ``model.model.language_model``
(falling back to ``get_decoder()``); ``parameter_name`` asks transformers for the saved key
(``compat.saved_key``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from ..compat import saved_key
from .base import Adapter, Batch, find_subject_span

IGNORE_INDEX = -100

# component name -> attribute path inside one decoder layer ("" = the layer itself)
COMPONENTS: dict[str, str] = {
    "layer": "",
    "mlp": "mlp",
    "down_proj": "mlp.down_proj",
    "up_proj": "mlp.up_proj",
    "gate_proj": "mlp.gate_proj",
    "self_attn": "self_attn",
}

def join_text(head: str, tail: str) -> str:
    """``head`` + ``tail`` with one separating space, none if ``head`` already ends in whitespace (a chat
    template whose generation prompt ends with a newline, like Qwen's "<|im_start|>assistant\\n")."""
    return head + tail if not head or head[-1].isspace() else f"{head} {tail}"


def target_start(head_ids: list[int], full_ids: list[int], offsets: list[tuple[int, int]], head_chars: int) -> int:
    """Index of the first target token in ``full_ids`` (the tokenisation of head + " " + target).

    Normal case: the tokenisation of the head alone is a token-prefix of the full one, so the target
    starts right after it (this keeps a space merged into the target's first token, " sorry", with the
    target). Otherwise (a token straddles the boundary) the first token that covers any character
    after the head (``offsets`` of the full string, ``head_chars`` = length of the head) starts it."""
    n = len(head_ids)
    if n <= len(full_ids) and full_ids[:n] == head_ids:
        return n
    for i, (_, end) in enumerate(offsets):
        if end > head_chars:
            return i
    return len(full_ids)


class HFChatAdapter(Adapter):
    """A transformers image-text-to-text model whose processor expands one image placeholder into a
    run of image tokens, with LLaMA-style decoder layers (``layers[i].mlp.down_proj``). Not registered:
    each family subclasses it with its config classes and what differs."""

    # transformers 5's layout of these models (``model.language_model...`` loaded, the legacy
    # ``language_model.model...`` saved): the renaming fallback (``Adapter.checkpoint_renames``)
    checkpoint_renames = (
        ("language_model.lm_head.", "lm_head."),
        ("language_model.model.", "model.language_model."),
        ("language_model.", "model.language_model."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    )

    def __init__(self, model: torch.nn.Module, processor) -> None:
        super().__init__(model, processor)
        tok = self.tokenizer
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            if gen.eos_token_id is None and tok.eos_token_id is not None:
                gen.eos_token_id = tok.eos_token_id
            if gen.pad_token_id is None:
                gen.pad_token_id = self.pad_token_id

    # ---- structure -------------------------------------------------------------------------
    @property
    def language_model(self) -> torch.nn.Module:
        inner = getattr(self.model, "model", None)
        lm = getattr(inner, "language_model", None)
        if lm is None or not hasattr(lm, "layers"):
            lm = self.model.get_decoder()
        return lm

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.language_model.layers

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    def component(self, layer: int, name: str) -> torch.nn.Module:
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}; known: {', '.join(COMPONENTS)}")
        n = self.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise ValueError(f"layer {layer!r} out of range: the model has {n} layers (0..{n - 1})")
        module = self.layers[layer]
        return module.get_submodule(COMPONENTS[name]) if COMPONENTS[name] else module

    def parameter_name(self, layer: int, name: str) -> str:
        return saved_key(self.model, self.state_dict_key(layer, name), self.checkpoint_renames)

    # ---- tokens ------------------------------------------------------------------------------
    @property
    def image_token(self) -> str:
        return getattr(self.processor, "image_token", None) or "<image>"

    @property
    def image_token_id(self) -> int:
        tid = getattr(self.processor, "image_token_id", None)
        if tid is None:
            tid = self.tokenizer.convert_tokens_to_ids(self.image_token)
        return int(tid)

    def _expand(self, prompt: str, image_tokens: int, *, placeholders: int | None = None) -> str:
        """``prompt`` with each image placeholder expanded as the processor does, given the number of
        image tokens in the whole row, spread evenly over ``placeholders`` placeholders (default: those
        in ``prompt``)."""
        n_ph = prompt.count(self.image_token) if placeholders is None else placeholders
        if n_ph == 0:
            return prompt
        if image_tokens % n_ph:
            raise ValueError(f"{image_tokens} image tokens do not split over {n_ph} image placeholders")
        return prompt.replace(self.image_token, self.image_token * (image_tokens // n_ph))

    # ---- prompts and batches -----------------------------------------------------------------
    def chat_prompt(self, text: str) -> str:
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return f"USER: {self.image_token}\n{text} ASSISTANT:"

    def encode(self, images: Sequence[Image.Image], texts: Sequence[str], *, targets: Sequence[str] | None = None,
               prefixes: Sequence[str] | None = None, subjects: Sequence[str] | None = None) -> Batch:
        texts = list(texts)
        n = len(texts)
        for what, seq in (("images", images), ("targets", targets), ("prefixes", prefixes), ("subjects", subjects)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"{len(seq)} {what} for {n} texts")
        if n == 0:
            raise ValueError("encode needs at least one text")
        tok = self.tokenizer
        prompts = [self.chat_prompt(t) for t in texts]
        heads = [join_text(p, prefixes[i]) if prefixes and prefixes[i] else p for i, p in enumerate(prompts)]
        fulls = [join_text(h, targets[i]) if targets and targets[i] else h for i, h in enumerate(heads)]

        side = "right" if targets is not None else "left"
        with self.tokenizer_lock:  # the shared tokenizer's padding state (see Adapter.tokenizer_lock)
            proc = self._process(list(images), fulls, padding_side=side)

        # per-token outputs besides input_ids/attention_mask (e.g. mm_token_type_ids): re-laid-out below
        proc_shape = tuple(proc["input_ids"].shape)
        per_token = [k for k, v in proc.items() if k not in ("input_ids", "attention_mask")
                     and isinstance(v, torch.Tensor) and v.dim() == 2 and tuple(v.shape) == proc_shape
                     and not v.is_floating_point()]
        rows: list[list[int]] = []
        extra: dict[str, list[list[int]]] = {k: [] for k in per_token}
        labels: list[list[int]] = []
        for i in range(n):
            mask = proc["attention_mask"][i].bool()
            ids = proc["input_ids"][i][mask].tolist()
            for k in per_token:
                extra[k].append(proc[k][i][mask].tolist())
            if targets is None:
                rows.append(ids)
                continue
            image_tokens = ids.count(self.image_token_id)
            full_x = self._expand(fulls[i], image_tokens)
            head_x = self._expand(heads[i], image_tokens)
            enc = self.tokenize(full_x, return_offsets_mapping=True)
            if enc["input_ids"] != ids:
                raise ValueError(
                    f"{type(self.processor).__name__} tokenised the prompt differently from its tokenizer; "
                    f"this processor is not supported by {type(self).__name__}"
                )
            start = target_start(self.tokenize(head_x)["input_ids"], ids, enc["offset_mapping"], len(head_x))
            if tok.eos_token_id is not None and (len(ids) == start or ids[-1] != tok.eos_token_id):
                ids = ids + [tok.eos_token_id]
                for k in per_token:  # the appended end-of-turn token is text
                    extra[k][i] = extra[k][i] + [0]
            rows.append(ids)
            labels.append([IGNORE_INDEX] * start + ids[start:])

        width = max(len(r) for r in rows)
        pad = self.pad_token_id
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        label_t = torch.full((n, width), IGNORE_INDEX, dtype=torch.long) if targets is not None else None
        extra_t = {k: torch.zeros((n, width), dtype=proc[k].dtype) for k in per_token}
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
            input_ids[i, sl] = torch.tensor(r, dtype=torch.long)
            attention[i, sl] = 1
            if label_t is not None:
                label_t[i, sl] = torch.tensor(labels[i], dtype=torch.long)
            for k in per_token:
                extra_t[k][i, sl] = torch.tensor(extra[k][i], dtype=proc[k].dtype)

        inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention, **extra_t}
        dtype = getattr(self.model, "dtype", torch.float32)
        for k, v in proc.items():
            if k in inputs:
                continue
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                v = v.to(dtype)
            inputs[k] = v

        subject_index = None
        if subjects is not None:
            subject_index = torch.tensor(
                [self.subject_token_index(input_ids[i], texts[i], subjects[i]) for i in range(n)], dtype=torch.long
            )
        return Batch(inputs, label_t, subject_index)

    def _process(self, images: list[Image.Image], texts: list[str], *, padding_side: str = "left"):
        """Run the processor on a batch padded on ``padding_side`` (called under ``tokenizer_lock``): a
        mapping with input_ids, attention_mask and the vision inputs, each placeholder expanded into
        image tokens."""
        return self.processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side=padding_side)

    def subject_token_index(self, input_ids: torch.Tensor, text: str, subject: str) -> int:
        row = [int(x) for x in input_ids.tolist()]
        s, e = find_subject_span(text, subject)
        prompt = self.chat_prompt(text)
        at = prompt.rfind(text)
        if at < 0 and text.strip() and text.strip() != text:  # a template that strips the user text
            shift = len(text) - len(text.lstrip())
            at = prompt.rfind(text.strip())
            s, e = s - shift, e - shift
            if s < 0 or e > len(text.strip()):
                at = -1
        if at < 0:
            raise ValueError(f"the chat template changed the user text {text!r}; cannot locate subject {subject!r}")
        # expand the placeholders before and after the user text alike (image first or last)
        image_tokens = row.count(self.image_token_id)
        before = self._expand(prompt[:at], image_tokens, placeholders=prompt.count(self.image_token))
        expanded = before + self._expand(prompt[at:], image_tokens, placeholders=prompt.count(self.image_token))
        last_char = len(before) + e - 1
        enc = self.tokenize(expanded, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        j = next((k for k, (a, b) in enumerate(offsets) if a <= last_char < b and b > a), None)
        if j is None:  # no token covers the character exactly (odd offsets): last token starting before it
            j = max((k for k, (a, b) in enumerate(offsets) if b > a and a <= last_char), default=None)
        if j is None:
            raise ValueError(f"subject {subject!r} not mapped to a token in {text!r}")
        head = enc["input_ids"][: j + 1]
        for start in range(0, len(row) - len(head) + 1):
            if row[start : start + len(head)] == head:
                return start + j
        raise ValueError(f"input_ids do not contain the prompt of {text!r}; encode it with this adapter")

    @torch.no_grad()
    def generate(self, images: Sequence[Image.Image], texts: Sequence[str], *, max_new_tokens: int = 32,
                 stop=None) -> list[str]:
        batch = self.encode(images, texts).to(self.device)
        width = batch.inputs["input_ids"].shape[1]
        criteria = None if stop is None else stop.criteria(width)
        out = self.model.generate(**batch.inputs, generation_config=self.greedy_config(max_new_tokens),
                                  stopping_criteria=criteria)
        answers = [s.strip() for s in self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
        return answers if stop is None else [stop.cut(a) for a in answers]
