"""Atomic outputs: a failure mid-write leaves the previous file intact, and files get the usual mode."""

from __future__ import annotations

import os
import stat

import pytest

from vitcnn.io import atomic_write, read_json, write_csv, write_json


def test_failure_while_writing_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "metrics" / "evaluate.json"
    write_json(path, {"acc": 0.5})
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as tmp:
            tmp.write_text('{"acc": 0.')  # half written
            raise KeyboardInterrupt
    assert read_json(path) == {"acc": 0.5}
    assert sorted(p.name for p in path.parent.iterdir()) == ["evaluate.json"]


def test_write_creates_parent_folders_and_replaces_the_file(tmp_path):
    path = tmp_path / "a" / "b" / "rows.csv"
    write_csv(path, ["actual", "predicted"], [["cat", "dog"]])
    write_csv(path, ["actual", "predicted"], [["cat", "cat"], ["dog", "dog"]])
    assert path.read_text().splitlines() == ["actual,predicted", "cat,cat", "dog,dog"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.csv"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_mode_of_a_normally_created_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "out.json", {})
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "out.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o666 & ~umask
