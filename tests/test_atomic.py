"""dlm.atomic: whole-file replacement, per-writer temp names, no debris after a failed write."""

import json
import os
import socket

import pytest

from dlm.atomic import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text, temp_name


def test_temp_name_is_per_writer_and_matches_the_stale_temp_glob(tmp_path):
    final = tmp_path / "unit-00003.arrow"
    tmp = temp_name(final)
    assert tmp.name == f"unit-00003.arrow.tmp-{socket.gethostname()}-{os.getpid()}"
    tmp.touch()
    assert list(tmp_path.glob("unit-00003.*.tmp-*")) == [tmp]  # what tokenize_fineweb removes on restart


def test_writes_replace_the_whole_file(tmp_path):
    p = tmp_path / "f"
    atomic_write_bytes(p, b"x" * 1000)
    atomic_write_text(p, "héllo\n")
    assert p.read_bytes() == "héllo\n".encode()
    atomic_write_json(p, {"b": 1, "a": [1, 2]})
    assert p.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2, sort_keys=True) + "\n"
    assert os.listdir(tmp_path) == ["f"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "f"
    p.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(p, half_then_fail)
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["f"]


def test_write_fn_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "f", lambda tmp: None)
    assert not (tmp_path / "f").exists()
