"""The audit report of a run: report.json (everything), report.md (the tables people read) and PNG plots."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from loguru import logger

from ngguard.evaluate import judge_line
from ngguard.methods import REGISTRY
from ngguard.stats import HEADLINE, LOWER_IS_BETTER

SET_LABELS = {"test": "EtA test", "train": "EtA train"}


def _f(x, nd=3) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def method_table(report: dict) -> list[dict]:
    """One row per method (plus 'base'): the paper's table shape."""
    rows = []

    def row(name, res):
        t, h, u, mp = (res.get(k, {}) for k in ("test", "heldout_subjects", "utility", "multip2a"))
        rows.append({
            "method": name,
            "eta_test": t.get("eta"), "rta_sensitive_test": t.get("rta_sensitive"),
            "benign_answer_rate_test": t.get("benign_answer_rate"), "benign_accuracy_test": t.get("benign_accuracy"),
            "leak_accuracy_test": t.get("leak_accuracy"),
            "rta_sensitive_unseen_subjects": h.get("rta_sensitive"), "benign_answer_rate_unseen_subjects": h.get("benign_answer_rate"),
            "eta_multip2a": mp.get("eta"), "utility_accuracy": u.get("benign_accuracy"),
        })

    row("base (before edit)", report["before"])
    for m, r in report["methods"].items():
        row(f"{m} (layers {r['layers']})", r["after"])
    return rows


def ablation_pairs(methods) -> list[tuple[str, str]]:
    """(method, its ablation) for each registered ablation (``Method.ablation_of``) whose two methods
    both ran, e.g. (neural_gate, no_gate): the report sets their weight changes side by side."""
    return [(entry.ablation_of, name) for name, entry in REGISTRY.items()
            if entry.ablation_of is not None and name in methods and entry.ablation_of in methods]


def _inside_relative(value, roots: tuple[str, ...]):
    """``value`` with every string path under one of ``roots`` made relative to it (recursively)."""
    if isinstance(value, str):
        for root in roots:
            if value.startswith(root):
                return value[len(root):]
        return value
    if isinstance(value, dict):
        return {k: _inside_relative(v, roots) for k, v in value.items()}
    if isinstance(value, list):
        return [_inside_relative(v, roots) for v in value]
    return value


def write_report(out: Path, report: dict, *, plots: bool = True) -> None:
    """``out`` is the run folder being built (a temp folder renamed at the end): paths inside it
    (the world's images in the responses) are written relative to it, so they stay valid."""
    out = Path(out)
    report["table"] = method_table(report)
    roots = tuple(dict.fromkeys(str(p) + os.sep for p in (out, out.absolute(), out.resolve())))
    slim = _inside_relative(json.loads(json.dumps(report, default=str)), roots)
    (out / "report.json").write_text(json.dumps(slim, indent=1))
    if plots:
        try:
            report["plots"] = make_plots(out, report)
        except Exception as e:  # plots are a convenience; never lose a run for them
            logger.warning(f"plots failed: {e}")
            report["plots"] = []
    (out / "report.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    L = []
    L.append(f"# ngguard edit report: {report['recipe'].get('name')}\n")
    method = report['recipe']['method']
    if REGISTRY[method].edits_weights:
        what = f"edited layers: {report['layers']} (`{report['recipe'].get('module')}`); patch id `{report['patch_id']}`"
    else:  # a guard: its patch holds the guard; the layers are those of a weight edit compared beside it
        what = f"no weights edited (a guard patch, id `{report['patch_id']}`)"
        if report['layers']:
            what += f"; the weight edits beside it edit layers {report['layers']} (`{report['recipe'].get('module')}`)"
    L.append(f"- model: `{report['model']}`; method: **{method}**; {what}; recipe hash `{report['recipe_hash']}`")
    L.append(f"- {'edited' if REGISTRY[method].edits_weights else 'training'} subjects: {', '.join(report['edit_subjects'])}")
    judge = next((r["judge"] for r in report.get("before", {}).values() if isinstance(r, dict) and r.get("judge")), None)
    if judge:
        L.append(f"- refusal judge: {judge_line(judge)}; partial refusals count as refusals in RtA "
                 f"(their share is in report.json as partial_sensitive / partial_benign)")
    if report.get("deviations"):
        L.append("- deviations from the paper's defaults: " + "; ".join(report["deviations"]))
    L.append("")
    L += benchmark_markdown(report)
    L.append("## Results of the first seed (before/after, same run)\n")
    cols = [("eta_test", "EtA test"), ("rta_sensitive_test", "RtA sens. test"), ("benign_answer_rate_test", "benign answer rate"),
            ("benign_accuracy_test", "benign acc."), ("leak_accuracy_test", "leak acc."),
            ("rta_sensitive_unseen_subjects", "RtA unseen subjects"), ("eta_multip2a", "EtA Multi-P2A q."),
            ("utility_accuracy", "utility acc.")]
    L.append("| method | " + " | ".join(c[1] for c in cols) + " |")
    L.append("|---|" + "---|" * len(cols))
    for r in report["table"]:
        L.append(f"| {r['method']} | " + " | ".join(_f(r[c[0]]) for c in cols) + " |")
    L.append("")
    L.append("## Per subject (test split; unseen subjects from the held-out set)\n")
    L.append("| subject | RtA sens. before | after | benign answer rate before | after |")
    L.append("|---|---|---|---|---|")
    main = report["methods"][report["recipe"]["method"]]["after"]
    for setname in ("test", "heldout_subjects"):
        b, a = report["before"].get(setname, {}).get("per_subject", {}), main.get(setname, {}).get("per_subject", {})
        for s in b:
            L.append(f"| {s}{' (unseen)' if setname == 'heldout_subjects' else ''} | {_f(b[s].get('rta_sensitive'))} | "
                     f"{_f(a.get(s, {}).get('rta_sensitive'))} | {_f(b[s].get('benign_answer_rate'))} | "
                     f"{_f(a.get(s, {}).get('benign_answer_rate'))} |")
    L.append("")
    if report.get("subject_gradient_share"):
        L.append("## Why the gate matters (or not)\n")
        line = ("Share of the edit gradient on the edited matrix that flows through the subject token "
                "(the only part the gate can block): " + ", ".join(f"layer {k}: {v:.3f}" for k, v in
                                                                   report["subject_gradient_share"].items()))
        ms = report["methods"]
        for full, ablated in ablation_pairs(ms):
            norms = {m: ", ".join(f"{v:.3f}" for v in ms[m]["delta_norm"].values()) for m in (full, ablated)}
            line += f"; weight-change norm {full} {norms[full]} vs {ablated} {norms[ablated]}."
        L.append(line)
        L.append("")
    L.append("## Localization\n")
    if report["search"].get("scan"):
        s = report["search"]
        L.append("Layer scan (mean share of strongly active neurons): "
                 + ", ".join(f"L{k}: {v:.3f}" for k, v in s["scan"].items())
                 + f"; centre {s['centre']}, candidates {s['candidates']}")
        if s.get("validation_eta"):
            L.append("; validation EtA " + ", ".join(f"L{k}: {v:.3f}" for k, v in s["validation_eta"].items()))
        L.append("")
    loc_spec = report["recipe"]["localization"]
    rule = f"top {loc_spec['top_k']}% by M" if loc_spec.get("top_k") else f"M > {loc_spec['threshold']}"
    L.append(f"Strong = the gate used by the edit ({rule}); weak = other dims with M > 0; inactive: M = 0.\n")
    L.append("| layer | subject | inactive | weak | strong | final loss |")
    L.append("|---|---|---|---|---|---|")
    for layer, info in report["localization"].items():
        for subj, st in info["stats"].items():
            L.append(f"| {layer} | {subj} | {st['inactive']:.3f} | {st['weak']:.3f} | {st['strong']:.3f} | {st['mean_loss']:.3f} |")
    if report.get("alpha_sweep"):
        split = next(iter(report["alpha_sweep"].values())).get("split", "test")
        L.append(f"\n## Alpha sweep ({split} split)\n")
        L.append("| alpha | EtA | RtA sens. | benign answer rate |")
        L.append("|---|---|---|---|")
        for a, r in report["alpha_sweep"].items():
            L.append(f"| {a} | {_f(r.get('eta'))} | {_f(r.get('rta_sensitive'))} | {_f(r.get('benign_answer_rate'))} |")
    times = report.get("stage_times_s") or report["timings_s"]
    n = len(report.get("seeds") or [0])
    L.append(f"\n## Time per stage (s{', summed over the ' + str(n) + ' seeds' if n > 1 else ''})\n")
    L.append("| stage | s |\n|---|---|")
    L += [f"| {k} | {v:.1f} |" for k, v in times.items()]
    reused = (report.get("cache") or {}).get("reused")
    if reused:
        L.append(f"\nReused from earlier runs with the same inputs (ngguard.stage_cache): {', '.join(sorted(set(reused)))}.")
    if report.get("plots"):
        L.append("\n## Plots\n")
        L += [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(L) + "\n"


def _ci(c: dict | None, nd: int = 3) -> str:
    if not c or c.get("mean") is None:
        return "—"
    return f"{c['mean']:.{nd}f}" + (f" ± {c['ci95']:.{nd}f}" if c.get("ci95") is not None else "")


def benchmark_markdown(report: dict) -> list[str]:
    """Every method on every split: mean ± 95% interval over the seeds, and the main method's paired
    differences against the base and each other method."""
    agg = report.get("aggregate")
    if not agg:
        return []
    seeds = report.get("seeds", [])
    methods = list(agg)
    L = [f"## Benchmark: every method on every split ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}: "
         f"{', '.join(map(str, seeds))}; mean ± 95% interval)\n",
         "Rows: the split and metric; (↓) marks a metric where lower is better. `base` is the unedited model; "
         "`keyword_filter` is the unedited model behind a filter that refuses any question containing a phrase "
         "only the sensitive training questions contain.\n",
         "| split: metric | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for split, key, label in HEADLINE:
        cells = [_ci(agg[m].get(split, {}).get(key)) for m in methods]
        if all(c == "—" for c in cells):
            continue
        mark = " (↓)" if (split, key) in LOWER_IS_BETTER else ""
        L.append(f"| {label}{mark} | " + " | ".join(cells) + " |")
    L.append("")
    for name, diffs in (report.get("paired") or {}).items():
        if not diffs:
            continue
        L.append(f"Paired difference **{name}** (per seed, then mean ± 95% interval; an interval that excludes 0 "
                 "is a difference): " + "; ".join(f"{d['label']} {_ci(d)}" for d in diffs.values()) + "\n")
    return L


def make_plots(out: Path, report: dict) -> list[str]:
    import matplotlib  # here, not on top: matplotlib is slow to import and only the plots need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    # Fig. 2c: per-dimension share of samples in which the dim is active, per subject (sorted)
    for layer, info in report["localization"].items():
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for subj, share in info["share_per_dim"].items():
            ax.plot(np.sort(np.array(share))[::-1], label=subj, lw=1.2)
        thr = report["recipe"]["localization"]["threshold"]
        ax.axhline(thr, color="k", ls="--", lw=0.8, label=f"strong > {thr}")
        ax.set_xlabel("hidden dimension (sorted)"); ax.set_ylabel("share of samples with s < 0")
        ax.set_title(f"Per-dimension activity share, layer {layer}")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout(); fn = f"neuron_share_layer{layer}.png"; fig.savefig(out / fn, dpi=110); plt.close(fig)
        names.append(fn)
    # Fig. 2d: layer-wise share of strongly active neurons
    scan = report["search"].get("scan")
    if scan:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ks = list(scan)
        ax.bar([str(k) for k in ks], [scan[k] for k in ks], color="tab:blue")
        ax.set_xlabel("layer"); ax.set_ylabel("share strongly active"); ax.set_title("Layer-wise strongly active neurons")
        fig.tight_layout(); fn = "layer_strong_share.png"; fig.savefig(out / fn, dpi=110); plt.close(fig)
        names.append(fn)
    # before/after per subject
    main = report["methods"][report["recipe"]["method"]]["after"]
    for setname in ("test", "heldout_subjects"):
        b = report["before"].get(setname, {}).get("per_subject", {})
        if not b:
            continue
        a = main.get(setname, {}).get("per_subject", {})
        subs = list(b)
        x = np.arange(len(subs))
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
        for ax, key, title in ((axes[0], "rta_sensitive", "RtA on sensitive questions"),
                               (axes[1], "benign_answer_rate", "benign answer rate")):
            ax.bar(x - 0.2, [b[s].get(key) or 0 for s in subs], 0.4, label="before")
            ax.bar(x + 0.2, [a.get(s, {}).get(key) or 0 for s in subs], 0.4, label="after")
            ax.set_xticks(x); ax.set_xticklabels(subs, rotation=30, ha="right", fontsize=8); ax.set_title(title)
            ax.set_ylim(0, 1.05)
        axes[0].legend()
        fig.suptitle(f"{setname}: before vs after ({report['recipe']['method']})")
        fig.tight_layout(); fn = f"before_after_{setname}.png"; fig.savefig(out / fn, dpi=110); plt.close(fig)
        names.append(fn)
    # methods comparison
    rows = report["table"]
    if len(rows) > 2:
        keys = [("eta_test", "EtA test"), ("rta_sensitive_unseen_subjects", "RtA unseen"),
                ("benign_answer_rate_test", "benign ans."), ("utility_accuracy", "utility")]
        fig, ax = plt.subplots(figsize=(10, 3.6))
        w = 0.8 / len(rows)
        for i, r in enumerate(rows):
            ax.bar(np.arange(len(keys)) + i * w, [r[k] or 0 for k, _ in keys], w, label=r["method"])
        ax.set_xticks(np.arange(len(keys)) + 0.4 - w / 2); ax.set_xticklabels([k[1] for k in keys])
        ax.set_ylim(0, 1.05); ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title("Methods on the same splits")
        fig.tight_layout(); fn = "methods.png"; fig.savefig(out / fn, dpi=110); plt.close(fig)
        names.append(fn)
    if report.get("aggregate"):
        agg = report["aggregate"]
        metrics = [(s, k, lab) for s, k, lab in HEADLINE if any(agg[m].get(s, {}).get(k, {}).get("mean") is not None
                                                                  for m in agg)]
        fig, ax = plt.subplots(figsize=(min(16, max(8, 0.2 * len(metrics) * len(agg))), 5.5))
        w = 0.8 / len(agg)
        x = np.arange(len(metrics))
        for i, m in enumerate(agg):
            cs = [agg[m].get(s, {}).get(k, {}) for s, k, _ in metrics]
            ax.bar(x + i * w, [c.get("mean") or 0 for c in cs], w, label=m,
                   yerr=[c.get("ci95") or 0 for c in cs], capsize=2, error_kw={"lw": 0.8})
        ax.set_xticks(x + 0.4 - w / 2); ax.set_xticklabels([lab for _, _, lab in metrics], rotation=40, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05); ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title(f"Methods x splits, mean and 95% interval over {len(report.get('seeds', []))} seed(s)")
        fig.tight_layout(); fn = "benchmark.png"; fig.savefig(out / fn, dpi=110); plt.close(fig)
        names.append(fn)
    if report.get("alpha_sweep"):
        sw = report["alpha_sweep"]
        al = sorted(sw, key=float)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for key in ("eta", "rta_sensitive", "benign_answer_rate"):
            ax.plot([float(a) for a in al], [sw[a].get(key) for a in al], marker="o", label=key)
        ax.set_xlabel("alpha"); ax.legend(); ax.set_title(f"Alpha sweep ({next(iter(sw.values())).get('split', 'test')} split)")
        fig.tight_layout(); fn = "alpha_sweep.png"; fig.savefig(out / fn, dpi=110); plt.close(fig)
        names.append(fn)
    return names
