"""Model judges: a refusal judgement from a HF checkpoint instead of rules.

- ``ClassifierJudge``: any ``AutoModelForSequenceClassification`` checkpoint that labels refusals
  (e.g. a distilroberta rejection classifier). Its class names (``config.id2label``) map onto
  ``refusal`` / ``partial`` / ``compliance`` through ``labels`` (names or ids); without a mapping,
  well-known names are recognised (REJECTION/NORMAL, refusal/compliance, ...), anything else is an
  error naming the classes. Input: the response alone (``input: response``, default) or the
  (prompt, response) pair (``input: pair``).
- ``GenerativeJudge``: any ``AutoModelForCausalLM`` guard that answers a refusal question about
  (prompt, response) (WildGuard, Llama Guard, Qwen3Guard style). The question lives in a small
  template file (``ngguard/judges/*.yaml``, or your own): ``format`` text (``prompt`` with
  ``{prompt}`` / ``{response}`` placeholders), chat (the filled ``prompt`` as one user turn through
  the tokenizer's chat template) or chat-pair (user = prompt, assistant = response, as guard models
  take them); ``mode: options`` compares the log-likelihood of each continuation in ``answers``
  (``" yes": refusal``), ``mode: generate`` decodes greedily and reads the first group of
  ``pattern`` (looked up in ``answers``; ``unparsed`` says what an unreadable output means:
  error, the default, or a label).

Both run batched (``batch_size``), on CUDA when there is one (``device``), load safetensors only
and never remote code. ``info()`` names the checkpoint and a fingerprint: sha256 over its
``config.json`` and ``*.safetensors`` bytes plus the label mapping / template, so two results with
the same fingerprint were judged by the same weights and question.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from loguru import logger

from ngguard.judges.base import LABELS, _JudgeBase, check_batch
from ngguard.limits import DEFAULT_LIMITS, read_text_file
from ngguard.safe_yaml import parse_yaml

# torch and transformers (and ngguard.devices, which imports torch) are imported inside the functions
# that build or run a model judge: ngguard.judges, and through it the recipe and the CLI, load without
# them (tests/test_imports.py checks it)

# checkpoint class names understood without a mapping (lower-cased)
KNOWN_CLASS_NAMES: dict[str, str] = {
    **{k: "refusal" for k in ("refusal", "refused", "refuse", "rejection", "reject", "rejected", "refusing",
                              "full_refusal", "full refusal")},
    **{k: "partial" for k in ("partial", "partial_refusal", "partial refusal", "partial-refusal")},
    **{k: "compliance" for k in ("compliance", "complied", "comply", "compliant", "normal", "answer", "answered",
                                 "non-refusal", "non_refusal", "not_refusal", "no_refusal", "accept", "accepted")},
}
TEMPLATE_DIR = Path(__file__).resolve().parent  # the bundled *.yaml templates live beside this module
_TEMPLATE_KEYS = {"description", "format", "prompt", "add_special_tokens", "mode", "answers", "pattern",
                  "max_new_tokens", "unparsed"}


def _device(name: str | None) -> str:
    from ngguard.devices import pick_device  # torch: see the note at the top

    return pick_device(name)


def _checkpoint_dir(path: str, kind: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: {kind} judge checkpoint folder not found")
    if not (p / "config.json").is_file():
        raise ValueError(f"{p}: not a HF checkpoint folder (no config.json)")
    if not any(p.glob("*.safetensors")):
        raise ValueError(f"{p}: no .safetensors weights ({kind} judges load safetensors only)")
    return p


def fingerprint(folder: Path, extra: Any) -> str:
    """sha256 over config.json + every *.safetensors file (name and bytes) + ``extra`` (JSON)."""
    h = hashlib.sha256()
    for f in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    h.update(json.dumps(extra, sort_keys=True, ensure_ascii=True, default=str).encode())
    return h.hexdigest()[:16]


def _label_value(v: Any, where: str) -> str:
    if v not in LABELS:
        raise ValueError(f"{where}: {v!r} is not a judge label; use one of {', '.join(LABELS)}")
    return v


def _load(model_cls_name: str, folder: Path, device: str, kind: str):
    import transformers  # see the note at the top
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    model_cls = getattr(transformers, model_cls_name)
    try:
        model, loading = model_cls.from_pretrained(folder, config=config, use_safetensors=True, local_files_only=True,
                                                   trust_remote_code=False, output_loading_info=True)
    except ValueError as e:  # "Unrecognized configuration class ..." for the wrong model kind
        raise ValueError(f"{folder}: cannot load as a {kind} judge ({model_cls_name}): "
                         f"{str(e).splitlines()[0]}") from None
    missing = sorted(loading.get("missing_keys") or [])
    if missing:  # e.g. a classifier loaded as a causal LM: its lm_head would be random
        raise ValueError(f"{folder}: cannot load as a {kind} judge ({model_cls_name}): weights missing from the "
                         f"checkpoint ({', '.join(missing[:3])}); is it the right kind of model?")
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: no usable tokenizer for the {kind} judge: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    return model, tok


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


# ---- classifier ---------------------------------------------------------------------------------


@dataclass
class ClassifierJudge(_JudgeBase):
    """A sequence-classification checkpoint. ``class_to_label[i]`` = the judge label of class i."""

    model: Any
    tokenizer: Any
    class_to_label: tuple[str, ...]
    path: str = ""
    input: str = "response"
    batch_size: int = 32
    max_length: int = 512
    _fingerprint: str = field(default="", repr=False)

    @classmethod
    def from_spec(cls, spec: Mapping) -> "ClassifierJudge":
        folder = _checkpoint_dir(spec["path"], "classifier")
        model, tok = _load("AutoModelForSequenceClassification", folder, _device(spec.get("device")), "classifier")
        id2label = {int(i): str(n) for i, n in model.config.id2label.items()}
        mapping = resolve_class_labels(id2label, spec.get("labels"), str(folder))
        inp = spec.get("input", "response")
        fp = fingerprint(folder, {"labels": mapping, "input": inp})
        logger.info("classifier judge {} (classes {}, fingerprint {})", folder,
                    {id2label[i]: mapping[i] for i in sorted(id2label)}, fp)
        return cls(model, tok, mapping, str(folder), inp, spec.get("batch_size", 32), spec.get("max_length", 512), fp)

    def labels(self, responses: Sequence[str | None], prompts: Sequence[str | None] | None = None) -> list[str]:
        import torch  # see the note at the top

        prompts = check_batch(responses, prompts, "classifier judge")
        if self.input == "pair" and any(p is None for p in prompts):
            raise ValueError("classifier judge: input 'pair' needs the prompt of every response")
        texts = [r or "" for r in responses]
        device = next(self.model.parameters()).device
        out: list[str] = []
        for a, b in _batches(len(texts), self.batch_size):
            args = (texts[a:b],) if self.input == "response" else (list(prompts[a:b]), texts[a:b])
            enc = self.tokenizer(*args, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            with torch.no_grad():
                logits = self.model(**{k: v.to(device) for k, v in enc.items()}).logits  # [B, classes]
            out += [self.class_to_label[i] for i in logits.argmax(-1).tolist()]
        return out

    def info(self) -> dict:
        return {"kind": "classifier", "name": f"classifier:{Path(self.path).name}", "path": self.path,
                "fingerprint": self._fingerprint, "input": self.input}


def resolve_class_labels(id2label: Mapping[int, str], labels: Mapping | None, where: str) -> tuple[str, ...]:
    """Judge label of every class id. ``labels`` keys: class names (as in id2label) or ids."""
    names = {n.lower(): i for i, n in id2label.items()}
    mapping: dict[int, str] = {}
    if labels:
        for key, value in labels.items():
            k = str(key)
            if k.lower() in names:
                i = names[k.lower()]
            elif k.isdigit() and int(k) in id2label:
                i = int(k)
            else:
                raise ValueError(f"{where}: judge labels: {key!r} is not a class of this checkpoint "
                                 f"(classes: {', '.join(id2label[i] for i in sorted(id2label))})")
            mapping[i] = _label_value(value, f"{where}: judge labels.{key}")
    for i, n in id2label.items():
        if i not in mapping and n.lower() in KNOWN_CLASS_NAMES:
            mapping[i] = KNOWN_CLASS_NAMES[n.lower()]
    missing = [id2label[i] for i in sorted(id2label) if i not in mapping]
    if missing:
        raise ValueError(f"{where}: cannot tell what the classifier's classes {', '.join(missing)} mean; give "
                         f"labels: {{{missing[0]}: refusal, ...}} (values: {', '.join(LABELS)})")
    if "refusal" not in mapping.values() and "partial" not in mapping.values():
        raise ValueError(f"{where}: judge labels: no class maps to refusal or partial")
    return tuple(mapping[i] for i in range(len(id2label)))


# ---- generative ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A generative judge's question (see the module docstring)."""

    prompt: str
    format: str = "text"
    mode: str = "options"
    answers: tuple[tuple[str, str], ...] = ()
    pattern: str | None = None
    max_new_tokens: int = 16
    add_special_tokens: bool = True
    unparsed: str = "error"
    description: str = ""
    source: str = ""

    @classmethod
    def load(cls, name: str) -> "Template":
        """``name``: a path to a YAML file, or the name of a bundled one (``wildguard``, ...)."""
        p = Path(name).expanduser()
        if not p.is_file():
            bundled = TEMPLATE_DIR / f"{name}.yaml"
            if not bundled.is_file():
                have = ", ".join(sorted(f.stem for f in TEMPLATE_DIR.glob("*.yaml")))
                raise FileNotFoundError(f"{name}: judge template not found (a YAML file, or one of: {have})")
            p = bundled
        # a regular file of recipe size, read by the recipes' hardened YAML loader (one line naming the file)
        raw = parse_yaml(read_text_file(p, DEFAULT_LIMITS.max_recipe_bytes, what="judge template"),
                         f"{p}: judge template")
        return cls.from_dict(raw, str(p))

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "Template":
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: a judge template is a mapping (format, prompt, mode, answers, ...)")
        extra = sorted(set(raw) - _TEMPLATE_KEYS)
        if extra:
            raise ValueError(f"{where}: {extra[0]}: unknown template key (allowed: {', '.join(sorted(_TEMPLATE_KEYS))})")
        fmt = raw.get("format", "text")
        if fmt not in ("text", "chat", "chat-pair"):
            raise ValueError(f"{where}: format: expected text, chat or chat-pair, got {fmt!r}")
        prompt = raw.get("prompt", "")
        if fmt != "chat-pair":
            if not isinstance(prompt, str) or "{response}" not in prompt:
                raise ValueError(f"{where}: prompt: must be a string containing {{response}} (and usually {{prompt}})")
            try:
                prompt.format(prompt="", response="")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{where}: prompt: bad placeholder {e} (only {{prompt}} and {{response}}; "
                                 f"write literal braces as {{{{ }}}})") from None
        mode = raw.get("mode", "options")
        if mode not in ("options", "generate"):
            raise ValueError(f"{where}: mode: expected options or generate, got {mode!r}")
        answers = raw.get("answers")
        if not isinstance(answers, Mapping) or not answers:
            raise ValueError(f"{where}: answers: expected a mapping {{answer text: refusal|partial|compliance}}")
        pairs = tuple((str(k), _label_value(v, f"{where}: answers.{k}")) for k, v in answers.items())
        pattern = raw.get("pattern")
        if mode == "generate":
            if not isinstance(pattern, str):
                raise ValueError(f"{where}: pattern: generate mode needs a regular expression with one group")
            try:
                if re.compile(pattern).groups < 1:
                    raise ValueError(f"{where}: pattern: needs one (group) holding the answer")
            except re.error as e:
                raise ValueError(f"{where}: pattern: invalid regular expression: {e}") from None
        unparsed = raw.get("unparsed", "error")
        if unparsed != "error":
            _label_value(unparsed, f"{where}: unparsed")
        mnt = raw.get("max_new_tokens", 16)
        if isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 1:
            raise ValueError(f"{where}: max_new_tokens: expected a positive integer, got {mnt!r}")
        return cls(prompt=prompt or "", format=fmt, mode=mode, answers=pairs, pattern=pattern, max_new_tokens=mnt,
                   add_special_tokens=bool(raw.get("add_special_tokens", fmt == "text")), unparsed=unparsed,
                   description=str(raw.get("description", "")), source=where)

    def text(self, tokenizer, prompt: str | None, response: str) -> str:
        """The judge's input for one (prompt, response)."""
        if self.format == "text":
            return self.prompt.format(prompt=prompt or "", response=response)
        if self.format == "chat":
            msgs = [{"role": "user", "content": self.prompt.format(prompt=prompt or "", response=response)}]
        else:
            msgs = [{"role": "user", "content": prompt or ""}, {"role": "assistant", "content": response}]
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{self.source}: format {self.format} needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=self.format == "chat")

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "format": self.format, "mode": self.mode, "answers": list(self.answers),
                "pattern": self.pattern, "max_new_tokens": self.max_new_tokens,
                "add_special_tokens": self.add_special_tokens, "unparsed": self.unparsed}


@dataclass
class GenerativeJudge(_JudgeBase):
    model: Any
    tokenizer: Any
    template: Template
    path: str = ""
    batch_size: int = 8
    _fingerprint: str = field(default="", repr=False)

    @classmethod
    def from_spec(cls, spec: Mapping) -> "GenerativeJudge":
        template = Template.load(spec["template"])
        folder = _checkpoint_dir(spec["path"], "generative")
        model, tok = _load("AutoModelForCausalLM", folder, _device(spec.get("device")), "generative")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        fp = fingerprint(folder, template.to_dict())
        logger.info("generative judge {} (template {}, {} mode, fingerprint {})", folder, template.source,
                    template.mode, fp)
        return cls(model, tok, template, str(folder), spec.get("batch_size", 8), fp)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=self.template.add_special_tokens)["input_ids"] for t in texts]

    def option_logprobs(self, texts: list[str]) -> "torch.Tensor":
        """[N, n_answers] summed log-probabilities of each answer continuation after each input."""
        import torch  # see the note at the top

        prefixes = self._encode(texts)
        options = [self.tokenizer(a, add_special_tokens=False)["input_ids"] for a, _ in self.template.answers]
        if any(not o for o in options):
            raise ValueError(f"{self.template.source}: an answer tokenizes to nothing")
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        pairs = [(p, o) for p in prefixes for o in options]
        scores: list[float] = []
        step = self.batch_size * len(options)
        for a, b in _batches(len(pairs), step):
            chunk = pairs[a:b]
            width = max(len(p) + len(o) for p, o in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # [B, T], right-padded
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (p, o) in enumerate(chunk):
                seq = p + o
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B, T, V]
            for r, (p, o) in enumerate(chunk):
                pos = torch.arange(len(p) - 1, len(p) + len(o) - 1, device=logits.device)  # positions predicting o
                logp = logits[r, pos].float().log_softmax(-1)  # [len(o), V]
                scores.append(float(logp[torch.arange(len(o)), torch.tensor(o, device=logits.device)].sum()))
        return torch.tensor(scores).view(len(texts), len(options))

    def generate(self, texts: list[str]) -> list[str]:
        """Greedy continuations (left padding, batched)."""
        import torch  # see the note at the top

        device = next(self.model.parameters()).device
        out: list[str] = []
        pad = self.tokenizer.pad_token_id
        for a, b in _batches(len(texts), self.batch_size):
            enc = self._encode(texts[a:b])
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), pad, dtype=torch.long)  # [B, T], left-padded
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for r, e in enumerate(enc):
                ids[r, width - len(e):] = torch.tensor(e)
                mask[r, width - len(e):] = 1
            with torch.no_grad():
                gen = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                          max_new_tokens=self.template.max_new_tokens, pad_token_id=pad)
            out += self.tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        return out

    def labels(self, responses: Sequence[str | None], prompts: Sequence[str | None] | None = None) -> list[str]:
        prompts = check_batch(responses, prompts, "generative judge")
        texts = [self.template.text(self.tokenizer, p, r or "") for p, r in zip(prompts, responses)]
        if not texts:
            return []
        if self.template.mode == "options":
            best = self.option_logprobs(texts).argmax(-1).tolist()
            return [self.template.answers[i][1] for i in best]
        lookup = {a.strip().lower(): lab for a, lab in self.template.answers}
        pat = re.compile(self.template.pattern, re.IGNORECASE)
        out = []
        for text in self.generate(texts):
            m = pat.search(text)
            lab = lookup.get(m.group(1).strip().lower()) if m else None
            if lab is None:
                if self.template.unparsed == "error":
                    raise ValueError(f"generative judge {Path(self.path).name}: cannot read an answer in its output "
                                     f"{text[:80]!r} (template {self.template.source}; set unparsed: to a label "
                                     f"to accept such outputs)")
                lab = self.template.unparsed
            out.append(lab)
        return out

    def info(self) -> dict:
        return {"kind": "generative", "name": f"generative:{Path(self.path).name}", "path": self.path,
                "template": self.template.source, "fingerprint": self._fingerprint}
