"""Every hook the methods put on a model, in one place. Each is a context manager (removed on exit,
also on errors) and reads what changes from one forward to the next from an explicit ``HookState``
the caller fills in before the forward (``PreparedBatch.bind`` does it for prepared batches).

- ``replayed_prefix``: decoder layers 0..l are stand-ins; layer l returns ``state.out`` (recorded once), or,
  when l is itself edited (``live``), that output recorded without the edit plus the edit's own term.
- ``edit_subject_state``: the output of a decoder layer at each row's subject token goes through ``fn``
  (the scaling vector of localization, the gate of the edit, MEMIT's delta).
- ``deltas``: an fp32 additive change of a Linear layer, the trainable part of a gradient edit.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..adapters.base import Adapter
from ..devices import check_editable


@dataclass
class HookState:
    """What the hooks read at each forward."""

    out: torch.Tensor | None = None             # replayed output of the top replayed layer [B, T, d]
    subject_index: torch.Tensor | tuple | None = None  # [B] subject position per row (packed: (sequence, position)); None: none
    sample_of_row: torch.Tensor | None = None   # [B] row -> its sample (which scaling vector applies)


@contextmanager
def edit_subject_state(adapter: Adapter, layer: int, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       subject_index: Callable[[], torch.Tensor | None], module: torch.nn.Module | None = None):
    """Forward hook on decoder layer ``layer``: its output at each row's subject position ``p_b`` is
    replaced by ``fn(h[b, p_b], rows)`` (out of place, so autograd sees the replacement);
    ``subject_index()`` gives the positions [B] at each forward (None: leave the output alone), or, for rows
    packed into fewer sequences (``fastpath``), a pair (sequence [B], position [B]). ``module``: hook this
    stand-in of the layer instead (``replay_stand_ins``)."""

    def hook(_module, _inputs, output):
        idx = subject_index()
        if idx is None:  # rows without a subject (e.g. general retention queries): nothing to do
            return output
        h = output[0] if isinstance(output, tuple) else output
        if isinstance(idx, tuple):  # packed rows: (sequence, position) of each row's subject token
            at = (idx[0].to(h.device), idx[1].to(h.device))
        else:
            at = (torch.arange(len(idx), device=h.device), idx.to(h.device))
        rows = torch.arange(len(at[0]), device=h.device)
        h = h.index_put(at, fn(h[at], rows))
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = (module or adapter.component(layer, "layer")).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class Replay(torch.nn.Module):
    """Stands in for a decoder layer: layers before the target pass their input on (it is ignored),
    the target layer returns the recorded output ``state.out``."""

    def __init__(self, state: HookState | None, last: bool):
        super().__init__()
        self.state, self.last = state, last

    def forward(self, hidden_states, *args, **kwargs):
        return self.state.out if self.last else hidden_states


class LiveReplay(torch.nn.Module):
    """Stands in for the lowest edited decoder layer: ``state.out`` holds, per position, the layer's output
    recorded with the edit off and the edited module's input, side by side (``fastpath.record_live``); the
    output is the first plus the delta's own term on the second. Exact up to summation order where the
    module's output adds into the layer's output (checked by ``fastpath.live_replay_holds``)."""

    def __init__(self, state: HookState, delta: "Delta", hidden: int):
        super().__init__()
        self.state, self.delta, self.hidden = state, delta, hidden

    def forward(self, hidden_states, *args, **kwargs):
        rec = self.state.out
        return self.delta(rec[..., self.hidden:], rec[..., :self.hidden])


@contextmanager
def swapped_layers(adapter: Adapter, stand_ins: dict[int, torch.nn.Module]):
    """Decoder layers replaced by ``stand_ins`` (index -> module) while active."""
    originals = {i: adapter.layers[i] for i in stand_ins}
    try:
        for i, m in stand_ins.items():
            adapter.layers[i] = m
        yield
    finally:
        for i, m in originals.items():
            adapter.layers[i] = m


def replay_stand_ins(adapter: Adapter, layer: int, state: HookState, live: "Delta | None" = None
                     ) -> dict[int, torch.nn.Module]:
    """The stand-ins of decoder layers 0..``layer`` (``replayed_prefix``); ``live``: the delta of layer
    ``layer``'s edited module, whose stand-in is then a ``LiveReplay``."""
    top = LiveReplay(state, live, adapter.hidden_size) if live is not None else Replay(state, True)
    return {i: Replay(state, False) for i in range(layer)} | {layer: top}


def replayed_prefix(adapter: Adapter, layer: int, state: HookState):
    """While active, decoder layers 0..``layer`` are not computed: the output of ``layer`` is taken
    from ``state.out`` (recorded once, the layers being frozen). Hooks registered on
    ``adapter.component(layer, "layer")`` inside this context attach to the stand-in."""
    return swapped_layers(adapter, replay_stand_ins(adapter, layer, state))


def skipped_layers(adapter: Adapter, above: int):
    """While active, the decoder layers above ``above`` pass their input on (not computed)."""
    return swapped_layers(adapter, {i: Replay(None, False) for i in range(above + 1, adapter.num_layers)})


class Delta:
    """fp32 additive change of one Linear layer, applied by a forward hook: y = W x + delta x."""

    def __init__(self, module: torch.nn.Linear):
        self.module = module
        self.delta = torch.zeros_like(module.weight, dtype=torch.float32, requires_grad=True)
        self.enabled = True
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _m, inputs, output):
        return self(inputs[0], output)

    def __call__(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output`` (the module's, or anything its output adds into) plus the delta's term on its input ``x``."""
        if not self.enabled:
            return output
        x = x.to(self.delta.device, torch.float32)  # the layer's own device (a dispatched model)
        return output + F.linear(x, self.delta).to(output.device, output.dtype)

    def merged(self) -> torch.Tensor:
        w = self.module.weight
        return (w.detach().float() + self.delta.detach()).to(w.dtype)


@contextmanager
def deltas(adapter: Adapter, layers: Sequence[int], module: str):
    """parameter name -> ``Delta`` on ``module`` of each of ``layers``, removed on exit (an offloaded
    layer is refused: the edit writes its real weights)."""
    check_editable(adapter, layers, module)
    ds = {adapter.parameter_name(layer, module): Delta(adapter.component(layer, module)) for layer in layers}
    try:
        yield ds
    finally:
        for d in ds.values():
            d.handle.remove()
