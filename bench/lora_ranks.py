"""The bundled organism's patch as a PEFT LoRA at several ranks: energy kept, EtA, benign answer rate.

    python bench/lora_ranks.py                               # ranks 4, 16, 64, full; test split
    python bench/lora_ranks.py --ranks 1,4,full --sets test,heldout_subjects --json out/lora.json

For each rank: ``ngguard.lora.export_lora`` (truncated SVD of the patch delta) into a temp folder,
``PeftModel.from_pretrained`` on a fresh copy of the base organism (float32), and ``ngguard eval``'s
greedy evaluation of the recipe's query sets (``recipes/organism.yaml``: the rendered world, the same
splits as the edit's report) THROUGH the LoRA layers. The base model and the merged patch are
measured in the same run as references. Prints one table; ``--json`` writes it too.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="4,16,64,full", help="comma-separated ranks ('full' = every singular value)")
    p.add_argument("--patch", default=None, help="patch folder (default: the organism's bundled patch)")
    p.add_argument("--recipe", default="recipes/organism.yaml", help="the recipe whose world and splits to use")
    p.add_argument("--sets", default="test", help="comma-separated query sets (test, heldout_subjects, utility, ...)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import torch
    from loguru import logger
    from peft import PeftModel

    from ngguard.adapters import adapter_for, load_adapter
    from ngguard.evaluate import evaluate
    from ngguard.guard import ProtectedLVLM
    from ngguard.serving.options import ServingOptions
    from ngguard.judges import RefusalJudge
    from ngguard.lora import export_lora, parse_rank
    from ngguard.pipeline import build_sets
    from ngguard.recipe import load_recipe
    from serve.app import organism_patch_dir

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    ranks = [parse_rank(r) for r in args.ranks.split(",")]
    patch = Path(args.patch) if args.patch else organism_patch_dir()
    recipe = load_recipe(args.recipe, overrides=["data.multip2a=off"])
    wanted = [s.strip() for s in args.sets.split(",") if s.strip()]
    judge = RefusalJudge()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ngguard-lora-bench-") as tmp:
        sets = build_sets(recipe, Path(tmp)).splits
        for name in wanted:
            if not sets.get(name):
                p.error(f"--sets: no queries in set {name!r}")
        ev = recipe.evaluation

        def measure(label: str, adapter, energy: float | None) -> None:
            t = time.perf_counter()
            row = {"model": label, "energy_kept": energy}
            for name in wanted:
                r = evaluate(adapter, sets[name], judge=judge, batch_size=ev.batch_size,
                             max_new_tokens=ev.max_new_tokens, desc=f"{label} {name}")
                row[name] = {k: r[k] for k in ("n", "eta", "rta_sensitive", "benign_answer_rate", "benign_accuracy",
                                               "leak_accuracy")}
            row["seconds"] = round(time.perf_counter() - t, 1)
            rows.append(row)

        measure("base (no patch)", load_adapter("organism", dtype=torch.float32), None)
        merged = ServingOptions(protection="merged", max_batch=1)  # the patched values in the weights
        measure("merged patch", ProtectedLVLM.from_pretrained("organism", patch, device="cpu", serving=merged).adapter, 1.0)
        for rank in ranks:
            out = Path(tmp) / f"lora-{rank or 'full'}"
            info = export_lora(patch, out, rank=rank)
            base = load_adapter("organism", dtype=torch.float32)
            lora = PeftModel.from_pretrained(base.model, out)
            measure(f"LoRA rank {info['rank']}", adapter_for(lora.base_model.model, base.processor),
                    info["energy_kept"])

    return _print(rows, wanted, patch, args.json)


def _print(rows: list[dict], sets: list[str], patch: Path, json_path: str | None) -> int:
    pid = json.loads((patch / "patch.json").read_text())["patch_id"]
    print(f"patch {pid} ({patch}); metrics through the LoRA layers (PEFT), greedy, float32, CPU")
    head = f"{'model':<18} {'energy kept':>11}"
    for s in sets:
        head += f" | {s + ' EtA':>14} {'RtA sens':>8} {'benign ans':>10} {'leak':>6}"
    print(head)
    for r in rows:
        line = f"{r['model']:<18} {'-' if r['energy_kept'] is None else format(r['energy_kept'], '.4f'):>11}"
        for s in sets:
            m = r[s]
            cell = lambda k, w: f"{'-':>{w}}" if m[k] is None else f"{m[k]:>{w}.3f}"  # noqa: E731 (a set without sensitive questions)
            line += f" | {cell('eta', 14)} {cell('rta_sensitive', 8)} {cell('benign_answer_rate', 10)} {cell('leak_accuracy', 6)}"
        print(line)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"patch_id": pid, "rows": rows}, indent=2) + "\n")
        tmp.replace(path)  # atomic
    return 0


if __name__ == "__main__":
    sys.exit(main())
