"""State files are replaced whole or not at all (ledger, evaluation split, warm-up settings)."""

import os

import pytest

from fedtl.files import write_atomically


def test_a_write_replaces_the_file_and_creates_its_folder(tmp_path):
    target = tmp_path / "state" / "f.json"
    write_atomically(target, b"one")
    write_atomically(target, b"two")
    assert target.read_bytes() == b"two" and os.listdir(target.parent) == ["f.json"]


def test_a_failed_write_leaves_the_old_content_and_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    write_atomically(target, b"old")

    def disk_full(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.json"]
