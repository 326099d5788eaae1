"""Where neural_gate_plus's gate can read the subject's privacy (issue 27), on the VALIDATION data only.

For one seed, with subjects held out of the training data (``data.val_holdout``, as ``choose_val.py``): the
cross-subject contrast private vs public (``neural_gate_plus.privacy_contrast``) is fitted on the training-role
questions of the seen subjects (the edit's pairs, the public look-alikes' retention questions), at each edited
layer, on two states at two positions: the layer's output (what the gate of Eq. 6 sees) and the input of the
edited module (down_proj: the columns an edit reads), at the subject's last token and at the last prompt token
(where the answer starts). Each state is projected on the contrast's top-k dims (sign-weighted sum of the
standardized dims) and the AUC private vs public is printed for the seen subjects' and the held-out subjects'
validation questions (``val_pairs``); then the subject token's share of the edit's gradient at each edited
layer (``gate_share.subject_gradient_share``, 16 training samples): the only part a gate there can block.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gate_contrast.py recipes/organism.yaml --holdout "Phone no.,bus"
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ngguard.adapters import load_adapter
from ngguard.methods.neural_gate_plus import privacy_contrast
from ngguard.methods.gate_share import subject_gradient_share
from ngguard.pipeline import build_sets, edit_data
from ngguard.recipe import load_recipe
from ngguard.world.spec import is_private
from bench.choose_val import validation_overrides


def _open(p):
    from PIL import Image
    with Image.open(p) as im:
        return im.convert("RGB")


@torch.no_grad()
def states(adapter, queries, layers, module, batch_size=64):
    """{(what, where, layer): [N, dim]} for what in (out, in), where in (subject, last)."""
    got = {}
    out: dict = {}
    hooks = []
    for l in layers:
        hooks.append(adapter.component(l, "layer").register_forward_hook(
            lambda m, i, o, l=l: got.__setitem__(("out", l), (o[0] if isinstance(o, tuple) else o).float())))
        hooks.append(adapter.component(l, module).register_forward_hook(
            lambda m, i, o, l=l: got.__setitem__(("in", l), i[0].float())))
    try:
        for k in range(0, len(queries), batch_size):
            chunk = queries[k:k + batch_size]
            b = adapter.encode([_open(q.image) for q in chunk], [q.prompt for q in chunk], subjects=[q.subject for q in chunk])
            adapter.model(**b.inputs)
            rows = torch.arange(len(chunk))
            for (what, l), h in got.items():
                for where, idx in (("subject", b.subject_index), ("last", torch.full((len(chunk),), h.shape[1] - 1))):
                    out.setdefault((what, where, l), []).append(h[rows, idx].cpu())
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def auc(score: torch.Tensor, y: torch.Tensor) -> float:
    pos, neg = score[y > 0], score[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    return float((pos[:, None] > neg[None]).float().mean() + 0.5 * (pos[:, None] == neg[None]).float().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe", type=Path)
    p.add_argument("--holdout", default="Phone no.,bus")
    p.add_argument("--top-k", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    holdout = tuple(s for s in a.holdout.split(",") if s)
    r = load_recipe(a.recipe, overrides=validation_overrides([], holdout))
    torch.manual_seed(a.seed)
    adapter = load_adapter(r.model.path, dtype=r.model.dtype, device="cpu")
    adapter.model.eval()
    layers = list(r.layers)
    with tempfile.TemporaryDirectory() as tmp:
        sets = build_sets(r, Path(tmp), world_seed=r.data.world.seed + a.seed, world_name="w").splits
        train = [q for name in ("train", "overrefusal_train") for q in sets.get(name, [])]
        val = [q for q in sets["val_pairs"]]
        st_train, st_val = states(adapter, train, layers, r.module), states(adapter, val, layers, r.module)
        samples = edit_data(adapter, sets, r)[0]
    subj = [q.subject for q in train]
    private = {q.subject for q in sets["train"] if q.sensitive}
    y_val = torch.tensor([float(is_private(q.subject)) for q in val])
    held = torch.tensor([q.subject in holdout for q in val])
    print(f"seed {a.seed}, held out: {', '.join(holdout)}; private {sorted(private)}; top {a.top_k}% dims")
    print("| state | position | layer | how | AUC seen | AUC held-out |")
    print("|---|---|---|---|---|---|")
    for (what, where, l), X in sorted(st_train.items()):
        mean, std = X.mean(0), X.std(0).clamp_min(1e-6)
        for how in ("mean_diff", "probe"):
            c = privacy_contrast((X - mean) / std if how == "mean_diff" else X, subj, private, how=how)
            k = max(1, round(c.numel() * a.top_k / 100))
            top = torch.topk(c.abs(), k).indices
            score = (((st_val[(what, where, l)] - mean) / std)[:, top] * c[top].sign()).sum(1)
            print(f"| {'layer output' if what == 'out' else r.module + ' input'} | {where} | {l} | {how} | "
                  f"{auc(score[~held], y_val[~held]):.3f} | {auc(score[held], y_val[held]):.3f} |")
    for l in layers:
        share = subject_gradient_share(adapter, samples, l, module=r.module, refusal=r.edit.refusal, alpha=r.edit.alpha,
                                       max_samples=16)
        print(f"layer {l}: the subject token's share of the edit's gradient {share:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
