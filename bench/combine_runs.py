"""One benchmark table from several runs: `ngguard edit` run folders (their report.json: per seed in
``per_seed`` when the run had several seeds, the run's one seed otherwise) and the JSON of
``bench/benchmark_guards.py``, each run contributing one column, mean ± 95% interval over its seeds
(``ngguard.stats``), the base model beside them; paired differences per seed; a per-subject table of
the unseen subjects (issue 27).

    OMP_NUM_THREADS=1 .venv/bin/python bench/combine_runs.py \\
        --run "neural_gate=runs/default-3seed:neural_gate" \\
        --run "neural_gate (paper losses)=runs/paper-seed0,runs/paper-seed1,runs/paper-seed2:neural_gate" \\
        --run "privacy_probe=runs/guards.json:privacy_probe" \\
        --ref privacy_probe --pair neural_gate "neural_gate (paper losses)" --out runs/combined.md

``--run LABEL=PATH[,PATH...]:METHOD``: a column named LABEL, METHOD's results read from each PATH (a
run folder, its report.json, or a benchmark_guards JSON); one seed may come from one PATH only.

Runs pair only if their seeds were tested on the same questions: the script refuses (one line, exit
1) when, for a seed, two runs' base (unedited) results differ on a split both evaluated (every count,
per-subject count and score: the same model, judge and questions give the same base answers), or when
two run folders' written worlds for that seed differ (the evaluated splits' queries and the images
they show). A metric a run did not measure is shown as "—" (or "(n=k)" when only k seeds have it),
never as 0.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from ngguard.atomic import atomic_write_text
from ngguard.report import _ci as ci_text
from ngguard.stats import HEADLINE, LOWER_IS_BETTER, aggregate, mean_ci, paired_differences

# the unseen subjects' per-subject rows: (split, metric, what it is)
PER_SUBJECT = [("heldout_subjects", "rta_sensitive", "RtA, unseen private subject"),
               ("overrefusal_unseen", "rta_benign", "over-refusal (↓), unseen look-alike")]


class CombineError(Exception):
    """Bad input or runs that do not pair: one line for the user."""


def _load_json(path: Path) -> dict:
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise CombineError(f"no report: {path} is not a file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CombineError(f"{path} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CombineError(f"{path} is not a JSON object")
    return data


def read_source(path: Path) -> dict[int, dict]:
    """{seed: {"before": {split: metrics}, "methods": {method: {split: metrics}}}} of one run: an
    `ngguard edit` report (several seeds in ``per_seed``, else its one seed) or a benchmark_guards JSON."""
    data = _load_json(path)
    if "recipe" in data and "before" in data:  # ngguard edit's report.json
        per_seed = data.get("per_seed") or {}
        if not per_seed:
            seeds = data.get("seeds") or [data["recipe"].get("seed", 0)]
            if len(seeds) != 1:
                raise CombineError(f"{path}: {len(seeds)} seeds but no per_seed results")
            per_seed = {seeds[0]: {"before": data["before"], "methods": data.get("methods", {})}}
    elif isinstance(data.get("per_seed"), dict) and data["per_seed"]:  # benchmark_guards.py --json
        per_seed = data["per_seed"]
    else:
        raise CombineError(f"{path}: neither an ngguard edit report nor a benchmark_guards JSON (no per-seed results)")
    out = {}
    for s, r in per_seed.items():
        if not isinstance(r, dict) or not isinstance(r.get("before"), dict):
            raise CombineError(f"{path}: seed {s} has no base results")
        out[int(s)] = {"before": r["before"],
                       "methods": {m: (x["after"] if isinstance(x, dict) and "after" in x else x)
                                   for m, x in (r.get("methods") or {}).items()}}
    return out


def world_dirs(path: Path) -> dict[int, Path]:
    """The worlds an `ngguard edit` run folder wrote, by seed: its first seed's ``world``, then
    ``world-seed<S>`` (``pipeline.run_seed``). Empty for a JSON file or a run without worlds."""
    folder = path if path.is_dir() else path.parent
    report = folder / "report.json"
    if not report.is_file() or (path.is_file() and path.name != "report.json"):
        return {}
    seeds = json.loads(report.read_text()).get("seeds") or []
    dirs = {s: folder / ("world" if i == 0 else f"world-seed{s}") for i, s in enumerate(seeds)}
    return {s: d for s, d in dirs.items() if (d / "queries.jsonl").is_file()}


def world_fingerprint(world: Path, splits) -> str:
    """sha256 over the queries of ``splits`` (canonical JSON, sorted) and the bytes of the images they show."""
    splits = set(splits)
    rows = sorted(json.dumps(q, sort_keys=True) for q in map(json.loads, (world / "queries.jsonl").read_text().splitlines())
                  if q.get("split") in splits)
    h = hashlib.sha256("\n".join(rows).encode())
    for image in sorted({json.loads(r)["image"] for r in rows}):
        h.update(image.encode() + b"\0" + (world / image).read_bytes())
    return h.hexdigest()


def _base_split(res: dict) -> str:
    return json.dumps({k: v for k, v in res.items() if k != "responses"}, sort_keys=True)


def check_pairing(sources: list[tuple[str, Path, dict[int, dict]]]) -> dict:
    """Refuse (CombineError) unless, seed by seed, every two sources' base results agree on each split
    both evaluated and their written worlds (where both wrote one) show the same evaluated questions."""
    first: dict[int, tuple[str, Path, dict]] = {}
    worlds: dict[int, tuple[str, Path, str]] = {}
    checked: dict[int, dict] = {}
    seen = set()
    for label, path, per_seed in sources:
        if path.resolve() in seen:  # two columns of one run
            continue
        seen.add(path.resolve())
        wdirs = world_dirs(path)
        for seed, r in sorted(per_seed.items()):
            info = checked.setdefault(seed, {"base_agrees": [], "world_sha256": None, "worlds": []})
            if seed not in first:
                first[seed] = (label, path, r["before"])
            else:
                l0, p0, b0 = first[seed]
                for split in sorted(set(b0) & set(r["before"])):
                    if _base_split(b0[split]) != _base_split(r["before"][split]):
                        raise CombineError(
                            f"seed {seed} does not pair: the base model's {split!r} results differ between "
                            f"{l0!r} ({p0}) and {label!r} ({path}): other test questions, model or judge")
            info["base_agrees"].append(f"{label}: {path}")
            if seed in wdirs:
                fp = world_fingerprint(wdirs[seed], r["before"])
                if seed in worlds and worlds[seed][2] != fp:
                    l0, p0, _ = worlds[seed]
                    raise CombineError(f"seed {seed} does not pair: the worlds of {l0!r} ({p0}) and {label!r} "
                                       f"({path}) differ on the evaluated splits' questions or images")
                worlds.setdefault(seed, (label, path, fp))
                info["world_sha256"] = fp
                info["worlds"].append(str(wdirs[seed]))
    return checked


def parse_run(spec: str) -> tuple[str, list[Path], str]:
    label, sep, rest = spec.partition("=")
    paths, sep2, method = rest.rpartition(":")
    if not sep or not sep2 or not label.strip() or not paths or not method:
        raise CombineError(f"--run {spec!r}: expected LABEL=PATH[,PATH...]:METHOD")
    return label.strip(), [Path(p.strip()) for p in paths.split(",") if p.strip()], method.strip()


def combine(runs: list[str], ref: str | None = None, pairs: list[list[str]] = ()) -> dict:
    """Every figure of the combined table (see the module's docstring); raises CombineError."""
    if not runs:
        raise CombineError("no --run given")
    per_seed: dict[int, dict] = {}
    columns: dict[str, dict] = {}
    sources = []
    for spec in runs:
        label, paths, method = parse_run(spec)
        if label == "base" or label in columns:
            raise CombineError(f"--run label {label!r} is {'reserved' if label == 'base' else 'given twice'}")
        seeds: dict[int, str] = {}
        for path in paths:
            src = read_source(path)
            sources.append((label, path, src))
            for seed, r in src.items():
                if method != "base" and method not in r["methods"]:
                    raise CombineError(f"{path} has no results of {method!r} for seed {seed} "
                                       f"(it has: {', '.join(r['methods']) or 'none'})")
                if seed in seeds:
                    raise CombineError(f"--run {label!r}: seed {seed} comes from both {seeds[seed]} and {path}")
                seeds[seed] = str(path)
                entry = per_seed.setdefault(seed, {"before": r["before"], "methods": {}})
                entry["methods"][label] = {"after": r["before"] if method == "base" else r["methods"][method]}
        columns[label] = {"method": method, "sources": [str(p) for p in paths], "seeds": sorted(seeds)}
    checks = check_pairing(sources)
    per_seed = dict(sorted(per_seed.items()))
    names = ["base", *columns]
    columns = {"base": {"method": "base", "sources": [], "seeds": sorted(per_seed)}, **columns}
    pair_list = [(ref, o) for o in names if o != ref] if ref else []
    for a, b in pairs or ():
        pair_list.append((a, b))
    for a, b in pair_list:
        for x in (a, b):
            if x not in columns:
                raise CombineError(f"no column {x!r} to pair (columns: {', '.join(names)})")
    paired = {f"{a} - {b}": paired_differences(per_seed, a, b) for a, b in pair_list}
    per_subject = {}
    for split, key, what in PER_SUBJECT:
        subjects = list(dict.fromkeys(s for r in per_seed.values() for s in r["before"].get(split, {}).get("per_subject", {})))
        for subj in subjects:
            per_subject[f"{split}.{key}.{subj}"] = {"subject": subj, "split": split, "metric": key, "label": what, **{
                n: mean_ci((r["before"] if n == "base" else r["methods"].get(n, {}).get("after", {}))
                           .get(split, {}).get("per_subject", {}).get(subj, {}).get(key)
                           for r in per_seed.values() if n == "base" or n in r["methods"])
                for n in names}}
    return {"columns": columns, "seeds": sorted(per_seed), "aggregate": aggregate(per_seed), "paired": paired,
            "per_subject": per_subject, "pairing": checks}


def _cell(c: dict | None, n_expected: int) -> str:
    text = ci_text(c)
    if c and 0 < c.get("n", 0) < n_expected:
        text += f" (n={c['n']})"
    return text


def markdown(res: dict) -> str:
    cols = res["columns"]
    names = list(cols)
    n_of = {n: len(cols[n]["seeds"]) for n in names}
    L = ["Mean ± 95% interval over seeds (Student's t; `ngguard.stats`); (↓) = lower is better; "
         "— = not measured; (n=k) = measured on k of the column's seeds.", "",
         "Columns (label: method, seeds, source): " + "; ".join(
             f"{n}: {c['method']}, seeds {','.join(map(str, c['seeds']))}" + (f", {' '.join(c['sources'])}" if c["sources"] else "")
             for n, c in cols.items()) + ".", "",
         "| split: metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    agg = res["aggregate"]
    for split, key, label in HEADLINE:
        cells = [_cell(agg.get(n, {}).get(split, {}).get(key), n_of[n]) for n in names]
        if any(c != "—" for c in cells):
            L.append(f"| {label}{' (↓)' if (split, key) in LOWER_IS_BETTER else ''} | " + " | ".join(cells) + " |")
    if res["paired"]:
        pnames = list(res["paired"])
        L += ["", "Paired differences (per seed, A - B on the seeds both ran, then mean ± 95% interval; an interval "
              "that excludes 0 is a difference; (n=k): k seeds in common):", "",
              "| metric | " + " | ".join(pnames) + " |", "|---|" + "---|" * len(pnames)]
        for split, key, label in HEADLINE:
            k = f"{split}.{key}"
            cells = [_cell(res["paired"][p].get(k), len(res["seeds"])) for p in pnames]
            if any(c != "—" for c in cells):
                L.append(f"| {label}{' (↓)' if (split, key) in LOWER_IS_BETTER else ''} | " + " | ".join(cells) + " |")
    if res["per_subject"]:
        L += ["", "Per subject, the unseen subjects (never in the edit or the guards' training):", "",
              "| subject | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for row in res["per_subject"].values():
            L.append(f"| {row['subject']} ({row['label']}) | " + " | ".join(_cell(row[n], n_of[n]) for n in names) + " |")
    L += ["", "Pairing: " + "; ".join(
        f"seed {s}: base results identical in {len(c['base_agrees'])} runs"
        + (f", world {c['world_sha256'][:12]} in {len(c['worlds'])}" if c["world_sha256"] else "")
        for s, c in res["pairing"].items()) + "."]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", default=[], metavar="LABEL=PATH[,PATH...]:METHOD")
    p.add_argument("--ref", default=None, help="a column label: paired differences ref - every other column")
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="also the paired difference A - B (column labels; repeatable)")
    p.add_argument("--out", type=Path, default=None, help="write OUT (markdown) and OUT with .json")
    a = p.parse_args(argv)
    try:
        res = combine(a.run, a.ref, a.pair)
    except CombineError as e:
        print(f"combine_runs: {e}", file=sys.stderr)
        return 1
    text = markdown(res)
    print(text)
    if a.out:
        atomic_write_text(a.out.with_suffix(".json"), json.dumps(res, indent=1, default=str))
        atomic_write_text(a.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
