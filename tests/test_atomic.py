"""dynlab.atomic: a file is replaced whole or not at all."""

from __future__ import annotations

import os

import pytest

from dynlab.atomic import replace_atomically, write_bytes_atomically, write_text_atomically


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


def test_bytes_are_replaced_whole_and_a_failure_leaves_the_target_and_no_temporary(tmp_path):
    """write_bytes_atomically (the store's chunk files): the bytes land under the name, no
    temporary stays; a replacement that fails (the target is a folder) leaves the target as
    it was and removes its temporary; a missing folder is an error, not created."""
    path = tmp_path / "c" / "0"
    path.parent.mkdir()
    write_bytes_atomically(path, b"old")
    write_bytes_atomically(str(path), b"\x00new")
    assert path.read_bytes() == b"\x00new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["0"]
    (tmp_path / "c" / "d").mkdir()
    (tmp_path / "c" / "d" / "x").write_text("kept")
    with pytest.raises(OSError):
        write_bytes_atomically(tmp_path / "c" / "d", b"new")
    assert (tmp_path / "c" / "d" / "x").read_text() == "kept"
    assert sorted(p.name for p in path.parent.iterdir()) == ["0", "d"]
    with pytest.raises(FileNotFoundError):
        write_bytes_atomically(tmp_path / "nowhere" / "0", b"x")
    assert not (tmp_path / "nowhere").exists()
