"""dynlab.atomic: a file is replaced whole or not at all."""

from __future__ import annotations

import os

import pytest

from dynlab.atomic import replace_atomically, write_text_atomically


def test_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    write_text_atomically(path, '{"new": 1}')
    assert path.read_text() == '{"new": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failing_writer_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    seen = []

    def half_then_fail(tmp):
        tmp.write_text("half")
        seen.append(tmp)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(path, half_then_fail, tmp_name="x.partial")
    assert path.read_text() == "old"
    assert seen == [tmp_path / "x.partial"] and not seen[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_default_temporary_is_a_hidden_sibling_named_by_process(tmp_path):
    names = []
    replace_atomically(tmp_path / "f.txt", lambda tmp: (names.append(tmp.name),
                                                        tmp.write_text("x")))
    assert names == [f".f.txt.tmp-{os.getpid()}"]
    assert (tmp_path / "f.txt").read_text() == "x"
