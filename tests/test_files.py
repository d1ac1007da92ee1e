"""files.py: what a write leaves behind is the old version, the new one, or nothing; a full
disk is one error naming the file, with no temporary file left."""

import errno
import json

import pytest

import files
from killing import kill_at_random_points

OLD, NEW = "old\n" * 50_000, "new\n" * 50_000  # large enough that a kill lands inside a write


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((files.TEMPORARY, files.OLD)))


def test_a_killed_file_write_leaves_the_old_file_or_the_new_one(tmp_path):
    target = tmp_path / "data.csv"
    seen = set()

    def check(_):
        files.recover(tmp_path)
        assert target.read_text() in (OLD, NEW)
        seen.add(target.read_text())
        assert not leftovers(tmp_path)

    kill_at_random_points(lambda: files.write_text(target, NEW), check, kills=20, seed=1,
                          before=lambda: target.write_text(OLD))
    assert seen == {OLD, NEW}, "the kills should land both before and after the rename"


def test_a_killed_folder_write_leaves_the_old_folder_the_new_one_or_none(tmp_path):
    target = tmp_path / "checkpoint"

    def write():
        with files.replacing_folder(target) as temporary:
            for i in range(20):
                (temporary / f"part-{i}.txt").write_text(NEW)
            (temporary / "state.json").write_text("{}")  # last: marks it complete

    def lay_old():
        files.recover(tmp_path)
        if target.exists():
            for part in target.iterdir():
                part.unlink()
            target.rmdir()
        target.mkdir()
        (target / "part-0.txt").write_text(OLD)
        (target / "state.json").write_text("{}")

    def check(_):
        files.recover(tmp_path)
        names = sorted(p.name for p in target.iterdir())
        assert names in (["part-0.txt", "state.json"], sorted([f"part-{i}.txt" for i in range(20)] + ["state.json"]))
        assert (target / "part-0.txt").read_text() == (OLD if len(names) == 2 else NEW)
        assert not leftovers(tmp_path)

    kill_at_random_points(write, check, kills=20, seed=2, before=lay_old)


def test_a_full_disk_is_one_error_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text(OLD)

    def no_space(self, content):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(target), "write_bytes", no_space)
    with pytest.raises(files.DiskFull, match="the disk is full: could not write .*out.txt"):
        files.write_text(target, NEW)
    assert target.read_text() == OLD and not leftovers(tmp_path)
    with pytest.raises(files.DiskFull):
        with files.replacing_folder(tmp_path / "folder") as temporary:
            no_space(temporary, b"")
    assert not (tmp_path / "folder").exists() and not leftovers(tmp_path)


def test_a_torn_last_line_is_dropped_with_a_warning_and_a_torn_middle_is_an_error(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    files.append_line(log, json.dumps({"step": 1}))
    files.append_line(log, json.dumps({"step": 2}))
    assert files.read_jsonl(log) == [{"step": 1}, {"step": 2}]
    log.write_text(log.read_text() + '{"step": 3, "lo')
    assert files.read_jsonl(log, "finetune.py") == [{"step": 1}, {"step": 2}]
    assert "dropped a torn last line" in capsys.readouterr().err
    log.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        files.read_jsonl(log)
