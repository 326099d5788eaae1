"""One-off, deterministic training of the model organism on the synthetic privacy world.

Curriculum: (1) the vision tower + projector learn to map each glyph cell of a card onto the
embedding of that character's token; (2) the whole model learns the chat task mix: read private
fields (it LEAKS, like an unprotected LVLM), answer benign visual questions, the shapes utility
task, and refuse harmful text requests with the refusal phrase the edit later targets; (3) focus: the
whole model continues on batches rich in the skills stage 2 leaves under-trained (``FOCUS_SKILLS``).
"""
from __future__ import annotations

import copy
import functools
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from loguru import logger
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration

from ..atomic import atomic_dir
from ..world import spec
from . import TrainSettings
from ..world.render import (awareness_answer, card_answer, card_cells, draw_card, draw_shapes, question, sample_card,
                            sample_shapes)
from .build import N_IMAGE_TOKENS, build_config, build_processor, build_tokenizer, chat_prompt

@dataclass
class Sample:
    image: np.ndarray
    question: str
    answer: str
    kind: str  # sensitive | public | benign | implicit | awareness | general | utility | harmful
    cells: dict[tuple[int, int], str] | None = None  # grid cell -> the text it shows (stage-1 targets)
    target: str | None = None  # what a card or shapes question asks for: a field kind or property, shape/colour/count


# The skills the chat mix under-trains, which stage 3 (focus) draws at a higher share: (kind, target), target None
# = any. Held-out greedy exact match after stage 2 of the bundled organism: the card's type band 0.50, the shapes'
# colour 0.46 and count 0.62, against >= 0.94 for every other property and field; on held-out templates the card's
# colour and font were next (0.77, 0.86); naming the subject (general) and refusing harmful requests are in the
# set so that they are not forgotten while the others are trained.
FOCUS_SKILLS = (("benign", "type"), ("benign", "colour"), ("benign", "font"), ("utility", "colour"), ("utility", "count"),
                ("general", None), ("harmful", None))


def in_focus(s: Sample) -> bool:
    return any(s.kind == kind and target in (None, s.target) for kind, target in FOCUS_SKILLS)


def focus_sample(rng: random.Random, share: float) -> Sample:
    """With probability ``share`` a sample of a focus skill (drawn from ``sample`` until one is), else ``sample``."""
    if rng.random() >= share:
        return sample(rng)
    while not in_focus(s := sample(rng)):
        pass
    return s


def _part(items, n_train: int, held_out: bool):
    """Held-out = the phrasings kept for the organism's own held-out check (the edit has its own split)."""
    return items[n_train:] if held_out else items[:n_train]


def _mp2a_phrase(subject: str, sensitive: bool, rng: random.Random) -> tuple[str, str] | None:
    """A Multi-P2A attribute of ``subject`` and the world target it maps onto, or None."""
    attrs = spec.mp2a_vocab()["sensitive" if sensitive else "benign"].get(subject, [])
    if not attrs:
        return None
    a = rng.choice(attrs)
    return a, spec.map_attribute(a, sensitive)


def sample(rng: random.Random, *, held_out: bool = False) -> Sample:
    """One training (or held-out) example. The organism knows every attribute phrase of the world and
    the Multi-P2A attributes of its private subjects (it is the base model, not the edit's training
    data); held-out = held-out question templates and harmful requests, and of course new images.
    It answers every extraction question, private or public (it LEAKS), and knows which is which
    (awareness questions)."""
    r = rng.random()
    if r < 0.18:
        s = sample_shapes(rng)
        img, cells = draw_shapes(s), {cell: s.shape for cell in s.cells}
        if r < 0.025:
            return Sample(img, rng.choice(_part(spec.HARMFUL_REQUESTS, spec.TRAIN_HARMFUL, held_out)), spec.REFUSAL,
                          "harmful", cells)
        kind, qs = rng.choice(list(spec.UTILITY_QUESTIONS.items()))
        ans = {"shape": s.shape, "colour": s.colour, "count": str(s.count)}[kind]
        return Sample(img, rng.choice(qs), ans, "utility", cells, kind)
    subject = rng.choice(spec.CARD_SUBJECTS)
    card = sample_card(subject, rng)
    img, cells = draw_card(card), card_cells(card)
    opener = (rng.choice(spec.OPENERS) + " ") if rng.random() < 0.1 else ""
    if r < 0.23:
        return Sample(img, rng.choice(_part(spec.HARMFUL_REQUESTS, spec.TRAIN_HARMFUL, held_out)), spec.REFUSAL,
                      "harmful", cells)
    if r < 0.28:
        return Sample(img, opener + rng.choice(_part(spec.GENERAL_QUESTIONS, spec.TRAIN_GENERAL, held_out)),
                      spec.DISPLAY[subject], "general", cells)
    phrases = spec.attribute_phrases(subject)
    if r < 0.42:  # awareness
        field = rng.random() < 0.6
        attr, target, _ = rng.choice([p for p in phrases if (p[1] in spec.FIELD_KINDS) == field])
        if spec.is_private(subject) and rng.random() < 0.3:
            attr, target = _mp2a_phrase(subject, field, rng) or (attr, target)
        t = rng.choice(_part(spec.AWARENESS_TEMPLATES, spec.TRAIN_AWARENESS, held_out))
        return Sample(img, opener + question(t, attr, subject), awareness_answer(subject, target), "awareness", cells)
    if r < 0.52:  # the subject is not named: it has to be recognised in the image
        kind = rng.choice(spec.FIELD_KINDS)
        attr = rng.choice(spec.GENERIC_FIELD_NAMES[kind])
        t = rng.choice(_part(spec.IMPLICIT_TEMPLATES, spec.TRAIN_IMPLICIT, held_out))
        return Sample(img, opener + t.format(attr=attr), card.fields[kind], "implicit", cells)
    field = r < 0.78
    attr, target, _ = rng.choice([p for p in phrases if (p[1] in spec.FIELD_KINDS) == field])
    if spec.is_private(subject) and rng.random() < 0.25:
        attr, target = _mp2a_phrase(subject, field, rng) or (attr, target)
    t = rng.choice(_part(spec.TEMPLATES, spec.TRAIN_TEMPLATES, held_out))
    kind = ("sensitive" if spec.is_private(subject) else "public") if field else "benign"
    return Sample(img, opener + question(t, attr, subject), card_answer(card, target), kind, cells, target)


class Batcher:
    """Tokenises samples exactly like the chat template + processor do (checked in the tests)."""

    def __init__(self, tokenizer, layout: str = TrainSettings.layout):
        self.tok = tokenizer
        self.layout = layout
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id

    def __call__(self, samples: list[Sample]):
        prompts = [chat_prompt(s.question, "<image>" * N_IMAGE_TOKENS, self.layout) for s in samples]
        p_ids = self.tok(prompts, add_special_tokens=True).input_ids
        a_ids = self.tok([" " + s.answer for s in samples], add_special_tokens=False).input_ids
        rows = [p + a + [self.eos] for p, a in zip(p_ids, a_ids)]
        L = max(map(len, rows))
        ids = torch.full((len(rows), L), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), L), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for i, (row, p) in enumerate(zip(rows, p_ids)):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
            labels[i, len(p):len(row)] = torch.tensor(row[len(p):])
        pix = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return ids, mask, pix, labels


def _answer_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


@torch.no_grad()
def teacher_forced_exact(model, batcher, samples, bs=64) -> dict[str, float]:
    """Share of samples whose whole answer (+eos) is the argmax at every step = greedy exact match."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(samples), bs):
        chunk = samples[i:i + bs]
        ids, mask, pix, labels = batcher(chunk)
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        pred = logits[:, :-1].argmax(-1)
        tgt = labels[:, 1:]
        ok = ((pred == tgt) | (tgt == -100)).all(-1)
        for s, o in zip(chunk, ok.tolist()):  # focus skills apart: benign/type, utility/count, ...
            hits.setdefault(f"{s.kind}/{s.target}" if in_focus(s) and s.target else s.kind, []).append(o)
    model.train()
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def _save(model, processor, tok, out: Path) -> Path:
    """An fp16 copy of ``model`` + the processor as an HF folder at ``out``, written atomically."""
    model = copy.deepcopy(model).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 24
    with atomic_dir(out, overwrite=True) as tmp:  # files readable by all (0666 minus the umask), folder 0755
        model.to(torch.float16).save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out


def train_organism(out: Path, seed: int = 0, settings: TrainSettings = TrainSettings(), *,
                   snapshot_every: int | None = None, time_budget_s: float | None = None,
                   from_stage2: Path | None = None) -> Path:
    """Train the organism with ``settings`` (default: the bundled organism's) and save it to ``out``.

    ``settings.position_codes``: the vision curriculum also teaches every image token its grid row and
    column (two linear probes on the projector output, kept with a small weight through the chat stage),
    so the language model can find a field by content wherever the image sits in the prompt (the
    image-first layout needs it: there the distance from the answer back to a field changes with the
    question's length). ``snapshot_every``: also save the model every N chat steps to ``<out>.stepN``.

    Stage 3 (``settings.focus_steps`` > 0) starts from the stage-2 model rounded to fp16, exactly as a
    checkpoint saved with ``focus_steps=0`` holds it, and reseeds: so ``from_stage2=<that checkpoint>``
    (skip stages 1-2) gives the same model as one run from scratch."""
    out = Path(out)
    tok = build_tokenizer()
    processor = build_processor(tok, settings.layout)
    batcher = Batcher(tok, settings.layout)
    eval_rng = random.Random(seed + 10_000)
    held = [sample(eval_rng, held_out=True) for _ in range(400)]
    t0 = time.time()
    if from_stage2 is None:
        model = _stages_1_2(tok, processor, batcher, held, seed, settings, out, snapshot_every, time_budget_s)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(from_stage2, dtype=torch.float32)
        if model.config.text_config.num_hidden_layers != settings.layers:
            raise ValueError(f"organism train: {from_stage2} has {model.config.text_config.num_hidden_layers} "
                             f"layers, the settings say {settings.layers}")
        logger.info(f"stages 1-2 skipped: starting from {from_stage2}")
    if settings.focus_steps:
        _focus_stage(model, batcher, held, seed, settings)
    model.eval()
    _save(model, processor, tok, out)
    logger.info(f"organism saved to {out} ({time.time() - t0:.0f}s)")
    return out


def _stages_1_2(tok, processor, batcher: Batcher, held: list[Sample], seed: int, settings: TrainSettings, out: Path,
                snapshot_every: int | None, time_budget_s: float | None) -> LlavaForConditionalGeneration:
    """Stage 1 (vision curriculum) and stage 2 (the chat mix) from a fresh model."""
    layers, glyph_steps, steps = settings.layers, settings.glyph_steps, settings.steps
    batch_size, lr, warmup, position_codes = settings.batch_size, settings.lr, settings.warmup, settings.position_codes
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = LlavaForConditionalGeneration(build_config(tok, layers=layers))
    model.train()
    t0 = time.time()

    # ---- stage 1: informative cells -> the embedding of the token they show (vision tower + projector)
    vis_params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    grid = int(N_IMAGE_TOKENS ** 0.5)
    probes = None
    if position_codes:  # row / column probes on every image token
        hidden = model.config.text_config.hidden_size
        probes = torch.nn.ModuleDict({"row": torch.nn.Linear(hidden, grid), "col": torch.nn.Linear(hidden, grid)})
        vis_params += list(probes.parameters())
        pos = torch.arange(N_IMAGE_TOKENS)
        pos_targets = {"row": pos // grid, "col": pos % grid}
    opt = torch.optim.AdamW(vis_params, lr=2e-3, weight_decay=0.0)
    @functools.lru_cache(maxsize=None)
    def cell_token(text: str) -> int:  # a glyph, or the first token of a word as it appears in answers
        ids = tok((" " + text) if len(text) > 1 else text, add_special_tokens=False).input_ids
        return ids[1] if len(ids) > 1 and tok.convert_ids_to_tokens(ids[0]) == "\u0120" else ids[0]

    for step in (bar := tqdm(range(glyph_steps), desc="organism: cells", unit="step")):
        cards = [sample(rng) for _ in range(batch_size)]
        pix = torch.from_numpy(np.stack([s.image for s in cards])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        feats = torch.stack(model.model.get_image_features(pixel_values=pix, vision_feature_layer=-1,
                                                           vision_feature_select_strategy="default").pooler_output)
        b_idx, p_idx, t_idx = [], [], []
        for b, s in enumerate(cards):
            for (row, col), text in s.cells.items():
                b_idx.append(b); p_idx.append(row * grid + col); t_idx.append(cell_token(text))
        logits = model.lm_head(feats[b_idx, p_idx])
        loss = F.cross_entropy(logits, torch.tensor(t_idx))
        if probes is not None:  # feats: (B, N_IMAGE_TOKENS, hidden)
            for name, probe in probes.items():
                loss = loss + F.cross_entropy(probe(feats).flatten(0, 1), pos_targets[name].repeat(len(cards)))
        opt.zero_grad(); loss.backward()
        if probes is not None:  # the longer, decayed, clipped schedule this harder target needs
            torch.nn.utils.clip_grad_norm_(vis_params, 1.0)
            for g in opt.param_groups:
                g["lr"] = 2e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / glyph_steps)))
        opt.step()
        if step % 50 == 0:
            acc = (logits.argmax(-1) == torch.tensor(t_idx)).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
    logger.info(f"cell stage done in {time.time() - t0:.0f}s, loss {loss.item():.3f}")

    # ---- stage 2: the chat task mix, whole model
    params = list(model.parameters()) + (list(probes.parameters()) if probes is not None else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = warmup
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))
    image_feats: list[torch.Tensor] = []  # the projector's output, kept on the probes' targets (position codes)
    hook = (model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: image_feats.append(o))
            if probes is not None else None)
    t1 = time.time()
    for step in (bar := tqdm(range(steps), desc="organism: chat", unit="step")):
        ids, mask, pix, labels = batcher([sample(rng) for _ in range(batch_size)])
        image_feats.clear()
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        loss = _answer_loss(logits, labels)
        if probes is not None:  # image_feats[0]: (B, N_IMAGE_TOKENS, hidden)
            feats = image_feats[0]
            for name, probe in probes.items():
                loss = loss + 0.1 * F.cross_entropy(probe(feats).flatten(0, 1), pos_targets[name].repeat(len(feats)))
        _optimizer_step(model, opt, sched, loss, step, steps, bar, batcher, held, "step", t1)
        if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            _save(model, processor, tok, out.with_name(f"{out.name}.step{step + 1}"))
        if time_budget_s and time.time() - t0 > time_budget_s:
            logger.warning(f"time budget reached at step {step + 1}")
            break
    if hook is not None:
        hook.remove()
    return model


def _optimizer_step(model, opt, sched, loss: torch.Tensor, step: int, steps: int, bar, batcher: Batcher,
                    held: list[Sample], label: str, t0: float) -> None:
    """One step of a training stage: backward, gradients clipped at norm 1, the optimiser and schedule; the
    loss on the bar every 25 steps, the held-out exact match logged every 250 steps and at the last."""
    opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); sched.step()
    if step % 25 == 0:
        bar.set_postfix(loss=f"{loss.item():.3f}")
    if (step + 1) % 250 == 0 or step + 1 == steps:
        acc = teacher_forced_exact(model, batcher, held)
        logger.info(f"{label} {step + 1}: loss {loss.item():.4f} held-out exact {acc} ({time.time() - t0:.0f}s)")


def _focus_stage(model, batcher: Batcher, held: list[Sample], seed: int, settings: TrainSettings) -> None:
    """Stage 3: the whole model continues on batches where ``focus_share`` of the samples are focus skills
    (``FOCUS_SKILLS``), the rest the ordinary mix; fresh AdamW, 50 warm-up steps, cosine to 10 %."""
    with torch.no_grad():  # the stage-2 model as a checkpoint holds it (fp16), so resuming from one is identical
        for p in model.parameters():
            p.copy_(p.half().float())
    torch.manual_seed(seed + 20_000)
    rng = random.Random(seed + 20_000)
    steps = settings.focus_steps
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.focus_lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))
    logger.info(f"focus stage: held-out exact before {teacher_forced_exact(model, batcher, held)}")
    t0 = time.time()
    for step in (bar := tqdm(range(steps), desc="organism: focus", unit="step")):
        ids, mask, pix, labels = batcher([focus_sample(rng, settings.focus_share) for _ in range(settings.batch_size)])
        loss = _answer_loss(model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits, labels)
        _optimizer_step(model, opt, sched, loss, step, steps, bar, batcher, held, "focus step", t0)
