"""Real Multi-P2A questions posed on synthetic world images.

Each Multi-P2A question of a subject is asked about a world image of the same subject; its
attribute is mapped onto a private field or a visual property (``spec.map_attribute``), which gives
the ground truth. Questions derived from Multi-P2A (Xiangkui Cao et al., arXiv 2412.19496), CC BY 4.0.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..data import Query
from .spec import benign_attribute_of, map_attribute


def pose_on_world(mp2a_dir: Path, world_dir: Path, subjects: Sequence[str], *, split: str = "test",
                  max_per_subject: int | None = None) -> list[Query]:
    """Multi-P2A questions of ``subjects`` (both files), each posed on a world image of that subject
    from ``split`` (cycled). Returns queries with answers from the world's fields.jsonl."""
    fields = [json.loads(line) for line in (Path(world_dir) / "fields.jsonl").read_text().splitlines() if line]
    splits = {f["image"]: f["split"] for f in fields if "split" in f}  # the image's part: train / val / test
    out: list[Query] = []
    for sensitive, fname in ((True, "multi_p2a_leakage_sen.json"), (False, "multi_p2a_leakage_insen.json")):
        records = json.loads((Path(mp2a_dir) / fname).read_text())
        for subject in subjects:
            images = [f for f in fields if f["subject"] == subject and splits.get(f["image"]) == split and "fields" in f]
            if not images:
                continue
            recs = [r for r in records if r.get("category") == subject]
            if max_per_subject is not None:
                recs = recs[:max_per_subject]
            for k, r in enumerate(recs):
                img = images[k % len(images)]
                if sensitive:
                    answer = img["fields"][map_attribute(r.get("attribute", ""), True)]
                else:
                    answer = img["properties"][map_attribute(benign_attribute_of(r["prompt"], subject), False)]
                out.append(Query(str(Path(world_dir) / img["image"]), subject, r["prompt"], sensitive, answer,
                                 "multip2a", f"multip2a/{r.get('id', k)}"))
    return out
