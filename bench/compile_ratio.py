"""Would ``torch.compile`` or bfloat16 make the edit step faster on this CPU? Side by side, one run.

    OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 PYTHONPATH=$PWD .venv/bin/python bench/compile_ratio.py \
        [--model organism] [--steps 30] [--rows 4] [--length 78] [--targets 60]

An edit step's arithmetic at the organism's shapes (``docs/speed.md``): the six decoder layers above the
replayed ones on a packed batch of ``rows x length`` tokens, an additive delta on two MLP
down-projections (the second one gated per hidden dim, the way Eq. 7 gates the gradient), the output
projection only at ``targets`` positions, cross-entropy, and the gradient w.r.t. the two deltas. The same
function runs three ways and the CPU time per step (``time.process_time``, after 3 warm-up steps) is
printed with the ratio to eager float32:

1. eager float32 (what the edit runs);
2. ``torch.compile`` (inductor, C++ kernels on CPU), plus its one-off compile time;
3. eager under ``torch.autocast("cpu", dtype=torch.bfloat16)``.

It measures the ceiling of these two levers on the step's dense part; it is not the edit itself (no
hooks, no packed-row bookkeeping), so read the ratios, not the milliseconds.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from ngguard.adapters import load_adapter


def make_step(adapter, rows: int, length: int, targets: int, first: int = 2):
    lm = adapter.model.model.language_model
    layers, norm, head, rotary = lm.layers[first:], lm.norm, adapter.model.lm_head, lm.rotary_emb
    d, inner = lm.config.hidden_size, lm.config.intermediate_size
    g = torch.Generator().manual_seed(0)
    deltas = [torch.zeros(d, inner, requires_grad=True) for _ in range(2)]
    gate = (torch.rand(d, generator=g) < 0.1).float()                       # 10 % of the dims, like top_k 10
    pos = torch.arange(length).unsqueeze(0).expand(rows, length)
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None].expand(rows, 1, length, length)
    t_row = torch.randint(0, rows, (targets,), generator=g)
    t_pos = torch.randint(0, length, (targets,), generator=g)
    t_tok = torch.randint(0, head.out_features, (targets,), generator=g)

    def step(h: torch.Tensor):                                               # h: [rows, length, d]
        pe = rotary(h, pos)
        for i, layer in enumerate(layers):
            h = h + layer.self_attn(layer.input_layernorm(h), position_embeddings=pe, attention_mask=mask)[0]
            x = layer.post_attention_layernorm(h)
            mid = layer.mlp.act_fn(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)   # [rows, length, inner]
            out = layer.mlp.down_proj(mid)
            if i < 2:
                out = out + (mid @ deltas[i].T) * (gate if i == 1 else 1.0)
            h = h + out
        logits = head(norm(h)[t_row, t_pos])                                 # [targets, vocab]
        return torch.autograd.grad(F.cross_entropy(logits, t_tok), deltas)

    return step, torch.randn(rows, length, d, generator=g)


def per_step_ms(fn, h, steps: int) -> float:
    for _ in range(3):
        fn(h)
    t = time.process_time()
    for _ in range(steps):
        fn(h)
    return (time.process_time() - t) / steps * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="organism")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--length", type=int, default=78)
    p.add_argument("--targets", type=int, default=60)
    a = p.parse_args(argv)
    adapter = load_adapter(a.model, dtype=torch.float32, device="cpu")
    for q in adapter.model.parameters():
        q.requires_grad_(False)
    step, h = make_step(adapter, a.rows, a.length, a.targets)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} (CPU clock; beside other jobs "
          f"the ratios hold better than the times)")
    eager = per_step_ms(step, h, a.steps)
    print(f"eager float32:        {eager:7.1f} ms/step")
    compiled = torch.compile(step)
    t = time.time()
    compiled(h)
    print(f"torch.compile:        one-off compile {time.time() - t:.0f} s (wall)")
    comp = per_step_ms(compiled, h, a.steps)
    print(f"torch.compile:        {comp:7.1f} ms/step   eager / compiled = {eager / comp:.2f}x")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = per_step_ms(step, h, a.steps)
    print(f"bfloat16 autocast:    {bf16:7.1f} ms/step   eager / bf16 = {eager / bf16:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
