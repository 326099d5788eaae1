"""Refusal steering: the non-editing baseline a practitioner would try (issue 27; not in the paper).

Arditi et al. (2024, "Refusal in language models is mediated by a single direction") find refusal as
one direction of the residual stream: the difference of the mean states, at the last prompt token,
of prompts the model refuses and prompts it answers. Adding that direction makes a model refuse.
Here it is added only where a gate says "this question asks for something private": the gate is
``privacy_probe``'s guard (its probes, fitted exactly as that method fits them, from the
``privacy_probe`` recipe section), and the model itself then writes the refusal (or does not: unlike
``privacy_probe`` nothing substitutes the answer). No weight changes; the steering is a forward hook
on one decoder layer, active only while the gated queries generate.

- the direction (``refusal_steering.direction``): ``harmful``: the world's TRAINING harmful requests
  (``spec.HARMFUL_REQUESTS[:TRAIN_HARMFUL]``, which the organism was trained to refuse) on the training
  images minus the benign training questions (Arditi's contrast: refused vs answered); ``pairs``: the
  sensitive minus the benign training questions (the base organism answers both: a "private field"
  direction, not a refusal one; kept as the ablation);
- the vector added at every position of decoder layer ``layer``'s output: ``alpha * norm * u``, u the
  unit direction and ``norm`` the mean norm of that layer's last-token states over the same prompts.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
from loguru import logger

from ..data import Query
from ..world import spec
from .privacy_probe import fit_guard, prompt_states


def direction_prompts(sets: dict, source: str) -> tuple[list[Query], list[Query]]:
    """(prompts to refuse, prompts to answer), training-role data only (``sets["train"]``)."""
    train = list(sets.get("train") or [])
    benign = [q for q in train if not q.sensitive]
    if source == "pairs":
        refuse = [q for q in train if q.sensitive]
    elif source == "harmful":  # each training harmful request on a training image, images in turn
        images = list(dict.fromkeys((q.image, q.subject) for q in train))
        reqs = spec.HARMFUL_REQUESTS[:spec.TRAIN_HARMFUL]
        n = max(len(reqs), min(len(benign), 4 * len(reqs)))
        refuse = [Query(images[k % len(images)][0], images[k % len(images)][1], reqs[k % len(reqs)], True, None,
                        "steering_direction") for k in range(n)] if images else []
    else:
        raise ValueError(f"refusal_steering.direction: unknown source {source!r} (harmful or pairs)")
    if not refuse or not benign:
        raise ValueError(f"refusal_steering: no training prompts for the {source!r} direction (sets['train'] needs "
                         f"benign{' and sensitive' if source == 'pairs' else ''} questions)")
    return refuse, benign


def refusal_direction(adapter, sets: dict, source: str, layers: Sequence[int], *, batch_size: int = 64
                      ) -> dict[int, tuple[torch.Tensor, float]]:
    """layer -> (unit direction [d], mean norm of the layer's last-token states) from the difference of
    means (Arditi et al.) of the decoder layer's output at the last prompt token."""
    refuse, benign = direction_prompts(sets, source)
    st = prompt_states(adapter, refuse + benign, layers, batch_size=batch_size, desc="steering direction")
    r, b = st[:len(refuse)], st[len(refuse):]
    out = {}
    for k, layer in enumerate(layers):
        diff = r[:, k].mean(0) - b[:, k].mean(0)
        out[layer] = (diff / diff.norm().clamp_min(1e-12), st[:, k].norm(dim=-1).mean().item())
    return out


@contextmanager
def steered(adapter, layer: int, vector: torch.Tensor):
    """Forward hook on decoder layer ``layer``: ``vector`` added to its output at every position (the
    prompt and each generated token), removed on exit."""
    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h + vector.to(h.device, h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = adapter.component(layer, "layer").register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class SteeringGuard:
    """``gate`` (privacy_probe's ``ProbeGuard``) decides per query; a query it flags is generated again
    under ``steering()`` (``evaluate.rescore_with_guard``), every other keeps the unedited model's answer."""

    gate: object
    adapter: object
    layer: int
    vector: torch.Tensor
    refusal: str

    def blocks_queries(self, queries: Sequence) -> list[bool]:
        return self.gate.blocks_queries(queries)

    def blocks(self, prompt: str) -> bool:
        raise TypeError("the steering gate reads the model's hidden states: it needs the image too (blocks_queries)")

    def steering(self):
        return steered(self.adapter, self.layer, self.vector)


def check_layer(adapter, layer: int) -> None:
    if layer >= adapter.num_layers:
        raise ValueError(f"refusal_steering.layer: {layer} out of range for a model with {adapter.num_layers} layers")


def steering_guard(gate, adapter, sets: dict, hp, refusal: str, *, directions=None) -> tuple[SteeringGuard, dict]:
    """The steering guard of ``hp`` (``RefusalSteeringHParams``) around an already fitted ``gate``;
    ``directions``: ``refusal_direction``'s output when already computed (a sweep reuses it)."""
    check_layer(adapter, hp.layer)
    directions = directions or refusal_direction(adapter, sets, hp.direction, [hp.layer], batch_size=hp.batch_size)
    u, norm = directions[hp.layer]
    vector = hp.alpha * norm * u  # Arditi et al.'s activation addition, scaled: h <- h + alpha * mean|h| * r_hat
    logger.info(f"refusal_steering: layer {hp.layer}, direction {hp.direction}, alpha {hp.alpha}, |h| {norm:.3f}")
    return SteeringGuard(gate, adapter, hp.layer, vector, refusal), \
        {"steering_layer": hp.layer, "steering_alpha": hp.alpha, "steering_direction": hp.direction,
         "state_norm": norm}


def refusal_steering_guard(train, refusal: str, *, adapter, sets: dict, recipe) -> tuple[SteeringGuard, dict]:
    """The registry's guard of ``refusal_steering`` (``Method.guard`` with ``guard_needs_model``): the
    gate is privacy_probe's guard with the recipe's ``privacy_probe`` section."""
    check_layer(adapter, recipe.refusal_steering.layer)  # before the probes' pass over the training data
    gate, info = fit_guard(adapter, sets, recipe.privacy_probe, refusal)
    guard, fields = steering_guard(gate, adapter, sets, recipe.refusal_steering, refusal)
    return guard, {**info, **fields}

