"""The main job: recipe -> data -> adapter -> (layer search) -> localize -> edit -> patch -> evaluate -> report.

Each stage is a module of its own (README, "How it is built"); this one only runs them in order:
the data (``build_sets``, ``make_samples``), the layers (``layer_search.choose_layers``), the
localization (``layer_search.localize_layers``), each method of the registry from the same start
(``methods.REGISTRY``: what a method needs, gates or its own layers, is declared there), the patch,
the evaluation and the report.

``run_recipe`` writes one run folder atomically (built in a temp folder next to it, renamed at the
end: a killed run leaves no folder):

    model/              the edited model, a standard HF checkpoint (unedited tensors byte-identical);
                        not written for a method that edits no weights (the base is the model)
    patch/              patch.safetensors + patch.json (+ base.safetensors for revert); for a method
                        that edits no weights, a guard patch (``guard_patch``: guard.safetensors + patch.json)
    gates.safetensors   per layer and subject: the gate values M
    world/              the rendered synthetic world (when the recipe asks for one)
    report.json, report.md, *.png
"""
from __future__ import annotations

import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from loguru import logger
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from .adapters import load_adapter, resolve_model_path
from .adapters.base import Adapter
from .atomic import atomic_dir
from .methods.core import Sample, WeightBackup
from .data import Query, load_queries, paper_split, read_jsonl
from .devices import pick_device
from .evaluate import evaluate, rescore_with_guard, score
from .guard_patch import write_guard_patch
from .judges import make_judge
from .layer_search import LayerChoice, choose_layers, gates_for, localize_layers
from .methods import REGISTRY, method_deviations, run_edit
from .methods.gate_share import subject_gradient_share
from .methods.neural_gate import LayerLocalization
from .patch import apply_patch, write_patch
from .progress import COST, RunProgress, StageClock
from .recipe import (AUGMENT_SETS, RETAIN_SETS, EditSpec, LayerSearch, LocalizationSpec, Recipe, RecipeError,
                     check_layers, check_placement, dump_recipe, recipe_hash)
from .report import write_report
from .stage_cache import StageCache, queries_fingerprint
from .stats import aggregate, paired_differences
from .world.multip2a import pose_on_world
from .world.render import DEFAULT_SUBJECTS, render_world
from .world.spec import PRIVACY_SUBJECTS, UTILITY_SUBJECT, is_private


def find_shared_multip2a() -> Path | None:
    """The Multi-P2A folder of the project's shared data, if this checkout has one."""
    env = os.environ.get("NGGUARD_SHARED")
    for root in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[2] / "shared", Path.cwd().parent / "shared"]:
        p = root / "data" / "multi-p2a"
        if (p / "multi_p2a_leakage_sen.json").is_file():
            return p
    return None


# At most this many Multi-P2A questions per subject and file (sensitive / benign) are posed on the
# world: enough for a rate, and the evaluation stays short.
MULTIP2A_PER_SUBJECT = 20


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Sets:
    """What ``build_sets`` hands on: the query sets by split name (``world.render.SPLITS`` for a
    rendered world; train / test / heldout_subjects / utility for a query file) and the subjects the
    edit trains on (``data.subjects`` less ``data.val_holdout``)."""

    splits: dict[str, list[Query]]
    edit_subjects: list[str]


def build_sets(recipe: Recipe, run_dir: Path, *, world_seed: int | None = None,
               world_name: str = "world") -> Sets:
    """The query sets of the benchmark and the edited subjects (``Sets``). ``world_seed`` overrides
    ``data.world.seed`` (the seed loop renders a new world per seed)."""
    d = recipe.data
    if d.world is not None:
        subjects = list(d.world.subjects or DEFAULT_SUBJECTS)
        world_dir = render_world(subjects, d.world.n, d.world.seed if world_seed is None else world_seed,
                                 run_dir / world_name)
        queries = read_jsonl(world_dir / "queries.jsonl")
    else:
        world_dir = None
        queries = load_queries(d.queries)
        if d.split == "paper":
            queries = paper_split(queries)
    present = list(dict.fromkeys(q.subject for q in queries if q.split in ("train", "test")))
    edit_subjects = list(d.subjects) if d.subjects else [s for s in present if s in PRIVACY_SUBJECTS] or \
        [s for s in present if s not in d.heldout_subjects and s != UTILITY_SUBJECT]
    missing = [s for s in edit_subjects if s not in present]
    if missing:
        raise ValueError(f"data.subjects: {missing} not found in the data (subjects present: {present})")
    edit_subjects = [s for s in edit_subjects if s not in d.val_holdout]  # leave-one-subject-out (validation)
    edited = set(edit_subjects)
    sets: dict[str, list[Query]] = defaultdict(list)
    for q in queries:
        if q.subject in d.val_holdout and (q.split or "").endswith("train"):
            continue
        if q.split in ("train", "test", "val"):
            if q.subject in edited or q.split == "val" and q.subject not in PRIVACY_SUBJECTS:
                sets[q.split].append(q)  # val also holds the seen public look-alikes
            elif q.subject in d.heldout_subjects:  # a query file: held-out subjects are never edited
                sets["heldout_subjects"].append(q)
            elif q.subject == UTILITY_SUBJECT:
                sets["utility_train" if q.split == "train" else "utility"].append(q)
        elif q.split is not None:
            sets[q.split].append(q)
    for name in recipe.edit.augment:  # training-role extras: edited subjects' join train, look-alikes' retention
        for q in sets.get(AUGMENT_SETS[name], []):
            if q.subject in edited or not is_private(q.subject):
                sets["train" if q.subject in edited else RETAIN_SETS["public"]].append(q)
    mp2a = None if d.multip2a == "off" else (find_shared_multip2a() if d.multip2a == "auto" else Path(d.multip2a))
    if mp2a is not None and world_dir is not None:
        sets["multip2a"] = pose_on_world(mp2a, world_dir, edit_subjects + list(d.heldout_subjects),
                                         max_per_subject=MULTIP2A_PER_SUBJECT)
    elif d.multip2a not in ("off", "auto"):
        raise ValueError("data.multip2a: posing Multi-P2A questions needs a synthetic world (data.world)")
    if not sets["train"]:
        raise ValueError("no training queries (split 'train') for the edited subjects")
    logger.info("data: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()) + f"; edit subjects {edit_subjects}")
    return Sets(splits=dict(sets), edit_subjects=edit_subjects)


def _open(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def first_words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def original_answers(adapter: Adapter, queries: Sequence[Query], *, max_words: int, batch_size: int) -> list[str]:
    """The ORIGINAL model's answer to each query (before any edit), its first ``max_words`` words."""
    qs, out = list(queries), []
    for i in range(0, len(qs), batch_size):
        chunk = qs[i:i + batch_size]
        outs = adapter.generate([_open(q.image) for q in chunk], [q.prompt for q in chunk], max_new_tokens=24)
        out += [first_words(o, max_words) for o in outs]
    return out


def make_samples(adapter: Adapter, queries: Sequence[Query], *, max_words: int, batch_size: int,
                 benign_only: bool = False, answers: Sequence[str] | None = None) -> tuple[list[Sample], dict[str, str]]:
    """Group training queries by image; record the ORIGINAL model's answers (before any edit; or take
    ``answers``, one per query, from ``original_answers``). ``benign_only``: keep samples without
    sensitive questions (general retention data)."""
    qs = list(queries)
    if answers is None:
        answers = original_answers(adapter, qs, max_words=max_words, batch_size=batch_size)
    by_query = {(q.image, q.prompt): a for q, a in zip(qs, answers)}
    groups: dict[tuple[str, str], list[Query]] = defaultdict(list)
    for q in qs:
        groups[(q.subject, q.image)].append(q)
    samples = []
    for (subject, image), group in groups.items():
        sens = [q.prompt for q in group if q.sensitive]
        ben = [(q.prompt, by_query[(q.image, q.prompt)]) for q in group if not q.sensitive]
        ben = [(p, a) for p, a in ben if a]
        if sens or (benign_only and ben):
            samples.append(Sample(_open(image), subject, sens, ben, key=image))
    unsafe = {q.prompt: by_query[(q.image, q.prompt)] for q in qs if q.sensitive}
    return samples, unsafe


def edit_data(adapter: Adapter, sets: dict[str, list[Query]], recipe: Recipe) -> tuple[list[Sample], dict, list[Sample]]:
    """(training samples, the base answers to the sensitive questions, retention samples) for an edit:
    ``make_samples`` on the training split and on the ``edit.retain`` sets."""
    kw = dict(max_words=recipe.edit.max_answer_words, batch_size=recipe.evaluation.batch_size)
    samples, unsafe = make_samples(adapter, sets["train"], **kw)
    retain_q = [q for name in recipe.edit.retain for q in sets.get(RETAIN_SETS[name], [])]
    retain = make_samples(adapter, retain_q, benign_only=True, **kw)[0] if retain_q else []
    return samples, unsafe, retain


# ---------------------------------------------------------------------------------------------- stages
def checkpoint_dtypes(model_dir: Path, names: Sequence[str]) -> dict[str, torch.dtype]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if k in names:
                    out[k] = fh.get_slice(k).get_dtype()
    m = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    return {k: m.get(v, torch.float32) for k, v in out.items()}


def round_to_checkpoint(adapter: Adapter, weights: dict[str, torch.Tensor], model_dir: Path, layers, module) -> dict[str, torch.Tensor]:
    """Cast the edited weights to the checkpoint's dtype and load exactly those values into the model,
    so evaluation sees what the patch will hold."""
    dtypes = checkpoint_dtypes(model_dir, list(weights))
    out = {k: v.to(dtypes.get(k, v.dtype)) for k, v in weights.items()}
    with torch.no_grad():
        for layer in layers:
            name = adapter.parameter_name(layer, module)
            w = adapter.component(layer, module).weight
            w.copy_(out[name].to(w.dtype))
    return out


def evaluate_before(adapter: Adapter, sets: dict[str, list[Query]], recipe: Recipe, tag: str, cache: StageCache
                    ) -> tuple[dict[str, dict], list[Sample], dict[str, str], list[Sample]]:
    """The base model before any edit: its evaluation on every split, the training samples with its
    original answers (and the unsafe answers DINM reads), the retained samples (``edit.retain``).
    Reused from ``cache`` when the model, the queries and the generation settings are the same (the
    stored answers are judged again by the run's judge)."""
    ev, E = recipe.evaluation, recipe.edit
    names = [name for name in ev.sets if sets.get(name)]
    retain_q = [q for name in E.retain for q in sets.get(RETAIN_SETS[name], [])]
    if E.retain and not retain_q:
        raise ValueError(f"edit.retain: no training queries for {list(E.retain)} in the data")
    key = cache.key("before", cache.model_fingerprint(adapter), {n: queries_fingerprint(sets[n]) for n in names},
                    queries_fingerprint(sets["train"]), queries_fingerprint(retain_q), ev.max_new_tokens, ev.batch_size,
                    E.max_answer_words, recipe.model)
    stored = cache.load_json(key)
    if stored is None:
        before = evaluate_sets(adapter, sets, recipe, tag)
        answer = lambda qs: original_answers(adapter, qs, max_words=E.max_answer_words, batch_size=ev.batch_size)  # noqa: E731
        stored = {"responses": {n: [r["response"] for r in res["responses"]] for n, res in before.items()},
                  "train": answer(sets["train"]), "retain": answer(retain_q)}
        cache.save_json(key, stored)
    else:
        judge = make_judge(recipe.judge)
        before = {n: score(sets[n], stored["responses"][n], judge) for n in names}
    kw = dict(max_words=E.max_answer_words, batch_size=ev.batch_size)
    samples, unsafe = make_samples(adapter, sets["train"], answers=stored["train"], **kw)
    retain = make_samples(adapter, retain_q, benign_only=True, answers=stored["retain"], **kw)[0] if retain_q else []
    return before, samples, unsafe, retain


def evaluate_sets(adapter: Adapter, sets: dict[str, list[Query]], recipe: Recipe, tag: str) -> dict[str, dict]:
    ev = recipe.evaluation
    judge = make_judge(recipe.judge)
    res = {}
    for name in ev.sets:
        qs = sets.get(name) or []
        if not qs:
            continue
        res[name] = evaluate(adapter, qs, judge=judge, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                             desc=f"eval {tag} {name}")
    return res


# ---------------------------------------------------------------------------------------------- main
def run_recipe(recipe: Recipe, out: Path, *, overwrite: bool = False, cache: bool | StageCache = True) -> Path:
    """Run a recipe end to end into ``out`` (atomic), once per seed (``recipe.run_seeds``). The model,
    patch and gates come from the first seed; the report has every seed and their mean and 95%
    interval. ``cache``: reuse the evaluation before the edit and the localization of earlier runs
    with the same inputs (``stage_cache``; False: compute everything). Returns ``out``."""
    out = Path(out)
    if REGISTRY[recipe.method].steers:  # checked before any work: its hooks have no patch format (nor serving)
        raise RecipeError(f"{recipe.source or '<recipe>'}: method: {recipe.method} steers generation and has no patch to "
                          f"write; run it beside another method (report.compare_methods)")
    stage_cache = cache if isinstance(cache, StageCache) else StageCache(enabled=cache)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        t0 = time.time()
        dump_recipe(recipe, tmp / "recipe.yaml")
        model_dir = resolve_model_path(recipe.model.path)
        placement = recipe.model.placement()
        if "device" in placement:
            placement["device"] = pick_device(placement["device"])
        adapter = load_adapter(model_dir, dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code,
                               **placement)
        check_layers(recipe, adapter.num_layers)
        check_placement(recipe, adapter)
        load_s = time.time() - t0
        seeds = recipe.run_seeds
        runs: dict[int, SeedRun] = {}
        progress = RunProgress(f"{recipe.name} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
        progress.plan({"write": COST["other"]})
        for k, seed in enumerate(seeds):
            # the layer search runs once, on the first seed; the other seeds reuse its layers
            runs[seed] = run_seed(adapter, recipe, model_dir, tmp, seed, first=k == 0,
                                  layers=None if k == 0 else runs[seeds[0]].layers, cache=stage_cache,
                                  progress=progress)
        main = runs[seeds[0]]
        layers, locs, timings = main.layers, main.locs, {"load": load_s, **main.timings}

        t = time.time()
        thr = recipe.localization.threshold
        top_k = recipe.localization.top_k
        gate_stats = {str(l): loc.stats(thr, top_k) for l, loc in locs.items() if l in layers}
        if REGISTRY[recipe.method].edits_weights:
            manifest = write_patch(tmp / "patch", main.main_weights, base_dir=model_dir,
                                   recipe_hash=recipe_hash(recipe), layers=layers, method=recipe.method,
                                   gate_stats=gate_stats, subjects=main.edit_subjects,
                                   extra={"recipe": recipe.name, "module": recipe.module,
                                          "refusal": recipe.edit.refusal})  # where serving stops an answer
            apply_patch(model_dir, tmp / "patch", tmp / "model")
        else:  # a guard in front of the unedited model: its patch holds the guard, no model copy
            manifest = write_guard_patch(tmp / "patch", main.main_guard, base_dir=model_dir,
                                         recipe_hash=recipe_hash(recipe), method=recipe.method,
                                         subjects=main.edit_subjects,
                                         extra={"recipe": recipe.name, "refusal": recipe.edit.refusal})
        if locs:  # (a guard as the method localizes nothing)
            save_file({f"layer{l}/{s}": M.contiguous() for l, loc in locs.items() for s, M in loc.gates.items()},
                      str(tmp / "gates.safetensors"), metadata={"threshold": str(thr)})
        timings["write"] = time.time() - t
        timings["total"] = time.time() - t0
        progress.done("write", timings["write"])
        progress.close()
        stage_times = {"load": load_s, **{k: v for k, v in progress.times.items()}, "total": timings["total"]}
        per_seed = {s: {"before": r.before, "methods": r.methods, "timings_s": r.timings} for s, r in runs.items()}
        others = [m for m in main.methods if m != recipe.method]
        report = {
            "recipe": recipe.to_dict(), "recipe_hash": recipe_hash(recipe), "patch_id": manifest["patch_id"],
            "model": str(recipe.model.path), "edit_subjects": main.edit_subjects, "layers": layers,
            "search": main.search, "seeds": list(seeds),
            "localization": {str(l): {"stats": loc.stats(thr, top_k), "strong_share": loc.strong_share(thr, top_k),
                                      "mean_steps": loc.steps.float().mean().item(),
                                      "share_per_dim": {s: M.tolist() for s, M in loc.gates.items()}}
                             for l, loc in locs.items()},
            "subject_gradient_share": main.gate_diag,
            "before": main.before, "methods": main.methods, "alpha_sweep": main.sweep,
            "aggregate": aggregate(per_seed),
            "paired": {f"{recipe.method} - {m}": paired_differences(per_seed, recipe.method, m) for m in ["base", *others]},
            "per_seed": {s: _slim(r) for s, r in per_seed.items()} if len(seeds) > 1 else {},
            "timings_s": timings, "stage_times_s": stage_times, "deviations": recipe_deviations(recipe),
            "cache": {"enabled": stage_cache.enabled, "root": str(stage_cache.root) if stage_cache.enabled else None,
                      "reused": stage_cache.hits},
        }
        write_report(tmp, report, plots=recipe.report.plots)
    logger.info(f"run written to {out} ({timings['total']:.0f}s)")
    return out


def _slim(run: dict) -> dict:
    """A seed's results without the individual responses (the first seed's are in the report)."""
    strip = lambda res: {s: {k: v for k, v in m.items() if k != "responses"} for s, m in res.items()}  # noqa: E731
    return {"before": strip(run["before"]), "timings_s": run["timings_s"],
            "methods": {m: {**{k: v for k, v in r.items() if k != "after"}, "after": strip(r["after"])}
                        for m, r in run["methods"].items()}}


def localizes(recipe: Recipe) -> bool:
    """Whether the run localizes its layers once, up front: the main method edits weights and a method of
    the run gates by the localization (neural_gate)."""
    return REGISTRY[recipe.method].edits_weights and any(REGISTRY[m].needs_gates for m in recipe.run_methods)


def plan_stages(recipe: Recipe, sets: dict[str, list[Query]], layers: list[int] | None) -> dict[str, float]:
    """Each stage of a seed and its estimated work (``progress.COST`` units), for the run's ETA."""
    E, L = recipe.edit, recipe.localization
    n_eval = sum(len(sets.get(name) or []) for name in recipe.evaluation.sets)
    n_train = len(sets.get("train", [])) + sum(len(sets.get(RETAIN_SETS[name], [])) for name in E.retain)
    images = len({(q.subject, q.image) for q in sets.get("train", [])})
    localize = images * L.steps * COST["localize sample-step"]
    edit = images * E.passes * E.steps * COST["edit image-step"]
    stages = {"data": COST["other"], "evaluate before": (n_eval + n_train) * COST["query"],
              "localize": localize * len(layers or (0,)) if localizes(recipe) else 0.0}
    for method in recipe.run_methods:
        if REGISTRY[method].edits_weights:
            stages[f"edit {method}"] = edit
        # a guard rescoring the base answers costs little; one that reads the model (privacy_probe) one
        # forward pass per query, no generation
        guard_cost = 0.3 if REGISTRY[method].guard_needs_model else 0.02
        stages[f"evaluate {method}"] = n_eval * COST["query"] * (1 if REGISTRY[method].edits_weights else guard_cost)
    return stages


@dataclass
class SeedRun:
    """One seed's pass (``run_seed``): the evaluation before and per method after, and what the run
    folder is written from (the first seed's layers, localizations, weights and subjects)."""

    before: dict[str, dict]                      # split -> the base model's evaluation
    methods: dict[str, dict]                     # method -> {"layers", "after", and its log / fields}
    layers: list[int]                            # the main method's layers
    search: dict                                 # the layer search's info (``LayerChoice.info``)
    locs: dict[int, LayerLocalization]           # layer -> localization (the gates)
    gate_diag: dict[str, dict]                   # layer -> ``subject_gradient_share``
    main_weights: dict[str, torch.Tensor] | None  # the main method's edited matrices (checkpoint dtype)
    main_guard: object | None                    # the main method's guard, when it edits no weights
    edit_subjects: list[str]
    sweep: dict                                  # alpha -> evaluation (``report.alpha_sweep``; first seed)
    timings: dict[str, float]                    # stage -> seconds


def run_seed(adapter: Adapter, recipe: Recipe, model_dir: Path, tmp: Path, seed: int, *, first: bool,
             layers: list[int] | None = None, cache: StageCache | None = None, progress: RunProgress | None = None
             ) -> SeedRun:
    """One pass of the benchmark: world (seeded), evaluation before, (layer search,) localization, each
    method from the same start, evaluation after. The edited matrices are restored after each method.
    ``progress``: the run's bar, planned here on the first seed for all of them."""
    timings = progress.clock() if progress is not None else StageClock()
    torch.manual_seed(seed)
    random.seed(seed)
    t = time.time()
    world_seed = recipe.data.world.seed + seed if recipe.data.world is not None else None
    data = build_sets(recipe, tmp, world_seed=world_seed, world_name="world" if first else f"world-seed{seed}")
    sets, edit_subjects = data.splits, data.edit_subjects
    if progress is not None and first:
        fixed = None if isinstance(recipe.layers, LayerSearch) else list(recipe.layers)
        stages = plan_stages(recipe, sets, fixed)
        if fixed is None:  # the search: every scanned layer localized, each candidate edited once
            scan = recipe.layers.scan[1] - recipe.layers.scan[0] + 1
            progress.plan({"layer search": stages["localize"] * scan + stages.get(f"edit {recipe.method}", 0.0)
                           * (2 * recipe.layers.window + 1) / max(1, recipe.edit.passes)})
        progress.plan(stages, times=len(recipe.run_seeds))
    timings["data"] = time.time() - t

    t = time.time()
    cache = cache if cache is not None else StageCache(enabled=False)
    before, samples, unsafe, retain = evaluate_before(adapter, sets, recipe, f"seed {seed} before", cache)
    timings["evaluate before"] = time.time() - t

    t = time.time()
    guard_only = not any(REGISTRY[m].edits_weights for m in (recipe.method, *recipe.report.compare_methods))
    if layers is None and not REGISTRY[recipe.method].edits_weights and (recipe.searches_layers or guard_only):
        choice = LayerChoice([], {"skipped": f"{recipe.method} edits no weights"})  # a guard: no layer to search
    elif layers is None:
        choice = choose_layers(adapter, samples, unsafe, recipe, recipe.method, sets, retain, cache)
    else:
        choice = LayerChoice(list(layers), {"layers_from_first_seed": list(layers)})
    layers, search, locs = choice.layers, choice.info, choice.locs
    timings["layer search"] = time.time() - t
    t = time.time()
    # localized once here when a method of the run gates by it (neural_gate); a guard as the main method
    # localizes nothing (a compared method that needs gates then localizes its own layers)
    need = [l for l in layers if l not in locs] if localizes(recipe) else []
    locs.update(localize_layers(adapter, samples, need, recipe, cache) if need else {})
    locs = {l: locs[l] for l in sorted(locs)}  # every layer of ``layers`` for an edit
    timings["localize"] = time.time() - t

    gate_diag = {str(l): subject_gradient_share(adapter, samples, l, module=recipe.module, refusal=recipe.edit.refusal,
                                                alpha=recipe.edit.alpha) for l in layers if l in locs}
    results: dict[str, dict] = {}
    main_weights = main_guard = None
    for method in recipe.run_methods:  # each from the same start: the edited matrices are restored after each
        t = time.time()
        entry = REGISTRY[method]
        if not entry.edits_weights:  # a guard in front of the unedited model: its answers, rescored behind it
            guard, fields = entry.guard(sets["train"], recipe.edit.refusal, adapter=adapter, sets=sets, recipe=recipe) \
                if entry.guard_needs_model else entry.guard(sets["train"], recipe.edit.refusal)
            ev = recipe.evaluation  # (a steering guard generates its blocked questions again)
            after = {name: rescore_with_guard(res, guard, make_judge(recipe.judge), adapter=adapter, batch_size=ev.batch_size,
                                              max_new_tokens=ev.max_new_tokens) for name, res in before.items()}
            results[method] = {"layers": [], "after": after, **fields}
            main_guard = guard if method == recipe.method else main_guard
            timings[f"evaluate {method}"] = time.time() - t
            continue
        m_layers = layers
        if entry.choose_layers is not None and isinstance(recipe.layers, LayerSearch) and method != recipe.method:
            m_layers = choose_layers(adapter, samples, unsafe, recipe, method, sets).layers
        gates = None
        if entry.needs_gates:  # the main run's localization, or the method's own layers localized now
            gates = gates_for({l: locs[l] for l in m_layers if l in locs}, recipe)
            if any(l not in locs for l in m_layers):
                gates = gates_for(localize_layers(adapter, samples, m_layers, recipe), recipe)
        backup = WeightBackup(adapter, m_layers, recipe.module)
        res = run_edit(adapter, samples, m_layers, method, gates, recipe, retain)
        weights = round_to_checkpoint(adapter, res.weights, model_dir, m_layers, recipe.module)
        timings[f"edit {method}"] = time.time() - t
        t = time.time()
        after = evaluate_sets(adapter, sets, recipe, f"seed {seed} after {method}")
        timings[f"evaluate {method}"] = time.time() - t
        results[method] = {"layers": m_layers, "after": after, "edit_log": res.log,
                           "delta_norm": {k: v.norm().item() for k, v in res.deltas.items()}}
        if method == recipe.method:
            main_weights = weights
        backup.restore()

    # alpha sweep (the main method at other alphas), on the validation split when the data has one
    # (a sweep read off the test split would invite tuning on it); first seed only
    sweep = {}
    sweep_split = "val" if sets.get("val") else "test"
    for alpha in (recipe.report.alpha_sweep or ()) if first else ():
        backup = WeightBackup(adapter, layers, recipe.module)
        r2 = replace(recipe, edit=replace(recipe.edit, alpha=alpha))
        gates = gates_for({l: locs[l] for l in layers}, r2) if REGISTRY[recipe.method].needs_gates else None
        res = run_edit(adapter, samples, layers, recipe.method, gates, r2, retain)
        round_to_checkpoint(adapter, res.weights, model_dir, layers, recipe.module)
        sweep[alpha] = evaluate(adapter, sets[sweep_split], judge=make_judge(r2.judge), batch_size=r2.evaluation.batch_size,
                                max_new_tokens=r2.evaluation.max_new_tokens, desc=f"alpha {alpha} ({sweep_split})")
        sweep[alpha]["split"] = sweep_split
        backup.restore()
    return SeedRun(before=before, methods=results, layers=list(layers), search=search, locs=locs, gate_diag=gate_diag,
                   main_weights=main_weights, main_guard=main_guard, edit_subjects=edit_subjects, sweep=sweep,
                   timings=timings)


def recipe_deviations(recipe: Recipe) -> list[str]:
    """Where the recipe departs from the paper's defaults (stated in the report)."""
    out = []
    for name, spec, default in (("edit", recipe.edit, EditSpec()), ("localization", recipe.localization, LocalizationSpec())):
        for k, v in spec.__dict__.items():
            dv = getattr(default, k)
            if v != dv:
                whose = "not in the paper; ngguard default" if k in getattr(spec, "NOT_IN_PAPER", ()) else "paper default"
                out.append(f"{name}.{k} = {v} ({whose} {dv})")
    return out + method_deviations(recipe)
