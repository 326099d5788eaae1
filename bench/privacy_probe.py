"""Where is privacy decodable? Linear probes on the unedited organism's hidden states (issue 27).

For one recipe and seed: render the world, take the hidden state at the LAST prompt token after each
decoder layer, fit a logistic regression "sensitive question or not" on the edit's data only (the
sensitive + benign training questions of the edited subjects, the seen look-alikes' training
questions, optionally more retention data) and print its accuracy on every other set: unseen
private subjects, unseen look-alikes, awareness, implicit, adversarial, and the validation sets.
Also the issue's subject-token probe (private vs public SUBJECT, at the subject's last token).

    OMP_NUM_THREADS=1 .venv/bin/python bench/privacy_probe.py recipes/organism.yaml [--seed 0]
"""
from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

from ngguard.adapters import load_adapter
from ngguard.methods.privacy_probe import _open, fit_probe, prompt_states
from ngguard.pipeline import build_sets
from ngguard.recipe import load_recipe
from ngguard.world.spec import is_private

EVAL = ["test", "heldout_subjects", "overrefusal", "overrefusal_unseen", "implicit", "awareness", "adversarial",
        "general", "utility", "val_pairs", "val_awareness", "val_implicit", "val_adversarial", "val_utility"]


@torch.no_grad()
def subject_states(adapter, queries, layers, batch_size=64):
    out = []
    for i in range(0, len(queries), batch_size):
        chunk = queries[i:i + batch_size]
        b = adapter.encode([_open(q.image) for q in chunk], [q.prompt for q in chunk],
                           subjects=[q.subject for q in chunk]).to(adapter.device)
        hs = adapter.model(**b.inputs, output_hidden_states=True).hidden_states
        rows = torch.arange(len(chunk))
        out.append(torch.stack([hs[l][rows, b.subject_index] for l in layers], 1).float().cpu())
    return torch.cat(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--train-sets", default="train,overrefusal_train",
                   help="comma-separated training-role sets the probe learns from (sensitive = 1)")
    p.add_argument("--l2", type=float, default=1e-2)
    a = p.parse_args(argv)
    r = load_recipe(a.recipe, overrides=["data.multip2a=off", *a.overrides])
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    adapter = load_adapter(r.model.path, dtype=r.model.dtype, device="cpu")
    n = adapter.num_layers
    with tempfile.TemporaryDirectory() as tmp:
        sets = build_sets(r, Path(tmp), world_seed=r.data.world.seed + a.seed).splits
        train = [q for k in a.train_sets.split(",") for q in sets[k]]
        layers = list(range(n))
        X = prompt_states(adapter, train, layers)
        y = torch.tensor([q.sensitive for q in train], dtype=torch.float)
        ev = {k: (sets[k], prompt_states(adapter, sets[k], layers)) for k in EVAL if sets.get(k)}
        print(f"\nlast-prompt-token probe 'sensitive or not', trained on {a.train_sets} ({len(train)} q), l2 {a.l2}")
        print("| set | " + " | ".join(f"L{l}" for l in layers) + " | all |")
        print("|---|" + "---|" * (n + 1))
        probes = [fit_probe(X[:, [l]], y, [l], l2=a.l2) for l in layers] + [fit_probe(X, y, layers, l2=a.l2)]
        for k, (qs, S) in ev.items():
            yt = torch.tensor([q.sensitive for q in qs])
            accs = [(pr.fires(S[:, [l]]) == yt).float().mean().item() for l, pr in zip(layers, probes)]
            accs.append((probes[-1].fires(S) == yt).float().mean().item())
            print(f"| {k} ({len(qs)}) | " + " | ".join(f"{x:.2f}" for x in accs) + " |")
        # the check: private vs public SUBJECT at the subject's last token, named-subject questions
        seen = [q for q in train]
        unseen = sets["heldout_subjects"] + sets["overrefusal_unseen"]
        hl = list(range(n + 1))
        Xs, Xu = subject_states(adapter, seen, hl), subject_states(adapter, unseen, hl)
        ys = torch.tensor([is_private(q.subject) for q in seen], dtype=torch.float)
        yu = torch.tensor([is_private(q.subject) for q in unseen])
        print("\nsubject-token probe 'private subject' (trained on seen subjects' training questions), "
              "accuracy on unseen subjects; index 0 = embeddings, k = after layer k-1")
        print(" ".join(f"h{l}:{(fit_probe(Xs[:, [l]], ys, [l]).fires(Xu[:, [l]]) == yu).float().mean().item():.2f}"
                       for l in hl))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
