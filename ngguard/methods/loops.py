"""The bookkeeping of the optimisation loops in ``neural_gate`` (no equation here): the frozen-model
checks, per-sample early stopping of localization, the retention batches, the KL reference and the
log of the edit, and writing the trained deltas back into the model.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterator, Mapping, Sequence

import torch
from loguru import logger
from tqdm import tqdm

from ..adapters.base import Adapter, Batch
from .core import EditResult, Sample
from .fastpath import PreparedBatch
from .hooks import Delta, HookState


def freeze(model: torch.nn.Module) -> None:
    """No parameter of ``model`` trains (the loops train scaling vectors or fp32 deltas only)."""
    for p in model.parameters():
        p.requires_grad_(False)


def check_localizable(adapter: Adapter, layer: int) -> None:
    if layer >= adapter.num_layers - 1:
        raise ValueError(f"layer {layer} is the top layer of {adapter.num_layers}: its output at the subject token reaches "
                         f"no later token, so no scaling vector there can change the answer; localize layers "
                         f"0..{adapter.num_layers - 2}")


class SampleStop:
    """Per-sample early stopping of the batched localization: each sample's vector stops training
    (and is kept exactly) once its loss is under ``stop_loss``; its last loss and steps are recorded."""

    def __init__(self, n: int, stop_loss: float, device: torch.device):
        self.stop_loss = stop_loss
        self.done = torch.zeros(n, dtype=torch.bool, device=device)     # [n]
        self.used = torch.zeros(n, dtype=torch.long)                      # [n] steps each sample used
        self.last = torch.full((n,), float("inf"))                        # [n] last loss
        self._active = self._newly_done = self.done

    def skip(self, samples: torch.Tensor) -> bool:
        """Every sample of these rows is done (their batch need not run)."""
        return bool(self.done[samples].all())

    def record(self, sample_loss: torch.Tensor) -> torch.Tensor:
        """Note this step's loss [n]; returns which samples were still training [n] (bool)."""
        active = self._active = ~self.done
        self.last[active.cpu()] = sample_loss[active].cpu()
        self.used[active.cpu()] += 1
        self._newly_done = active & (sample_loss < self.stop_loss)
        return active

    def step(self, opt: torch.optim.Optimizer, m: torch.Tensor) -> None:
        """``opt.step()`` on the vectors ``m`` [n, d], except those of finished samples (kept exactly)."""
        frozen = (~self._active | self._newly_done).to(m.device)
        keep = m.detach()[frozen].clone()
        m.grad[frozen] = 0
        opt.step()
        with torch.no_grad():
            m[frozen] = keep
        self.done |= self._newly_done

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())


def retain_batches(adapter: Adapter, retain: Sequence[Sample], prep: Callable[[Batch], PreparedBatch]
                   ) -> Iterator[PreparedBatch] | None:
    """The general samples whose original answers the edit keeps (benign questions only), one batch
    per sample, taken in turn one per step; None without any."""
    batches = [prep(adapter.encode([r.image] * len(r.benign), [q for q, _ in r.benign],
                                   targets=[a for _, a in r.benign]).to(adapter.device))
               for r in retain if r.benign]
    return itertools.cycle(batches) if batches else None


@torch.no_grad()
def unedited_logits(pb: PreparedBatch, model: torch.nn.Module, state: HookState, ds: Mapping[str, Delta]) -> torch.Tensor:
    """The logits of ``pb`` with every delta switched off (DINM's KL reference)."""
    for d in ds.values():
        d.enabled = False
    try:
        return pb.logits(model, state)
    finally:
        for d in ds.values():
            d.enabled = True


class _ImageRun:
    def __init__(self, entry: dict):
        self.entry = entry

    def stop(self, loss: float, stop_loss: float) -> bool:
        """Record this step's loss; True when it is under ``stop_loss`` (no step then)."""
        e = self.entry
        e["loss_first"] = loss if e["loss_first"] is None else e["loss_first"]
        e["loss_last"] = loss
        if loss < stop_loss:
            return True
        e["steps"] += 1
        return False


class EditLog:
    """Per image and pass: subject, key, pass, steps, first and last loss (``EditResult.log``); a line per
    subject and pass."""

    def __init__(self, name: str):
        self.name, self.rows = name, []

    def images(self, samples: Sequence[Sample], subject: str) -> list[Sample]:
        return tqdm([s for s in samples if s.subject == subject], desc=f"edit {self.name} {subject}", unit="image",
                    leave=False)

    def image(self, subject: str, key: str, pass_: int = 0) -> _ImageRun:
        self.rows.append({"subject": subject, "key": key, "pass": pass_, "steps": 0, "loss_first": None,
                          "loss_last": None})
        return _ImageRun(self.rows[-1])

    def subject_done(self, subject: str, pass_: int = 0) -> None:
        rows = [r for r in self.rows if r["subject"] == subject and r["pass"] == pass_]
        first, last = [r["loss_first"] for r in rows], [r["loss_last"] for r in rows]
        logger.info(f"edit {self.name}: {subject} done{f' (pass {pass_ + 1})' if pass_ else ''} ({len(rows)} images, "
                    f"mean loss {sum(first) / max(1, len(first)):.4f} -> {sum(last) / max(1, len(last)):.4f})")


def commit(adapter: Adapter, ds: Mapping[str, Delta], layers: Sequence[int], module: str, log: EditLog) -> EditResult:
    """Merge each trained delta into its weight (in place on the model) and return the edit's result."""
    weights = {pname: d.merged() for pname, d in ds.items()}
    delta_out = {pname: d.delta.detach().cpu().clone() for pname, d in ds.items()}
    with torch.no_grad():
        for layer in layers:
            adapter.component(layer, module).weight.copy_(weights[adapter.parameter_name(layer, module)])
    return EditResult({k: v.detach().cpu() for k, v in weights.items()}, delta_out, log.rows)
