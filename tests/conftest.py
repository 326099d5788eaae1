"""Fixtures shared by several test modules (tiny models themselves: ``tiny_models.py``)."""
from __future__ import annotations

import threading

import pytest
import torch


@pytest.fixture(autouse=True)
def _own_stage_cache(tmp_path_factory, monkeypatch):
    """Each test stores and reuses run stages (``ngguard.stage_cache``) in a folder of its own, never in
    the user's ~/.cache: no test sees another's stored stages."""
    monkeypatch.setenv("NGGUARD_CACHE", str(tmp_path_factory.mktemp("ngguard-cache")))


@pytest.fixture
def gated_layer_grad():
    """``fn(adapter, sample, layer, gate, refusal, use_gate=True) -> (grad [B, T, d], subject index [B])``:
    the gradient of the NLL of ``sample``'s first sensitive question (target ``refusal``) and its first
    benign one w.r.t. the ORIGINAL output of decoder ``layer`` (captured before the gate replaces it),
    with the gate of Eq. 6 (``gate`` [d] bool) at the subject token, or an identity hook without
    ``use_gate``. Only the layer's down-projection requires grad meanwhile; nothing is left behind."""
    from ngguard.methods.core import row_nll
    from ngguard.methods.hooks import edit_subject_state

    def grad(adapter, sample, layer, gate, refusal, *, use_gate=True):
        batch = adapter.encode([sample.image] * 2, [sample.sensitive[0], sample.benign[0][0]],
                               targets=[refusal, sample.benign[0][1]], subjects=[sample.subject] * 2)
        captured = {}

        def capture(_m, _i, out):
            h = out[0] if isinstance(out, tuple) else out
            h.retain_grad()
            captured["h"] = h

        weight = adapter.component(layer, "down_proj").weight
        handle = adapter.component(layer, "layer").register_forward_hook(capture)  # runs before the gate hook
        try:
            for p in adapter.model.parameters():
                p.requires_grad_(False)
            weight.requires_grad_(True)
            fn = (lambda v, rows: torch.where(gate, v, v.detach())) if use_gate else (lambda v, rows: v)
            with edit_subject_state(adapter, layer, fn, lambda: batch.subject_index):
                row_nll(adapter.model(**batch.inputs).logits, batch.labels).sum().backward()
        finally:
            handle.remove()
            weight.requires_grad_(False)
            adapter.model.zero_grad(set_to_none=True)
        return captured["h"].grad, batch.subject_index

    return grad


@pytest.fixture
def run_threads():
    """``fn(target, n, timeout=120)``: run ``target(k)`` for k in 0..n-1 in n threads at once and wait
    for them all (each at most ``timeout`` seconds)."""
    def run(target, n: int, timeout: float = 120) -> None:
        threads = [threading.Thread(target=target, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)

    return run
