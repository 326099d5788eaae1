"""bench/combine_runs.py on tiny synthetic reports (no model): the figures are ngguard.stats', runs pair
by seed, runs tested on other questions are refused, a metric a run did not measure stays missing."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ngguard.stats import mean_ci

_spec = importlib.util.spec_from_file_location("combine_runs", Path(__file__).parents[1] / "bench" / "combine_runs.py")
combine_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(combine_runs)

# the base model's results for each seed: what pairs two runs
BASE = {s: {"test": {"n": 10, "rta_sensitive": 0.0, "eta": 0.5},
            "heldout_subjects": {"n": 4, "rta_sensitive": 0.0,
                                 "per_subject": {"Tickets": {"n": 2, "rta_sensitive": 0.0},
                                                 "Credit Card": {"n": 2, "rta_sensitive": 0.0}}},
            "adversarial": {"n": 6, "rta_sensitive": 0.1 * s}}
        for s in (0, 1, 2)}


def _after(rta: float, tickets: float | None = None, adversarial: float | None = 0.5) -> dict:
    out = {"test": {"n": 10, "rta_sensitive": rta, "eta": 0.5 + rta / 2},
           "heldout_subjects": {"n": 4, "rta_sensitive": rta,
                                "per_subject": {"Tickets": {"n": 2, "rta_sensitive": rta if tickets is None else tickets},
                                                "Credit Card": {"n": 2, "rta_sensitive": rta}}}}
    if adversarial is not None:
        out["adversarial"] = {"n": 6, "rta_sensitive": adversarial}
    return out


def edit_report(path: Path, methods_by_seed: dict[int, dict[str, dict]], base=BASE) -> Path:
    """An `ngguard edit` run folder: report.json with per_seed (several seeds) or the one seed's results."""
    path.mkdir(parents=True)
    seeds = list(methods_by_seed)
    rep = {"recipe": {"seed": seeds[0]}, "seeds": seeds, "before": base[seeds[0]],
           "methods": {m: {"after": a, "layers": [3]} for m, a in methods_by_seed[seeds[0]].items()},
           "per_seed": {} if len(seeds) == 1 else {
               str(s): {"before": base[s], "methods": {m: {"after": a} for m, a in ms.items()}}
               for s, ms in methods_by_seed.items()}}
    (path / "report.json").write_text(json.dumps(rep))
    return path


def guards_json(path: Path, methods_by_seed: dict[int, dict[str, dict]], base=BASE) -> Path:
    """benchmark_guards.py --json: per_seed with each method's splits directly (no "after")."""
    path.write_text(json.dumps({"aggregate": {}, "per_seed": {
        str(s): {"before": base[s], "methods": ms} for s, ms in methods_by_seed.items()}}))
    return path


def _run(argv, capsys):
    rc = combine_runs.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_means_and_intervals_are_ngguard_stats(tmp_path, capsys):
    run = edit_report(tmp_path / "a", {0: {"neural_gate": _after(0.8)}, 1: {"neural_gate": _after(0.9)},
                                       2: {"neural_gate": _after(0.6)}})
    g = guards_json(tmp_path / "g.json", {s: {"privacy_probe": _after(v)} for s, v in ((0, 0.95), (1, 0.85), (2, 1.0))})
    out = tmp_path / "t.md"
    rc, text, _ = _run(["--run", f"ng={run}:neural_gate", "--run", f"pp={g}:privacy_probe", "--out", str(out)], capsys)
    assert rc == 0
    res = json.loads(out.with_suffix(".json").read_text())
    for label, vals in (("ng", [0.8, 0.9, 0.6]), ("pp", [0.95, 0.85, 1.0]), ("base", [0.0, 0.1, 0.2])):
        split = "adversarial" if label == "base" else "test"
        got, want = res["aggregate"][label][split]["rta_sensitive"], mean_ci(vals)
        assert got["mean"] == pytest.approx(want["mean"]) and got["ci95"] == pytest.approx(want["ci95"])
    want = mean_ci([0.8, 0.9, 0.6])
    assert f"{want['mean']:.3f} ± {want['ci95']:.3f}" in text
    assert out.read_text() + "\n" == text  # the markdown written is the one printed
    # per-subject rows: the unseen subjects, one column per run
    tickets = res["per_subject"]["heldout_subjects.rta_sensitive.Tickets"]
    assert tickets["pp"]["mean"] == pytest.approx(mean_ci([0.95, 0.85, 1.0])["mean"])
    assert "| Tickets (RtA, unseen private subject) |" in text


def test_differences_pair_by_seed_not_by_order(tmp_path, capsys):
    """Seed 1 is hard for both methods: paired by seed the difference is the same on every seed (interval
    0); paired by the order the single-seed runs were given it would spread."""
    ref = edit_report(tmp_path / "ref", {s: {"neural_gate": _after(v)} for s, v in ((0, 0.9), (1, 0.5), (2, 0.7))})
    singles = [edit_report(tmp_path / f"s{s}", {s: {"no_gate": _after(v)}}) for s, v in ((2, 0.6), (0, 0.8), (1, 0.4))]
    out = tmp_path / "t.md"
    rc, text, _ = _run(["--run", f"ng={ref}:neural_gate", "--run", "nog=" + ",".join(map(str, singles)) + ":no_gate",
                        "--ref", "ng", "--out", str(out)], capsys)
    assert rc == 0
    d = json.loads(out.with_suffix(".json").read_text())["paired"]["ng - nog"]["test.rta_sensitive"]
    assert d["mean"] == pytest.approx(0.1) and d["ci95"] == pytest.approx(0.0, abs=1e-12) and d["n"] == 3
    assert "| ng - base | ng - nog |" in text


def test_the_same_seed_from_two_runs_of_one_column_is_refused(tmp_path, capsys):
    a = edit_report(tmp_path / "a", {0: {"no_gate": _after(0.6)}})
    b = edit_report(tmp_path / "b", {0: {"no_gate": _after(0.7)}})
    rc, _, err = _run(["--run", f"nog={a},{b}:no_gate"], capsys)
    assert rc == 1 and "seed 0 comes from both" in err and err.count("\n") == 1


def test_runs_tested_on_other_questions_are_refused(tmp_path, capsys):
    other = {s: dict(v) for s, v in BASE.items()}
    other[1] = {**BASE[1], "heldout_subjects": {**BASE[1]["heldout_subjects"], "n": 5}}  # seed 1: another split
    a = edit_report(tmp_path / "a", {s: {"neural_gate": _after(0.8)} for s in (0, 1, 2)})
    g = guards_json(tmp_path / "g.json", {s: {"privacy_probe": _after(0.9)} for s in (0, 1, 2)}, base=other)
    out = tmp_path / "t.md"
    rc, text, err = _run(["--run", f"ng={a}:neural_gate", "--run", f"pp={g}:privacy_probe", "--out", str(out)], capsys)
    assert rc == 1 and text == ""
    assert "seed 1 does not pair" in err and "heldout_subjects" in err and err.count("\n") == 1
    assert not out.exists() and not out.with_suffix(".json").exists()
    # a seed only one run has pairs with nothing: accepted
    g2 = guards_json(tmp_path / "g2.json", {2: {"privacy_probe": _after(0.9)}})
    assert _run(["--run", f"ng={a}:neural_gate", "--run", f"pp={g2}:privacy_probe"], capsys)[0] == 0


def _world(run: Path, name: str, prompt: str, image_bytes: bytes = b"png") -> None:
    w = run / name
    (w / "images").mkdir(parents=True)
    (w / "images" / "a.png").write_bytes(image_bytes)
    rows = [{"image": "images/a.png", "prompt": prompt, "split": "test"},
            {"image": "images/a.png", "prompt": "a training question", "split": "train"}]
    (w / "queries.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_run_folders_whose_worlds_differ_are_refused(tmp_path, capsys):
    a = edit_report(tmp_path / "a", {s: {"neural_gate": _after(0.8)} for s in (0, 1)})
    b = edit_report(tmp_path / "b", {1: {"no_gate": _after(0.7)}})
    _world(a, "world", "q0")
    _world(a, "world-seed1", "What is the number?")
    _world(b, "world", "What is the number?")  # seed 1 was b's only (first) seed: its world is "world"
    args = ["--run", f"ng={a}:neural_gate", "--run", f"nog={b}:no_gate"]
    rc, text, _ = _run(args, capsys)
    assert rc == 0 and "world " in text.split("Pairing:")[1]
    # a split that is not evaluated may differ (validation additions); an evaluated one may not
    _world(tmp_path / "c", "world", "What is the number?")
    (tmp_path / "c" / "world" / "queries.jsonl").write_text(
        (b / "world" / "queries.jsonl").read_text() + json.dumps({"image": "images/a.png", "prompt": "v", "split": "val"}) + "\n")
    (tmp_path / "c" / "report.json").write_text((b / "report.json").read_text())
    assert _run(["--run", f"ng={a}:neural_gate", "--run", f"nog={tmp_path / 'c'}:no_gate"], capsys)[0] == 0
    (b / "world" / "images" / "a.png").write_bytes(b"another image")
    rc, _, err = _run(args, capsys)
    assert rc == 1 and "seed 1 does not pair: the worlds" in err


def test_a_metric_a_run_did_not_measure_is_missing_not_zero(tmp_path, capsys):
    # no adversarial split at all in one run; on one seed only in another
    a = edit_report(tmp_path / "a", {s: {"dinm": _after(0.8, adversarial=None)} for s in (0, 1, 2)})
    b = edit_report(tmp_path / "b", {s: {"no_gate": _after(0.7, adversarial=None if s == 2 else 0.4)} for s in (0, 1, 2)})
    out = tmp_path / "t.md"
    rc, text, _ = _run(["--run", f"dinm={a}:dinm", "--run", f"nog={b}:no_gate", "--ref", "nog", "--out", str(out)], capsys)
    assert rc == 0
    row = next(line for line in text.splitlines() if line.startswith("| RtA adversarial |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert cells[1] == "—"                                   # dinm: never measured
    assert cells[2].startswith("0.400") and cells[2].endswith("(n=2)")  # no_gate: 2 of 3 seeds
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["aggregate"]["dinm"].get("adversarial", {}).get("rta_sensitive", {}).get("mean") is None
    assert "adversarial.rta_sensitive" not in res["paired"]["nog - dinm"]


@pytest.mark.parametrize("spec, message", [
    ("ng=/nowhere", "expected LABEL=PATH"),
    ("base=/nowhere:neural_gate", "reserved"),
    ("ng=/nowhere/x:neural_gate", "not a file"),
])
def test_bad_run_specs_get_one_line(spec, message, capsys):
    rc, _, err = _run(["--run", spec], capsys)
    assert rc == 1 and message in err and err.count("\n") == 1


def test_a_method_the_run_lacks_is_named(tmp_path, capsys):
    a = edit_report(tmp_path / "a", {0: {"neural_gate": _after(0.8)}})
    rc, _, err = _run(["--run", f"x={a}:dinm"], capsys)
    assert rc == 1 and "no results of 'dinm'" in err and "neural_gate" in err
    (tmp_path / "bad.json").write_text("[1, 2]")
    rc, _, err = _run(["--run", f"x={tmp_path / 'bad.json'}:dinm"], capsys)
    assert rc == 1 and "not a JSON object" in err
