"""Check a refusal judge against human labels, and re-judge saved eval responses.

``read_labels`` reads a CSV or JSONL file of (prompt, response, label[, group...]) with
configurable column names and label values; ``validate`` runs a judge on it and returns accuracy,
precision, recall and F1 of "refusal" (= a full or partial refusal, as RtA counts it) against
"compliance", the exact three-way agreement, the confusion matrix, per-group accuracy and every
disagreement. ``rescore`` re-judges the responses of a saved ``ngguard eval`` result without
generating again. Bad files raise ``ValueError`` with one line naming the file and the problem.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping, Sequence

from ngguard.atomic import atomic_write_text
from ngguard.data import Query
from ngguard.evaluate import score
from ngguard.judges.base import LABELS, REFUSAL_LABELS, Judge
from ngguard.limits import DEFAULT_LIMITS, read_text_file

DEFAULT_LABEL_VALUES = {lab: lab for lab in LABELS}


@dataclass(frozen=True)
class Labelled:
    prompt: str | None
    response: str
    label: str
    groups: dict = field(default_factory=dict)
    line: int = 0


def parse_label_map(text: str | None) -> dict[str, str]:
    """``"refused=refusal,ok=compliance"`` -> mapping (file value -> judge label)."""
    out = dict(DEFAULT_LABEL_VALUES)
    if not text:
        return out
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--label-map: expected VALUE=LABEL pairs separated by commas, got {part!r}")
        value = value.strip()
        if value not in LABELS:
            raise ValueError(f"--label-map: {key.strip()!r} maps to {value!r}; labels are {', '.join(LABELS)}")
        out[key.strip().lower()] = value
    return out


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ValueError(f"{path}: expected a .csv or .jsonl labels file")
    try:  # a regular file within the data limit (InputError, one line, else)
        text = read_text_file(path, DEFAULT_LIMITS.max_data_bytes, what="labels file", encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: labels file not found") from None
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        columns = list(reader.fieldnames or [])
        rows = [dict(r, _line=i) for i, r in enumerate(reader, start=2)]
        return rows, columns
    rows, columns = [], []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: line {i}: expected a JSON object, got {type(rec).__name__}")
        columns += [k for k in rec if k not in columns]
        rows.append(dict(rec, _line=i))
    return rows, columns


def read_labels(path: str | Path, *, prompt_col: str | None = "prompt", response_col: str = "response",
                label_col: str = "label", group_cols: Sequence[str] = (),
                label_map: Mapping[str, str] | None = None) -> list[Labelled]:
    """Rows of a labels file. ``prompt_col=None`` (or a default 'prompt' column that is absent):
    no prompts. Label values are matched case-insensitively through ``label_map``."""
    path = Path(path)
    rows, columns = _read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no labelled rows")
    have = ", ".join(columns) or "none"
    for what, col in (("response", response_col), ("label", label_col), *(("group", g) for g in group_cols)):
        if col not in columns:
            raise ValueError(f"{path}: no {what} column {col!r} (columns: {have}); name it with --{what}-col")
    if prompt_col is not None and prompt_col not in columns:
        if prompt_col != "prompt":
            raise ValueError(f"{path}: no prompt column {prompt_col!r} (columns: {have}); name it with --prompt-col")
        prompt_col = None
    mapping = {k.lower(): v for k, v in (label_map or DEFAULT_LABEL_VALUES).items()}
    out = []
    for r in rows:
        raw = r.get(label_col)
        key = "" if raw is None else str(raw).strip().lower()
        if key not in mapping:
            known = ", ".join(sorted(mapping))
            raise ValueError(f"{path}: line {r['_line']}: unknown label {raw!r} in column {label_col!r} "
                             f"(known: {known}; map others with --label-map VALUE=refusal|partial|compliance)")
        resp = r.get(response_col)
        prompt = r.get(prompt_col) if prompt_col else None
        out.append(Labelled(None if prompt is None else str(prompt), "" if resp is None else str(resp), mapping[key],
                            {g: str(r.get(g)) for g in group_cols}, r["_line"]))
    return out


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def binary_metrics(gold: Sequence[bool], pred: Sequence[bool]) -> dict:
    """Accuracy, precision, recall, F1 of 'refusal' (True) against 'compliance' (False)."""
    tp = sum(g and p for g, p in zip(gold, pred))
    fp = sum(p and not g for g, p in zip(gold, pred))
    fn = sum(g and not p for g, p in zip(gold, pred))
    n = len(gold)
    prec, rec = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = None if prec is None or rec is None or prec + rec == 0 else 2 * prec * rec / (prec + rec)
    return {"n": n, "accuracy": _ratio(sum(g == p for g, p in zip(gold, pred)), n), "precision": prec,
            "recall": rec, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "tn": n - tp - fp - fn}


def _partial_recall(rows: Sequence[Labelled], pred_b: Sequence[bool], idx) -> float | None:
    """Share of the human-labelled partial refusals that the judge counts as a refusal."""
    hits = [pred_b[i] for i in idx if rows[i].label == "partial"]
    return _ratio(sum(hits), len(hits))


def validate(judge: Judge, rows: Sequence[Labelled]) -> dict:
    """Judge every row; metrics overall and per group, the confusion matrix, the disagreements."""
    prompts = [r.prompt for r in rows]
    preds = judge.labels([r.response for r in rows], None if all(p is None for p in prompts) else prompts)
    gold_b = [r.label in REFUSAL_LABELS for r in rows]
    pred_b = [p in REFUSAL_LABELS for p in preds]
    out = binary_metrics(gold_b, pred_b)
    out["partial_recall"] = _partial_recall(rows, pred_b, range(len(rows)))
    out["label_accuracy"] = _ratio(sum(r.label == p for r, p in zip(rows, preds)), len(rows))
    out["confusion"] = {g: {p: sum(r.label == g and q == p for r, q in zip(rows, preds)) for p in LABELS} for g in LABELS}
    groups: dict[str, dict] = {}
    for col in (rows[0].groups if rows else {}):
        values = sorted({r.groups[col] for r in rows})
        groups[col] = {}
        for v in values:
            idx = [i for i, r in enumerate(rows) if r.groups[col] == v]
            m = binary_metrics([gold_b[i] for i in idx], [pred_b[i] for i in idx])
            m["label_accuracy"] = _ratio(sum(rows[i].label == preds[i] for i in idx), len(idx))
            m["partial_recall"] = _partial_recall(rows, pred_b, idx)
            groups[col][v] = m
    out["groups"] = groups
    verdict = getattr(judge, "verdict", None)
    out["disagreements"] = [
        {"line": r.line, **r.groups, "label": r.label, "judged": p, "binary_agrees": (r.label in REFUSAL_LABELS)
         == (p in REFUSAL_LABELS), **({"rule": verdict(r.response, r.prompt).rule} if verdict else {}),
         "prompt": r.prompt, "response": r.response}
        for r, p in zip(rows, preds) if r.label != p]
    out["judge"] = judge.info()
    return out


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_validation(res: dict) -> str:
    L = [f"judge: {res['judge'].get('name')} (fingerprint {res['judge'].get('fingerprint')})",
         f"n={res['n']}  refusal (full or partial) vs compliance: accuracy {_f(res['accuracy'])}  precision "
         f"{_f(res['precision'])}  recall {_f(res['recall'])}  F1 {_f(res['f1'])}",
         f"partial refusals counted as refusals (partial recall): {_f(res.get('partial_recall'))}",
         f"three-way label agreement: {_f(res['label_accuracy'])}",
         "confusion (rows: human label, columns: judge):",
         f"{'':>12}" + "".join(f"{p:>12}" for p in LABELS)]
    L += [f"{g:>12}" + "".join(f"{res['confusion'][g][p]:>12}" for p in LABELS) for g in LABELS]
    for col, vals in res["groups"].items():
        L.append(f"per {col}:")
        w = max(len(v) for v in vals)
        for v, m in vals.items():
            L.append(f"  {v:<{w}}  n={m['n']:<4} accuracy {_f(m['accuracy'])}  precision {_f(m['precision'])}  "
                     f"recall {_f(m['recall'])}  partial recall {_f(m.get('partial_recall'))}  "
                     f"3-way {_f(m['label_accuracy'])}")
    n_bin = sum(not d["binary_agrees"] for d in res["disagreements"])
    L.append(f"disagreements: {len(res['disagreements'])} on the label, {n_bin} on refusal vs compliance")
    return "\n".join(L)


def cross_validate(judge: Judge, rows: Sequence[Labelled], group_col: str) -> dict:
    """Leave one group out: for each value of ``group_col``, a judge fitted on the other groups'
    rows, judged on that group's rows. A judge that can learn has ``refit(responses, labels) ->
    judge`` (the learned judge); any other judge (rules, model judges) is judged as is on every
    group, which is then its per-group figure (said by ``learnable: False``)."""
    if not rows or group_col not in rows[0].groups:
        raise ValueError(f"--cross {group_col}: not a group column of the labels (add --group-col {group_col})")
    values = sorted({r.groups[group_col] for r in rows})
    if len(values) < 2:
        raise ValueError(f"--cross {group_col}: needs at least two groups, the labels have {len(values)}")
    refit = getattr(judge, "refit", None)
    folds = {}
    for v in values:
        test = [r for r in rows if r.groups[group_col] == v]
        fitted = judge
        if refit is not None:
            train_rows = [r for r in rows if r.groups[group_col] != v]
            fitted = refit([r.response for r in train_rows], [r.label for r in train_rows])
        res = validate(fitted, test)
        folds[v] = {k: res[k] for k in ("n", "accuracy", "precision", "recall", "f1", "partial_recall",
                                        "label_accuracy", "confusion")}
    return {"group_col": group_col, "learnable": refit is not None, "judge": judge.info(), "folds": folds}


def format_cross(res: dict) -> str:
    how = ("trained on the other groups, tested on the one left out" if res["learnable"]
           else "not learnable: judged as is on each group")
    L = [f"leave one {res['group_col']} out ({how}); judge {res['judge'].get('name')} "
         f"(fingerprint {res['judge'].get('fingerprint')}):"]
    w = max(len(v) for v in res["folds"])
    for v, m in res["folds"].items():
        L.append(f"  {v:<{w}}  n={m['n']:<4} accuracy {_f(m['accuracy'])}  precision {_f(m['precision'])}  "
                 f"recall {_f(m['recall'])}  partial recall {_f(m['partial_recall'])}  3-way {_f(m['label_accuracy'])}")
    return "\n".join(L)


def write_disagreements(path: str | Path, res: dict) -> Path:
    text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in res["disagreements"])
    return atomic_write_text(Path(path), text)


def rescore(result: Mapping, judge: Judge, source: str = "<result>") -> dict:
    """Re-judge the responses of an ``ngguard eval`` result with ``judge`` (no generation)."""
    rows = result.get("responses") if isinstance(result, Mapping) else None
    if not isinstance(rows, list):
        raise ValueError(f"{source}: not an ngguard eval result (no 'responses' list)")
    names = [f.name for f in fields(Query)]
    queries, responses = [], []
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping) or "response" not in r:
            raise ValueError(f"{source}: responses[{i}]: expected an object with a 'response'")
        try:
            queries.append(Query(**{k: r[k] for k in names if k in r}))
        except TypeError as e:
            raise ValueError(f"{source}: responses[{i}]: {e}") from None
        responses.append(r["response"])
    new = score(queries, responses, judge)
    old = [r.get("judgement", "refusal" if r.get("refusal") else "compliance") for r in rows]
    changed = sum(a != b["judgement"] for a, b in zip(old, new["responses"]))
    meta = {k: v for k, v in result.items() if k not in new and k not in ("responses", "per_subject")}
    return {**meta, **{k: v for k, v in new.items() if k != "responses"}, "rejudged_from": source,
            "previous_judge": result.get("judge", {"kind": "rules", "name": "rules (before judges were recorded)"}),
            "n_changed": changed, "responses": new["responses"]}
