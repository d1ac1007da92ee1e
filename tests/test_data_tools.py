"""tools/other_renderer.py and tools/robustness.py write their data sets whole: each picture
and then the CSV naming them, renamed into place; a full disk leaves no CSV and no temporary file."""

import errno
import subprocess
import sys

import PIL.Image
import pytest

import data
import files
from conftest import ROOT
from tools import robustness

KIND = "gaussian blur radius 1.2"  # one of damage.CHECKS, with no JPEG kept in memory

NO_SPACE = """
import errno, os, runpy, sys
import PIL.Image

save = PIL.Image.Image.save

def save_half(image, path, *args, **kwargs):
    if not isinstance(path, (str, os.PathLike)):
        return save(image, path, *args, **kwargs)
    open(path, "wb").write(b"half a picture")
    raise OSError(errno.ENOSPC, "No space left on device")

PIL.Image.Image.save = save_half
sys.argv = sys.argv[1:]
runpy.run_module("tools.other_renderer", run_name="__main__", alter_sys=True)
"""


def temporaries(folder):
    return [path for path in folder.rglob("*") if path.name.startswith(files.TEMPORARY)]


def test_other_renderer_writes_a_whole_data_set_and_a_full_disk_is_one_line(tmp_path):
    command = ["--out_dir", str(tmp_path), "--num", "12", "--size", "32"]
    result = subprocess.run([sys.executable, "-m", "tools.other_renderer", *command], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows, _ = data.read_dataset(tmp_path / "data.csv")
    assert len(rows) == 12 and not temporaries(tmp_path)

    result = subprocess.run([sys.executable, "-c", NO_SPACE, "other_renderer", *command], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith("other_renderer.py: error: the disk is full: could not write")
    assert not (tmp_path / "data.csv").exists() and not temporaries(tmp_path)


def test_robustness_writes_each_kind_whole_and_a_full_disk_leaves_no_csv(tiny_dataset, tmp_path, monkeypatch):
    rows = data.read_dataset(tiny_dataset / "test.csv")[0]
    paths = robustness.write_damaged(rows, KIND, tmp_path, seed=0)
    written, _ = data.read_dataset(tmp_path / KIND.replace(" ", "_") / "data.csv")
    assert [r.image_path for r in written] == paths and [r.dsl for r in written] == [r.dsl for r in rows]
    assert not temporaries(tmp_path)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", no_space)
    with pytest.raises(files.DiskFull, match="the disk is full: could not write"):
        robustness.write_damaged(rows, KIND, tmp_path, seed=0)
    assert not (tmp_path / KIND.replace(" ", "_") / "data.csv").exists() and not temporaries(tmp_path)
