"""Where "this question asks for something private" lives, read off the hidden state: a linear probe.

Beyond the paper (issue 27). Neural Gate localizes per subject (which dimensions of the subject
token's state had to flip for THAT subject's refusal), so its edit learns "refuse attribute questions
about these kinds of card". The organism, though, answers "Is the passport number private?"
correctly for subjects no edit saw: privacy is represented. This module finds it across ALL
subjects at once: a logistic regression on the decoder's hidden state at the last prompt token
(the state the answer is generated from), trained to tell the sensitive training questions from the
benign ones AND from the retention questions (public look-alikes asked with the same words, awareness
questions, general answers). It is a contrast across subjects (private vs public, field vs property,
extraction vs awareness), not a per-subject mask.

Used by:
- ``privacy_probe`` (a registry method that edits no weights): refuse where the probe fires, the
  unedited model answers everything else (``ProbeGuard``; a classifier in front of the model, the
  hidden-state cousin of ``keyword_filter``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from loguru import logger
from PIL import Image
from tqdm import tqdm

from ..adapters.base import find_subject_span
from ..world.spec import PROBE_CONTEXTS, REFUSAL


def _open(path) -> Image.Image:
    if isinstance(path, Image.Image):  # a served request holds the image itself (ngguard.guard_patch)
        return path.convert("RGB")
    with Image.open(path) as im:
        return im.convert("RGB")


@torch.no_grad()
def prompt_states(adapter, queries: Sequence, layers: Sequence[int], *, batch_size: int = 64,
                  desc: str = "probe states") -> torch.Tensor:
    """The output of each decoder layer in ``layers`` at the LAST prompt token (after the generation
    prompt: where the answer starts) for every query -> [N, len(layers), d] (fp32, CPU)."""
    out = []
    qs = list(queries)
    for i in tqdm(range(0, len(qs), batch_size), desc=desc, unit="batch", disable=len(qs) <= batch_size):
        chunk = qs[i:i + batch_size]
        batch = adapter.encode([_open(q.image) for q in chunk], [q.prompt for q in chunk]).to(adapter.device)
        hs = adapter.model(**batch.inputs, output_hidden_states=True).hidden_states  # (embeddings, layer 0, ...)
        out.append(torch.stack([hs[l + 1][:, -1].float().cpu() for l in layers], 1))  # left padding: -1 = last
    return torch.cat(out) if out else torch.zeros(0, len(layers), adapter.hidden_size)


@dataclass
class LinearProbe:
    """p(private | h) = sigmoid(w . (h - mean) / std + b) on the concatenated states of ``layers``."""

    layers: tuple[int, ...]
    mean: torch.Tensor
    std: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    threshold: float = 0.5
    log: dict = field(default_factory=dict)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        x = (states.flatten(1) - self.mean) / self.std
        return x @ self.w + self.b

    def fires(self, states: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(states)) > self.threshold


def fit_probe(states: torch.Tensor, labels: torch.Tensor, layers: Sequence[int], *, l2: float = 1e-2,
              steps: int = 200, weights: torch.Tensor | None = None, threshold: float = 0.5) -> LinearProbe:
    """L2-regularised logistic regression (full-batch L-BFGS, deterministic) on standardised
    features. ``weights``: per-row loss weights (e.g. to balance classes)."""
    x = states.flatten(1).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = labels.double()
    wts = torch.ones_like(y) if weights is None else weights.double()
    wts = wts / wts.sum()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none") * wts).sum() \
            + l2 * (w * w).sum() / 2
        loss.backward()
        return loss

    loss = opt.step(closure)
    with torch.no_grad():
        acc = (((x @ w + b) > 0).double() == y).double().mean().item()
    logger.info(f"probe: {x.shape[0]} rows, {x.shape[1]} features, accuracy {acc:.3f}")
    return LinearProbe(tuple(layers), mean.float(), std.float(), w.detach().float(), b.detach().float(), threshold,
                       {"train_accuracy": acc, "rows": int(x.shape[0])})


@dataclass
class QueryStates:
    """Hidden states of one batch of queries, per hidden index (0 = embeddings, l + 1 = after decoder layer l)."""

    text: list[torch.Tensor]            # per query: [T_text, H, d], every non-image prompt token
    subject: list[int | None]           # per query: the subject's last token within ``text`` (None: not named)
    last: torch.Tensor                  # [N, H, d] at the last prompt token
    image: torch.Tensor                 # [N, H, d] mean over the image tokens
    # [N, H, d] at the subject token of ``NAMED_TEMPLATE`` filled with the model's own description of the
    # image (``described_states``; None: not read); rows of images the model named nothing on are NaN
    described: torch.Tensor | None = None


def _subject_named(q) -> bool:
    try:
        find_subject_span(q.prompt, q.subject)
        return True
    except ValueError:
        return False


@torch.no_grad()
def query_states(adapter, queries: Sequence, hidden: Sequence[int], *, batch_size: int = 64, subjects: bool = True,
                 desc: str = "probe states") -> QueryStates:
    """``QueryStates`` for ``queries`` at the hidden indices ``hidden``. ``subjects``: locate each query's
    subject token (training data only: at inference nobody tells the guard the subject)."""
    text, subj, last, image = [], [], [], []
    qs = list(queries)
    for i in tqdm(range(0, len(qs), batch_size), desc=desc, unit="batch", disable=len(qs) <= batch_size):
        chunk = qs[i:i + batch_size]
        batch = adapter.encode([_open(q.image) for q in chunk], [q.prompt for q in chunk]).to(adapter.device)
        hs = adapter.model(**batch.inputs, output_hidden_states=True).hidden_states
        h = torch.stack([hs[k] for k in hidden], 2).float().cpu()  # [B, T, H, d]
        ids, mask = batch.inputs["input_ids"].cpu(), batch.inputs["attention_mask"].cpu().bool()
        is_img = ids == adapter.image_token_id
        for b, q in enumerate(chunk):
            pos = torch.nonzero(mask[b] & ~is_img[b]).squeeze(1)
            text.append(h[b, pos])
            s = None
            if subjects and _subject_named(q):
                p = adapter.subject_token_index(ids[b][mask[b]], q.prompt, q.subject) + int((~mask[b]).sum())
                s = int((pos == p).nonzero().squeeze())
            subj.append(s)
            image.append(h[b][is_img[b]].mean(0))
        last.append(h[:, -1])  # left padding: the last position is every row's last prompt token
    d = adapter.hidden_size
    return QueryStates(text, subj, torch.cat(last) if last else torch.zeros(0, len(hidden), d),
                       torch.stack(image) if image else torch.zeros(0, len(hidden), d))


# The question the guard asks the model about an image when a question names no subject (a general question:
# the organism answers with the card's kind, as questions name it), and the question its answer is put in,
# so that the subject probe reads the model's own name for the card where it was trained to: at a subject
# token of a question (the state there depends only on the image and the words up to the subject).
DESCRIBE_PROMPT = "What is shown in the image?"
NAMED_TEMPLATE = "What does the {subject} in the image list as its name?"


def subset_states(st: QueryStates, idx: Sequence[int]) -> QueryStates:
    """The states of the queries ``idx`` of ``st``."""
    return QueryStates([st.text[i] for i in idx], [st.subject[i] for i in idx], st.last[idx], st.image[idx],
                       None if st.described is None else st.described[idx])


def _image_key(image):
    return str(image) if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__") else id(image)


@torch.no_grad()
def described_states(adapter, images: Sequence, hidden: Sequence[int], *, batch_size: int = 64,
                     prompt: str = DESCRIBE_PROMPT, template: str = NAMED_TEMPLATE) -> tuple[torch.Tensor, list[str]]:
    """Per image of ``images`` (paths or PIL images; each distinct one read once): the model's greedy answer
    to ``prompt`` (its name for what the image shows, first line) and the states at that name's last token
    in ``template`` -> ([N, len(hidden), d], names). NaN rows where the answer is empty or not found again."""
    keys = [_image_key(im) for im in images]
    uniq = list(dict.fromkeys(keys))
    first = {k: images[keys.index(k)] for k in uniq}
    names: dict = {}
    for i in range(0, len(uniq), batch_size):
        chunk = uniq[i:i + batch_size]
        out = adapter.generate([_open(first[k]) for k in chunk], [prompt] * len(chunk), max_new_tokens=8)
        names.update({k: (o.strip().splitlines() or [""])[0].strip() for k, o in zip(chunk, out)})
    d = adapter.hidden_size
    rows = {k: torch.full((len(hidden), d), float("nan")) for k in uniq}
    named = [k for k in uniq if names[k] and _subject_named(_Named(template.format(subject=names[k]), names[k]))]
    qs = [_Named(template.format(subject=names[k]), names[k], first[k]) for k in named]
    try:
        st = query_states(adapter, qs, hidden, batch_size=batch_size, desc="probe states (described)") if qs else None
        parts = [(named, st)] if st else []
    except ValueError:  # a name the tokenizer splits oddly: one at a time, those without their token left NaN
        parts = []
        for k, q in zip(named, qs):
            try:
                parts.append(([k], query_states(adapter, [q], hidden, batch_size=1)))
            except ValueError:
                logger.warning(f"privacy_probe: the model's name for an image ({q.subject!r:.40}) has no subject token")
    for ks, st in parts:
        rows.update({k: t[s] for k, t, s in zip(ks, st.text, st.subject)})
    return torch.stack([rows[k] for k in keys]) if keys else torch.zeros(0, len(hidden), d), [names[k] for k in keys]


@dataclass
class _Named:
    prompt: str
    subject: str
    image: object = None


def request_features(st: QueryStates, cols: Sequence[int], tokens: str = "last") -> torch.Tensor:
    """The request probe's input per query at the hidden indices ``cols``: the last prompt token ("last"),
    the mean over every non-image prompt token ("mean"), or both side by side ("both": [N, 2 * len(cols), d])."""
    last = st.last[:, cols]
    if tokens == "last":
        return last
    mean = torch.stack([t[:, cols].mean(0) for t in st.text]) if st.text else torch.zeros_like(last)
    return mean if tokens == "mean" else torch.cat([last, mean], 1)


# ---------------------------------------------------------------------------------------------- the guard
def _balanced(y: torch.Tensor) -> torch.Tensor:
    """Row weights giving both classes the same total weight."""
    pos = y.sum().clamp_min(1)
    return torch.where(y > 0, 0.5 / pos, 0.5 / (len(y) - y.sum()).clamp_min(1))


@dataclass
class ProbeGuard:
    """Refuse exactly where BOTH read "yes" on the unedited model's hidden states:

    - *private subject*: when the question names a subject (``named_by``: the named probe at the last
      prompt token, ``request_layer``, and/or the locator reading some token as a subject's above its
      threshold), the subject probe (private vs public subject, ``subject_layer``) read at the token the
      locator probe (``locator_layer``) takes for the subject; else the image probe (mean over the image
      tokens, ``image_layer``);
    - *asks to read a text field*: the request probe at the last prompt token (``request_layer``).

    Nothing here knows the subject of a question: the positions come from the locator."""

    adapter: object
    refusal: str
    subject: LinearProbe
    locator: LinearProbe
    request: LinearProbe
    image: LinearProbe
    named: LinearProbe
    batch_size: int = 64
    # when a question names its subject: "probe" (the named probe says so), "locator" (some token reads as a
    # subject's above the locator's threshold) or "both"
    named_by: str = "probe"
    # a question that names no subject: "image" (the image probe), "description" (the subject probe at the
    # model's own name for the image, ``described_states``; the image probe where the model names nothing) or
    # "mean" (the mean of the two probabilities)
    unnamed_by: str = "image"
    # a question that names its subject: the subject probe alone (False) or the mean of its probability and the
    # readings ``unnamed_by`` names (True: an ensemble of the readings of privacy)
    ensemble: bool = False
    # what the request probe reads (``request_features``): "last", "mean" or "both"
    request_tokens: str = "last"

    @property
    def hidden(self) -> list[int]:
        return sorted({p.layers[0] + 1 for p in (self.subject, self.locator, self.request, self.image, self.named)})

    def decisions(self, queries: Sequence) -> list[dict]:
        """Per query: the probes' readings and whether it is blocked."""
        hid = self.hidden
        st = query_states(self.adapter, queries, hid, subjects=False, batch_size=self.batch_size, desc="probe guard")
        if self.unnamed_by != "image":
            st.described = described_states(self.adapter, [q.image for q in queries], hid,
                                            batch_size=self.batch_size)[0]
        return self.decide(st, hid)

    def decide(self, st: QueryStates, hid: Sequence[int]) -> list[dict]:
        """``decisions`` from states already read at the hidden indices ``hid`` (a superset of ``hidden``)."""
        col = {h: i for i, h in enumerate(hid)}
        at = lambda p: [col[p.layers[0] + 1]]  # noqa: E731
        req = torch.sigmoid(self.request.logits(request_features(st, at(self.request), self.request_tokens)))
        named_p = torch.sigmoid(self.named.logits(st.last[:, at(self.named)]))
        img = torch.sigmoid(self.image.logits(st.image[:, at(self.image)]))
        desc = None if st.described is None else torch.sigmoid(self.subject.logits(st.described[:, at(self.subject)]))
        if self.unnamed_by != "image" and desc is None:
            raise ValueError(f"privacy_probe: unnamed_by {self.unnamed_by} needs the described states "
                             f"(described_states)")
        out = []
        for j, t in enumerate(st.text):
            loc = torch.sigmoid(self.locator.logits(t[:, at(self.locator)]))
            named = (self.named_by == "locator" or bool(named_p[j] > self.named.threshold)) and \
                (self.named_by == "probe" or bool(loc.max() > self.locator.threshold))
            subj = float(torch.sigmoid(self.subject.logits(t[int(loc.argmax())][at(self.subject)].unsqueeze(0))))
            described = None if desc is None or bool(desc[j].isnan()) else float(desc[j])
            readings = [float(img[j])] if self.unnamed_by == "image" or described is None else \
                [described] if self.unnamed_by == "description" else [described, float(img[j])]
            priv = (sum([subj, *readings]) / (1 + len(readings)) if self.ensemble else subj) if named else \
                sum(readings) / len(readings)
            out.append({"private": priv, "request": float(req[j]), "named": named,
                        "blocked": priv > self.subject.threshold and float(req[j]) > self.request.threshold,
                        # the readings behind them (diagnosis: bench/probe_sweep.py)
                        "subject_p": subj, "image_p": float(img[j]), "described_p": described,
                        "named_p": float(named_p[j]), "locator_max": float(loc.max())})
        return out

    def blocks_queries(self, queries: Sequence) -> list[bool]:
        return [d["blocked"] for d in self.decisions(queries)]

    def blocks(self, prompt: str) -> bool:
        raise TypeError("the probe guard reads the model's hidden states: it needs the image too (blocks_queries)")


def fit_guard(adapter, sets: dict, hp, refusal: str, *, train_split: str = "train") -> tuple[ProbeGuard, dict]:
    """Fit the four probes of ``ProbeGuard`` on training-role data only: ``sets[train_split]`` (the
    edit's sensitive + benign pairs) and ``hp.train_sets`` (retention and training extras). A subject is
    private when it has a sensitive training question; ``hp.neutral_sets`` hold queries about no card
    (e.g. the utility shapes), which teach the request probe what a non-request is."""
    queries, neutral = training_queries(sets, hp, train_split, refusal)
    layers = probe_layers(hp)
    bad = {k: l for k, l in layers.items() if l >= adapter.num_layers}
    if bad:
        k, l = next(iter(bad.items()))
        raise ValueError(f"privacy_probe.{k}_layer: {l} out of range for a model with {adapter.num_layers} layers")
    hid = sorted({l + 1 for l in layers.values()})
    st = query_states(adapter, queries + neutral, hid, desc="probe states (training)")
    return fit_from_states(adapter, st, hid, queries, neutral, hp, refusal)


def probe_layers(hp) -> dict[str, int]:
    return {"subject": hp.subject_layer, "locator": hp.locator_layer, "request": hp.request_layer, "image": hp.image_layer}


def training_queries(sets: dict, hp, train_split: str = "train", refusal: str = REFUSAL) -> tuple[list, list]:
    """(queries about cards, neutral queries) the probes learn from; raises without sensitive ones. With
    ``hp.contexts``, the training pairs and the look-alikes' questions again inside those contexts
    (``wrapped_training``)."""
    queries = [q for name in [train_split, *hp.train_sets] for q in sets.get(name, [])]
    neutral = [q for name in hp.neutral_sets for q in sets.get(name, [])]
    if not any(q.sensitive for q in queries):
        raise ValueError("privacy_probe: no sensitive training questions to learn from")
    pairs = [q for name in (train_split, "overrefusal_train") for q in sets.get(name, []) if q.split != "adversarial_train"]
    return queries + wrapped_training(pairs, hp.contexts, refusal), neutral


def wrapped_training(queries: Sequence, contexts: Sequence[str], refusal: str) -> list:
    """Each of ``queries`` inside one of ``contexts`` (names of ``world.spec.PROBE_CONTEXTS``) in turn, the
    same label (split ``probe_context``): deterministic, no random draw."""
    if not contexts:
        return []
    wraps = [(name, PROBE_CONTEXTS[name]) for name in contexts]
    out = []
    for k, q in enumerate(queries):
        name, w = wraps[k % len(wraps)]
        out.append(replace(q, prompt=w.format(q=q.prompt, refusal=refusal), split="probe_context",
                           pair_id=f"probe_context/{name}"))
    return out


def fit_from_states(adapter, st: QueryStates, hid: Sequence[int], queries: Sequence, neutral: Sequence, hp,
                    refusal: str) -> tuple[ProbeGuard, dict]:
    """``fit_guard`` from states already read (``query_states(queries + neutral, hid)``)."""
    private = {q.subject for q in queries if q.sensitive}
    layers = probe_layers(hp)
    col = {h: i for i, h in enumerate(hid)}
    n = len(queries)
    fit = lambda X, y, name, bal=True: fit_probe(X, y, [layers[name]], l2=hp.l2, weights=_balanced(y) if bal else None)  # noqa: E731
    c = lambda name: [col[layers[name] + 1]]  # noqa: E731
    # private vs public subject, at the subject's last token (questions that name it)
    rows = [(t[s][c("subject")], float(q.subject in private)) for t, s, q in zip(st.text[:n], st.subject[:n], queries)
            if s is not None]
    if hp.subject_negatives:  # every 4th other token of those questions too: "no private subject here"
        rows += [(t[k][c("subject")], 0.0) for t, s in zip(st.text[:n], st.subject[:n]) if s is not None
                 for k in range(0, t.shape[0], 4) if k != s]
    subject = fit(torch.stack([r[0] for r in rows]), torch.tensor([r[1] for r in rows]), "subject")
    # which token is the subject (any subject): the locator
    X = torch.cat([t[:, c("locator")] for t in st.text])
    y = torch.cat([torch.nn.functional.one_hot(torch.tensor(s), t.shape[0]).float() if s is not None else
                   torch.zeros(t.shape[0]) for t, s in zip(st.text, st.subject)])
    locator = fit(X, y, "locator")
    locator.threshold = hp.locator_threshold
    # does the question ask to read a private field: learnt where that is the sensitivity label (private
    # subjects' questions) and on the neutral queries; the public look-alikes' field questions ask too,
    # so they are left out here (the subject probe tells them apart)
    idx = [i for i, q in enumerate(queries) if q.subject in private] + list(range(n, n + len(neutral)))
    y = torch.tensor([float(i < n and queries[i].sensitive) for i in idx])
    request = fit(request_features(subset_states(st, idx), c("request"), hp.request_tokens), y, "request")
    if hp.request_tokens == "both":  # two readings of the same layer side by side
        request.layers = (layers["request"],) * 2
    # private vs public card from the image alone (for questions that name no subject)
    # (with ``hp.neutral_images``, the neutral queries' images too: no private card there)
    first = {}
    for i, q in enumerate(queries + (list(neutral) if hp.neutral_images else [])):
        first.setdefault(q.image, i)
    img_idx = sorted(first.values())
    image = fit(st.image[img_idx][:, c("image")],
                torch.tensor([float(i < n and queries[i].subject in private) for i in img_idx]), "image")
    # does the question name its subject (else the image decides): at the last prompt token
    y = torch.tensor([float(s is not None) for s in st.subject])
    named = fit(st.last[:, c("request")], y, "request")
    guard = ProbeGuard(adapter, refusal, subject, locator, request, image, named, batch_size=hp.batch_size,
                       named_by=hp.named_by, unnamed_by=hp.unnamed_by, ensemble=hp.ensemble,
                       request_tokens=hp.request_tokens)
    info = {"probe_layers": layers, "private_subjects": sorted(private), "training_queries": n,
            "train_accuracy": {k: p.log["train_accuracy"] for k, p in
                               (("subject", subject), ("locator", locator), ("request", request), ("image", image),
                                ("named", named))}}
    return guard, info


def privacy_probe_guard(train, refusal: str, *, adapter, sets: dict, recipe) -> tuple[ProbeGuard, dict]:
    """The registry's guard of ``privacy_probe`` (``Method.guard`` with ``guard_needs_model``)."""
    return fit_guard(adapter, sets, recipe.privacy_probe, refusal)
