"""``ngguard judge score | validate``: re-judge saved responses, or check a judge against human labels."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import Subparsers, check_out_file, command_group, common, judge_option, read_json

# The handlers import the library inside themselves: `ngguard --help` stays fast, without torch (cli/__init__.py).


def add(sub: Subparsers) -> None:
    jsub = command_group(sub, "judge", "re-judge saved responses, check a judge against human labels, or train "
                         "the learned judge", ["score", "validate", "train"])
    s = jsub.add_parser("score", parents=[common()], help="re-judge the responses of an `ngguard eval` result",
                        description="Re-judges the saved responses of RESULT.json with another judge (no generation) "
                                    "and writes a result of the same shape.")
    s.add_argument("--responses", required=True, type=Path, help="a result JSON written by `ngguard eval`")
    judge_option(s)
    s.add_argument("--out", type=Path, default=None, help="result JSON to write (default: RESULT.rejudged.json)")
    s.add_argument("--device", default=None, help="torch device for a model judge (default: cuda if available)")
    s.set_defaults(func=score)
    v = jsub.add_parser("validate", parents=[common()], help="measure a judge against human labels",
                        description="Judges every (prompt, response) of a labels file and prints accuracy, precision, "
                                    "recall and F1 of refusal (full or partial) vs compliance, the three-way "
                                    "confusion matrix and per-group accuracy; writes the disagreements as JSONL.")
    v.add_argument("--labels", required=True, type=Path, help="a .csv or .jsonl file of prompt, response, label")
    judge_option(v)
    v.add_argument("--prompt-col", default="prompt", help="prompt column (default: prompt; optional if absent)")
    v.add_argument("--response-col", default="response", help="response column (default: response)")
    v.add_argument("--label-col", default="label", help="label column (default: label)")
    v.add_argument("--group-col", action="append", default=[], help="report accuracy per value of this column "
                                                                    "(repeatable)")
    v.add_argument("--label-map", default=None, metavar="V=LABEL,...",
                   help="file label values -> refusal|partial|compliance, e.g. refused=refusal,0=compliance "
                        "(refusal, partial, compliance are always known)")
    v.add_argument("--disagreements", type=Path, default=None,
                   help="JSONL of the rows where judge and label differ (default: LABELS.disagreements.jsonl in "
                        "the current folder)")
    v.add_argument("--json", type=Path, default=None, help="also write all figures as JSON here")
    v.add_argument("--device", default=None, help="torch device for a model judge (default: cuda if available)")
    v.add_argument("--cross", default=None, metavar="GROUP_COL",
                   help="leave one group out: for each value of GROUP_COL, train a learnable judge (learned) on "
                        "the other groups and test on that one; other judges are judged as is per group")
    v.set_defaults(func=validate)
    t = jsub.add_parser("train", parents=[common()], help="train the learned judge (judge: learned)",
                        description="Trains the learned judge on the labelled answers at hand: the shared XSTest "
                                    "answers (SHARED/data/xstest-dev), the project's labelled set without its "
                                    "held-out quarter, and the world's and organism's answers. The configuration "
                                    "is chosen by the cross-model figure (train on one XSTest set-up, test on the "
                                    "other). Deterministic. Writes safetensors weights (no pickle).")
    t.add_argument("--shared", type=Path, default=None,
                   help="the shared data folder (default: $NGGUARD_SHARED, else ../shared)")
    t.add_argument("--out", type=Path, default=None,
                   help="weights file to write (default: the bundled ngguard/judges/learned.safetensors)")
    t.add_argument("--no-select", action="store_true",
                   help="skip the cross-model choice and train the default configuration")
    t.set_defaults(func=train)


def score(args: argparse.Namespace) -> int:
    from ngguard.atomic import atomic_write_text
    from ngguard.evaluate import judge_line, summary_table
    from ngguard.judges import make_judge
    from ngguard.judges.validate import rescore

    out = args.out or args.responses.with_name(args.responses.stem + ".rejudged.json")
    check_out_file(out)  # before any work: never a device, FIFO or folder
    result = read_json(args.responses, "responses file")
    judge = make_judge(args.judge, device=args.device)
    new = rescore(result, judge, str(args.responses))
    atomic_write_text(out, json.dumps(new, indent=2, ensure_ascii=False) + "\n")
    print(summary_table(new))
    print(f"previous judge: {judge_line(new['previous_judge'])}; {new['n_changed']} of {new['n']} judgements changed")
    print(f"wrote {out}")
    return 0


def validate(args: argparse.Namespace) -> int:
    from ngguard.atomic import atomic_write_text
    from ngguard.judges import make_judge
    from ngguard.judges.validate import format_validation, parse_label_map, read_labels, write_disagreements
    from ngguard.judges.validate import validate as validate_judge

    dis = args.disagreements or Path(args.labels.stem + ".disagreements.jsonl")
    for out in (dis, args.json):
        if out is not None:
            check_out_file(out)
    rows = read_labels(args.labels, prompt_col=args.prompt_col or None, response_col=args.response_col,
                       label_col=args.label_col, group_cols=args.group_col, label_map=parse_label_map(args.label_map))
    judge = make_judge(args.judge, device=args.device)
    if args.cross is not None:
        from ngguard.judges.validate import cross_validate, format_cross

        if args.cross not in args.group_col:
            rows = read_labels(args.labels, prompt_col=args.prompt_col or None, response_col=args.response_col,
                               label_col=args.label_col, group_cols=[*args.group_col, args.cross],
                               label_map=parse_label_map(args.label_map))
        res = cross_validate(judge, rows, args.cross)
        print(format_cross(res))
        if args.json is not None:
            atomic_write_text(args.json, json.dumps(res, indent=2, ensure_ascii=False) + "\n")
            print(f"wrote {args.json}")
        return 0
    res = validate_judge(judge, rows)
    print(format_validation(res))
    write_disagreements(dis, res)
    print(f"wrote {dis}")
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(res, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}")
    return 0


def train(args: argparse.Namespace) -> int:
    from ngguard.judges.learned import BUNDLED, TrainConfig
    from ngguard.judges.training import cross_model, find_shared, select, train_final, training_sets

    out = args.out or BUNDLED
    check_out_file(out)
    shared = find_shared(args.shared)
    if shared is None:
        where = args.shared or "$NGGUARD_SHARED or ../shared"
        raise FileNotFoundError(f"{where}: no shared data folder with data/xstest-dev/completions.jsonl (training "
                                f"needs it; give --shared DIR)")
    sets = training_sets(shared)
    print("training data: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()) + f" (from {shared})")
    if args.no_select:
        config, cross = TrainConfig(), cross_model(sets, TrainConfig())
    else:
        config, table = select(sets)
        print("cross-model choice (train on one XSTest set-up + own + world, test on the other):")
        for row in table:
            c = row["config"]
            figs = "  ".join(f"{k} {m['accuracy']:.3f}" for k, m in row["cross"].items())
            print(f"  words {c.featurizer.max_words:>3} opening {c.featurizer.opening_words:>2} n-grams "
                  f"{c.featurizer.ngrams} l2 {c.l2:g}: {figs}  mean {row['mean_accuracy']:.3f}")
        cross = next(row["cross"] for row in table if row["config"] == config)
    for k, m in cross.items():
        print(f"chosen configuration, tested on {k}: accuracy {m['accuracy']:.3f} precision {m['precision']:.3f} "
              f"recall {m['recall']:.3f} partial recall {m['partial_recall']:.3f}")
    judge = train_final(sets, config, cross)
    out = judge.save(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, fingerprint {judge.fingerprint()})")
    return 0
