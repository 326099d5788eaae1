"""ngguard.atomic's single-file writes and its one manifest reader (``Manifest.read``); the atomic
folders and the sweep of stale temp folders are tested in test_hostile_cli.py."""
from __future__ import annotations

import json
import os

import pytest

from ngguard.atomic import Manifest, atomic_file, atomic_write_text


def _plain_mode() -> int:
    """The mode a plain ``open`` gives a new file (0666 minus the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def test_atomic_write_text_replaces_the_file_whole_with_a_plain_files_mode(tmp_path):
    target = tmp_path / "sub" / "out.json"
    assert atomic_write_text(target, "first\n") == target  # the folder is created
    atomic_write_text(target, "second ✓\n")
    assert target.read_text(encoding="utf-8") == "second ✓\n"
    assert target.stat().st_mode & 0o777 == _plain_mode()  # not mkstemp's 0600
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]  # no temp file left


def test_atomic_file_leaves_the_old_file_and_no_temp_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_file(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-weights.bin-")
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


class _Err(ValueError):
    pass


def _spec(**kw) -> Manifest:
    return Manifest("thing.json", "thing", "ngguard-thing", 2, required=("id",), error=_Err, **kw)


def _write(folder, obj) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "thing.json").write_text(json.dumps(obj))


def test_manifest_read_checks_format_version_required_keys_and_the_kinds_own_check(tmp_path):
    good = {"format": "ngguard-thing", "format_version": 2, "id": "x"}
    _write(tmp_path / "ok", good)
    assert _spec().read(tmp_path / "ok") == good

    cases = [
        ("missing", None, r"missing: thing folder not found"),
        ("empty", "nothing", r"empty: not a thing folder \(no thing.json; make one\)"),
        ("notjson", "{", r"thing.json: unreadable manifest"),
        ("other", {"format": "other", "format_version": 2, "id": "x"}, r"not an ngguard thing manifest"),
        ("v1", {"format": "ngguard-thing", "format_version": 1, "id": "x"},
         r"unsupported thing format version 1 \(this ngguard reads 2\)"),
        ("noid", {"format": "ngguard-thing", "format_version": 2}, r"manifest lacks 'id'"),
    ]
    for name, content, message in cases:
        folder = tmp_path / name
        if content == "nothing":
            folder.mkdir()
        elif content == "{":
            folder.mkdir()
            (folder / "thing.json").write_text("{")
        elif content is not None:
            _write(folder, content)
        with pytest.raises(_Err, match=message):
            _spec(hint="; make one").read(folder)

    with pytest.raises(_Err, match=r"too large"):
        _spec(max_bytes=10).read(tmp_path / "ok")

    def check(m, path):
        if m["id"] != "y":
            raise _Err(f"{path}: id must be y")

    with pytest.raises(_Err, match=r"ok/thing.json: id must be y"):
        _spec(check=check).read(tmp_path / "ok")
