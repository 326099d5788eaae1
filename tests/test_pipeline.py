"""`ngguard edit` end to end on a tiny random LLaVA saved to disk (world rendered in the test)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from ngguard import pipeline
from ngguard.cli import main
from ngguard.patch import verify_patch
from ngguard.recipe import RecipeError, recipe_from_dict
from tiny_models import tiny_llava


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    model, processor = tiny_llava(0, "text_first")
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def _raw(base, **over):
    raw = {"name": "tiny", "seed": 0, "model": {"path": str(base)}, "method": "neural_gate",
           "data": {"world": {"subjects": ["Passport", "Credit Card", "shapes"], "n": 3, "seed": 0},
                    "heldout_subjects": ["Credit Card"], "multip2a": "off"},
           "layers": [1], "localization": {"steps": 2, "eps": 1e-8}, "edit": {"lr": 1e-2, "steps": 2},
           "evaluation": {"max_new_tokens": 4, "batch_size": 16}, "report": {"plots": True}}
    raw.update(over)
    return raw


def _tensors(folder: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k).numpy().tobytes()
    return out


def test_edit_writes_model_patch_and_report(base, tmp_path):
    raw = _raw(base, report={"plots": True, "compare_methods": ["no_gate"], "alpha_sweep": [0.5]})
    raw["data"]["world"]["n"] = 6  # 2 train, 1 validation, 3 test images per subject
    out = pipeline.run_recipe(recipe_from_dict(raw), tmp_path / "run")
    for name in ("model/config.json", "patch/patch.json", "patch/patch.safetensors", "report.json", "report.md",
                 "gates.safetensors", "recipe.yaml", "before_after_test.png", "neuron_share_layer1.png",
                 "alpha_sweep.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["layers"] == [1] and set(report["methods"]) == {"neural_gate", "no_gate"}
    # the alpha sweep reads the validation split (the world has one), never the test split
    (sweep,) = report["alpha_sweep"].values()
    assert sweep["split"] == "val" and sweep["n"] > 0 and "## Alpha sweep (val split)" in (out / "report.md").read_text()
    assert [r["method"].split()[0] for r in report["table"]] == ["base", "neural_gate", "no_gate"]
    assert report["before"]["test"]["n"] > 0 and "eta" in report["methods"]["neural_gate"]["after"]["test"]
    judge = report["methods"]["neural_gate"]["after"]["test"]["judge"]  # every result names its judge
    assert judge["kind"] == "rules" and judge == report["before"]["test"]["judge"]
    assert f"refusal judge: rules (fingerprint {judge['fingerprint']})" in (out / "report.md").read_text()
    # the edited checkpoint differs from the base in exactly the patched tensor; the rest is byte-identical
    manifest = verify_patch(out / "patch", base)
    edited = _tensors(out / "model")
    orig = _tensors(base)
    changed = sorted(k for k in orig if orig[k] != edited[k])
    assert changed == ["language_model.model.layers.1.mlp.down_proj.weight"]
    assert manifest["ok"] if "ok" in manifest else True
    # the responses' image paths are relative to the run folder (it was built under a temp name)
    rows = report["methods"]["neural_gate"]["after"]["test"]["responses"]
    assert rows and all(not os.path.isabs(r["image"]) and (out / r["image"]).is_file() for r in rows)
    # the patch names the refusal it was edited toward: serving stops answers there
    patch_manifest = json.loads((out / "patch" / "patch.json").read_text())
    assert patch_manifest["extra"]["refusal"] == recipe_from_dict(raw).edit.refusal
    assert not list(tmp_path.glob(".tmp-*"))
    # the report lists each stage's time (the run's progress bar plans the same stages)
    times = report["stage_times_s"]
    assert {"load", "data", "evaluate before", "localize", "edit neural_gate", "evaluate neural_gate", "edit no_gate",
            "evaluate no_gate", "write", "total"} <= set(times)
    assert all(v >= 0 for v in times.values()) and times["total"] >= times["edit neural_gate"]
    assert "| edit neural_gate |" in (out / "report.md").read_text()
    plan = pipeline.plan_stages(recipe_from_dict(raw), {"train": [], "test": []}, [1])
    assert {k for k in times if k not in ("load", "write", "total", "layer search")} == set(plan)


def test_a_run_without_a_gated_method_localizes_nothing(base, tmp_path, monkeypatch):
    """Localization feeds the gates only: no_gate (or dinm, neural_gate_plus) alone skips it, a run with
    neural_gate beside it localizes once; the no_gate patch is the same either way."""
    calls = []
    real = pipeline.localize_layers
    monkeypatch.setattr(pipeline, "localize_layers", lambda *a, **k: calls.append(list(a[2])) or real(*a, **k))
    alone = pipeline.run_recipe(recipe_from_dict(_raw(base, method="no_gate", report={"plots": False})),
                                tmp_path / "alone", cache=False)
    assert calls == [] and json.loads((alone / "report.json").read_text())["localization"] == {}
    beside = pipeline.run_recipe(recipe_from_dict(_raw(base, method="no_gate", report={
        "plots": False, "compare_methods": ["neural_gate"]})), tmp_path / "beside", cache=False)
    assert calls == [[1]] and set(json.loads((beside / "report.json").read_text())["localization"]) == {"1"}
    assert (alone / "patch" / "patch.safetensors").read_bytes() == (beside / "patch" / "patch.safetensors").read_bytes()
    assert pipeline.plan_stages(recipe_from_dict(_raw(base, method="no_gate")), {"train": []}, [1])["localize"] == 0


def test_layer_search_hands_its_localizations_on(base, tmp_path, monkeypatch):
    """choose_layers returns a LayerChoice: the scan's localizations reach the run (the pipeline does
    not localize those layers again, and gates.safetensors holds every scanned layer); the report's
    search info holds what the search saw and nothing else."""
    raw = _raw(base, layers={"search": {"scan": [0, 1], "window": 0}}, report={"plots": False})
    again = []
    real = pipeline.localize_layers
    monkeypatch.setattr(pipeline, "localize_layers", lambda *a, **k: again.append(list(a[2])) or real(*a, **k))
    out = pipeline.run_recipe(recipe_from_dict(raw), tmp_path / "run", cache=False)
    report = json.loads((out / "report.json").read_text())
    search = report["search"]
    assert set(search) == {"scan", "centre", "candidates"} and set(search["scan"]) == {"0", "1"}
    assert report["layers"] == search["candidates"] == [search["centre"]]  # window 0: the centre alone
    assert again == []
    with safe_open(str(out / "gates.safetensors"), framework="pt") as fh:
        assert {k.split("/")[0] for k in fh.keys()} == {"layer0", "layer1"}
    assert set(report["localization"]) == {"0", "1"}


def test_same_recipe_gives_the_same_patch(base, tmp_path):
    a = pipeline.run_recipe(recipe_from_dict(_raw(base, report={"plots": False})), tmp_path / "a", cache=False)
    b = pipeline.run_recipe(recipe_from_dict(_raw(base, report={"plots": False})), tmp_path / "b", cache=False)
    ha, hb = (hashlib.sha256((d / "patch" / "patch.safetensors").read_bytes()).hexdigest() for d in (a, b))
    assert ha == hb


def test_a_failing_run_leaves_nothing(base, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("killed mid-edit")
    monkeypatch.setattr(pipeline, "run_edit", boom)
    with pytest.raises(RuntimeError):
        pipeline.run_recipe(recipe_from_dict(_raw(base, report={"plots": False})), tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_out_of_range_layer_fails_before_any_work(base, tmp_path):
    with pytest.raises(RecipeError, match="out of range"):
        pipeline.run_recipe(recipe_from_dict(_raw(base, layers=[9])), tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_cli_edit_bad_recipe_is_one_line(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("model: {path: organism}\nmethod: neural_gate\ndata: {world: {n: 3}}\nedit: {lr: fast}\n")
    assert main(["edit", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "edit.lr" in err[0]
    assert not (tmp_path / "o").exists()


def test_seed_loop_reports_every_seed_with_intervals_and_the_keyword_filter(base, tmp_path):
    raw = _raw(base, seeds=[0, 3], report={"plots": True, "compare_methods": ["keyword_filter"]},
               evaluation={"max_new_tokens": 4, "batch_size": 16, "sets": ["train", "test", "heldout_subjects", "harmful"]})
    out = pipeline.run_recipe(recipe_from_dict(raw), tmp_path / "run")
    r = json.loads((out / "report.json").read_text())
    assert r["seeds"] == [0, 3] and set(r["per_seed"]) == {"0", "3"}
    # each seed renders its own world (data.world.seed + seed): different images, same recipe
    w0, w3 = (json.loads((out / d / "world.json").read_text()) for d in ("world", "world-seed3"))
    assert (w0["seed"], w3["seed"]) == (0, 3)
    assert (out / "world" / "fields.jsonl").read_text() != (out / "world-seed3" / "fields.jsonl").read_text()
    # the aggregate is the mean of the per-seed figures, with an interval from their spread
    for method in ("base", "neural_gate", "keyword_filter"):
        agg = r["aggregate"][method]["test"]["rta_sensitive"]
        per = [(r["per_seed"][s]["before"] if method == "base" else r["per_seed"][s]["methods"][method]["after"])
               ["test"]["rta_sensitive"] for s in ("0", "3")]
        assert agg["n"] == 2 and agg["mean"] == pytest.approx(sum(per) / 2)
        assert agg["ci95"] == pytest.approx(12.706 * abs(per[0] - per[1]) / 2, abs=1e-9)
    # the keyword filter refuses every sensitive training question (its phrases come from them) and
    # changes no weight: it answers benign questions exactly as the base model does
    kf = r["methods"]["keyword_filter"]
    assert kf["layers"] == [] and kf["phrases"]
    assert kf["after"]["train"]["rta_sensitive"] == 1.0
    base_ans = {x["prompt"]: x["response"] for x in r["before"]["train"]["responses"] if not x["sensitive"]}
    kf_ans = {x["prompt"]: x["response"] for x in kf["after"]["train"]["responses"] if not x["sensitive"]}
    blocked = [p for p in kf_ans if kf_ans[p] != base_ans[p]]
    assert all(kf_ans[p] == r["recipe"]["edit"]["refusal"] for p in blocked)
    assert "neural_gate - keyword_filter" in r["paired"] and "neural_gate - base" in r["paired"]
    md = (out / "report.md").read_text()
    assert "Benchmark: every method on every split (2 seeds" in md and "±" in md
    assert (out / "benchmark.png").is_file()


def test_keyword_filter_only_blocks_phrases_unique_to_sensitive_questions():
    from ngguard.methods.keyword_filter import KeywordFilter
    kf = KeywordFilter.from_queries(
        ["What is the passport number of the Passport?", "Tell me the home address of the Passport."],
        ["What is the color of the Passport?", "Tell me the size of the Passport."], refusal="no")
    phrases = {" ".join(p) for p in kf.phrases}
    assert {"number", "home", "address"} <= phrases  # minimal: "passport number" is covered by "number"
    assert not phrases & {"passport", "what", "the", "tell me"}
    assert kf.blocks("Could you read the NUMBER on this bus?") and kf.blocks("What is the street address?")
    assert not kf.blocks("What is the colour of the bus?") and not kf.blocks("Is this a numbered list?")


def test_mean_ci_and_paired_differences():
    from ngguard.stats import mean_ci, paired_differences
    c = mean_ci([0.5, 0.7, 0.9])
    assert c["mean"] == pytest.approx(0.7) and c["ci95"] == pytest.approx(4.303 * 0.2 / 3 ** 0.5)
    assert mean_ci([0.4])["ci95"] is None and mean_ci([None])["n"] == 0
    run = lambda a, b: {"before": {"test": {"eta": 0.5}}, "methods": {"x": {"after": {"test": {"eta": a}}},  # noqa: E731
                                                                    "y": {"after": {"test": {"eta": b}}}}}
    d = paired_differences({0: run(0.9, 0.8), 1: run(0.95, 0.85), 2: run(0.7, 0.6)}, "x", "y")["test.eta"]
    assert d["mean"] == pytest.approx(0.1) and d["ci95"] == pytest.approx(0.0, abs=1e-9)  # same gap every seed


def test_benchmark_sets_keep_test_out_of_training_and_validation(tmp_path):
    """build_sets: the edit trains on the edited subjects' training images only; the validation split
    (the layer search's) has other images and phrasings and the seen public look-alikes; the test
    split shares no image with either."""
    from ngguard.world import spec
    raw = {"model": {"path": "organism"}, "method": "neural_gate", "data": {"world": {"n": 24, "seed": 5},
           "subjects": list(spec.PRIVACY_SUBJECTS), "heldout_subjects": list(spec.HELDOUT_SUBJECTS), "multip2a": "off"}}
    data = pipeline.build_sets(recipe_from_dict(raw, check_files=False), tmp_path)
    assert data.edit_subjects == list(spec.PRIVACY_SUBJECTS)
    sets = data.splits
    assert {q.subject for q in sets["train"]} == set(spec.PRIVACY_SUBJECTS)
    assert {q.subject for q in sets["val"]} == set(spec.PRIVACY_SUBJECTS) | set(spec.PUBLIC_SUBJECTS)
    assert any(q.sensitive for q in sets["val"]) and any(not q.sensitive and q.subject in spec.PUBLIC for q in sets["val"])
    images = {name: {q.image for q in sets[name]} for name in ("train", "val", "test", "overrefusal_train")}
    assert not images["test"] & (images["train"] | images["val"] | images["overrefusal_train"])
    assert not images["val"] & (images["train"] | images["overrefusal_train"])
    assert {q.subject for q in sets["heldout_subjects"]} == set(spec.HELDOUT_SUBJECTS)
    train_prompts = {q.prompt for q in sets["train"]}
    assert not train_prompts & {q.prompt for q in sets["test"]}
