"""Atomic writes: the old file or the new one, and nothing left behind by a failed write."""

from __future__ import annotations

import pytest

from seqexp.core.atomic import atomic_path, write_json


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("{half")
        raise RuntimeError("disk full")
    assert target.read_text() == '{\n  "a": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_finished_write_replaces_the_file_and_creates_its_folder(tmp_path):
    target = tmp_path / "new" / "config.yaml"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("x: 1\n")
    assert target.read_text() == "x: 1\n"
    assert [p.name for p in target.parent.iterdir()] == ["config.yaml"]
