"""create_images.py writes docs/SPEC.md's data files: reproducible, canonical, held-out test
diagrams that no seed trains on, every file whole or absent."""

import csv
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import create_images
import data
import dsl
import files
from conftest import ROOT
from killing import kill_at_random_points


def generate(out_dir, *extra):
    return subprocess.run([sys.executable, str(ROOT / "create_images.py"), "--out_dir", str(out_dir), *extra],
                          capture_output=True, text=True)


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    runs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(name)
        result = generate(out, "--num_samples", "40", "--num_test", "10", "--seed", "1")
        assert result.returncode == 0, result.stderr
        runs.append(out)
    return runs


def test_same_arguments_give_identical_files(two_runs):
    a, b = two_runs
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 40 + 10 + 2
    for relative in files_a:
        assert (a / relative).read_bytes() == (b / relative).read_bytes(), relative


def test_files_follow_the_spec(two_runs):
    out = two_runs[0]
    train, test = read_rows(out / "data.csv"), read_rows(out / "test.csv")
    assert len(train) == 40 and len(test) == 10
    assert list(train[0]) == ["image_path", "dsl"]
    for row in train + test:
        assert dsl.to_text(dsl.parse(row["dsl"])) == row["dsl"], "every dsl cell is canonical"
        image = Image.open(out / row["image_path"])
        assert image.size == (224, 224)
    test_diagrams = [row["dsl"] for row in test]
    assert len(set(test_diagrams)) == len(test_diagrams), "test diagrams are all different"
    assert not set(test_diagrams) & {row["dsl"] for row in train}, "no test diagram in data.csv"
    held_out = {dsl.to_text(diagram) for diagram in dsl.held_out_diagrams()}
    assert set(test_diagrams) <= held_out and not held_out & {row["dsl"] for row in train}


def test_a_fifth_of_each_element_count_is_held_out_whatever_the_seed():
    by_count = Counter(len(diagram) for diagram in dsl.held_out_diagrams())
    assert by_count == {1: 7, 2: 97, 3: 583, 4: 1312}  # of 36, 486, 2,916 and 6,561
    assert create_images.MAX_TEST == 1999


def test_no_seed_trains_on_any_test_diagram(tmp_path):
    def diagrams(seed, num_test, name):
        out = tmp_path / f"{seed}-{num_test}"
        result = generate(out, "--num_samples", "300", "--num_test", str(num_test), "--seed", str(seed),
                          "--size", "16", "--damage", "0")
        assert result.returncode == 0, result.stderr
        return {row["dsl"] for row in read_rows(out / name)}

    trained = set().union(*(diagrams(seed, 10, "data.csv") for seed in (0, 1, 2)))
    tested = diagrams(0, 10, "test.csv") | diagrams(0, 60, "test.csv")
    assert len(tested) == 60 and len(trained) > 500  # the 10 are the first of the 60
    assert not trained & tested


def test_other_seed_other_data(two_runs, tmp_path):
    assert generate(tmp_path, "--num_samples", "40", "--num_test", "10", "--seed", "2").returncode == 0
    assert read_rows(tmp_path / "data.csv") != read_rows(two_runs[0] / "data.csv")


def test_augmentation_varies_style_and_can_be_turned_off(tmp_path):
    assert generate(tmp_path / "aug", "--num_samples", "20", "--num_test", "0").returncode == 0
    assert generate(tmp_path / "nom", "--num_samples", "20", "--num_test", "0", "--augment", "false",
                    "--damage", "0").returncode == 0
    backgrounds = {Image.open(tmp_path / "aug" / row["image_path"]).getpixel((0, 0))
                   for row in read_rows(tmp_path / "aug" / "data.csv")}
    assert len(backgrounds) > 10
    for row in read_rows(tmp_path / "nom" / "data.csv"):
        colours = {c for _, c in Image.open(tmp_path / "nom" / row["image_path"]).getcolors()}
        assert colours == {(0, 0, 0), (255, 255, 255)}


def test_large_test_set_keeps_every_element_count_in_training(tmp_path):
    result = generate(tmp_path, "--num_samples", "200", "--num_test", "300", "--size", "32")
    assert result.returncode == 0, result.stderr
    counts = {len(dsl.parse(row["dsl"])) for row in read_rows(tmp_path / "data.csv")}
    assert counts == {1, 2, 3, 4}


@pytest.mark.parametrize("args, message", [
    (["--num_samples", "-1"], "cannot be negative"),
    (["--num_test", "-5"], "cannot be negative"),
    (["--num_test", "2000"], "more unique test diagrams than are held out"),
])
def test_impossible_requests_are_refused(tmp_path, args, message):
    result = generate(tmp_path, *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data.csv").exists()


def test_damage_changes_about_that_share_of_training_images_and_never_test_ones(tmp_path):
    assert generate(tmp_path / "clean", "--num_samples", "40", "--num_test", "5", "--damage", "0").returncode == 0
    assert generate(tmp_path / "damaged", "--num_samples", "40", "--num_test", "5", "--damage", "0.5").returncode == 0
    assert read_rows(tmp_path / "clean" / "data.csv") == read_rows(tmp_path / "damaged" / "data.csv")  # same labels
    changed = [(tmp_path / "clean" / r["image_path"]).read_bytes() != (tmp_path / "damaged" / r["image_path"]).read_bytes()
               for r in read_rows(tmp_path / "clean" / "data.csv")]
    assert 8 <= sum(changed) <= 32
    for row in read_rows(tmp_path / "clean" / "test.csv"):
        assert (tmp_path / "clean" / row["image_path"]).read_bytes() == (tmp_path / "damaged" / row["image_path"]).read_bytes()
    assert generate(tmp_path / "bad", "--num_samples", "4", "--damage", "1.5").returncode == 2


def small_run(out_dir: Path, seed: int) -> list[str]:
    """create_images.py's command line for a small data set. Run in a fresh process: its pool
    forks, and a fork of this one (threads of earlier tests: torch's, a web server's) can hang."""
    return [sys.executable, str(ROOT / "create_images.py"), "--num_samples", "40", "--num_test", "10", "--size", "64",
            "--seed", str(seed), "--out_dir", str(out_dir)]


def run_whole(out_dir: Path, seed: int):
    subprocess.run(small_run(out_dir, seed), check=True, capture_output=True)


def contents(folder: Path) -> dict:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def living_in_group(group: int) -> list[int]:
    """The processes of a process group that have not ended (a zombie has)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, process_group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except OSError:  # ended while being read
            continue
        if int(process_group) == group and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def test_a_killed_run_leaves_each_csv_whole_and_naming_its_own_pictures(tmp_path):
    """Killed at random points over an older data set (another seed): each CSV is the old one,
    the new one or absent, and every picture a CSV names is the one it describes. The kills
    take the main process alone, as a crash would: the pool's workers must end by themselves."""
    run_whole(tmp_path / "old", seed=1)
    run_whole(tmp_path / "new", seed=0)
    versions = {"old": contents(tmp_path / "old"), "new": contents(tmp_path / "new")}
    out, pid_file = tmp_path / "out", tmp_path / "writer.pid"
    seen = Counter()

    def lay_old():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(tmp_path / "old", out)
        pid_file.unlink(missing_ok=True)

    def write():
        os.setpgid(0, 0)  # the pool's workers join this group, so that the check can wait for them
        files.write_text(pid_file, str(os.getpid()))  # whole, or the check finds none
        os.execv(sys.executable, small_run(out, seed=0))  # the same pid, a fresh process

    def check(_):
        if pid_file.exists():
            group, deadline = int(pid_file.read_text()), time.monotonic() + 10
            while living_in_group(group):
                assert time.monotonic() < deadline, f"the killed run's workers {living_in_group(group)} live on"
                time.sleep(0.01)
        files.recover(out / "images")
        files.recover(out)
        assert not [path for path in out.rglob("*") if path.name.startswith(files.TEMPORARY)]
        left = contents(out)
        for name, content in left.items():
            assert content in (versions["old"].get(name), versions["new"].get(name)), f"{name} is not whole"
        for name in create_images.CSV_NAMES:
            version = next((v for v in ("old", "new") if left.get(name) == versions[v][name]), "absent")
            assert version != "absent" or name not in left, f"{name} is neither the old one nor the new one"
            seen[name, version] += 1
            if version != "absent":
                rows, _ = data.read_dataset(out / name)
                for row in rows:
                    picture = row.image_path.relative_to(out).as_posix()
                    assert left[picture] == versions[version][picture], f"{name} names a picture of another run"

    # 40 kills: the window in which data.csv is absent is short beside start-up, and 20 missed it now and then.
    kill_at_random_points(write, check, kills=40, seed=3, before=lay_old)
    assert seen["data.csv", "absent"], f"no kill landed inside a run: {seen}"
    (out / f"{files.TEMPORARY}999-data.csv").write_text("half a CSV")  # what a kill leaves
    (out / "images" / f"{files.TEMPORARY}999-train_00000.png").write_bytes(b"half a picture")
    run_whole(out, seed=0)
    assert contents(out) == versions["new"], "a whole run leaves the new files alone"


NO_SPACE = """
import csv, errno, os, runpy, sys
import PIL.Image

def no_space(*args):
    raise OSError(errno.ENOSPC, "No space left on device")

save = PIL.Image.Image.save

def save_half(image, path, *args, **kwargs):
    if not isinstance(path, (str, os.PathLike)):  # a picture kept in memory (damage.py's JPEG)
        return save(image, path, *args, **kwargs)
    open(path, "wb").write(b"half a picture")
    no_space()

class CsvWriterWithoutSpace:
    def __init__(self, f, **options):
        self.file = f

    def writerow(self, row):
        self.file.write("half a row")
        no_space()

    writerows = writerow

if sys.argv[1] == "picture":
    PIL.Image.Image.save = save_half
else:
    csv.writer = CsvWriterWithoutSpace
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("what", ["picture", "csv"])
def test_a_full_disk_is_one_line_and_status_1_with_nothing_half_written(tmp_path, what):
    assert generate(tmp_path, "--num_samples", "20", "--num_test", "5", "--size", "32").returncode == 0
    result = subprocess.run([sys.executable, "-c", NO_SPACE, what, str(ROOT / "create_images.py"), "--out_dir",
                             str(tmp_path), "--num_samples", "20", "--num_test", "5", "--size", "32", "--seed", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith("create_images.py: error: the disk is full: could not write ")
    assert not (tmp_path / "data.csv").exists() and not (tmp_path / "test.csv").exists()
    assert not [path for path in tmp_path.rglob("*") if path.name.startswith(files.TEMPORARY)]
    for path in (tmp_path / "images").iterdir():
        assert data.image_problem(path) is None, path


# ---------------------------------------------------------------------------- other DSLs (--dsl)

@pytest.fixture(scope="module")
def two_mermaid_runs(tmp_path_factory):
    runs = []
    for name in ("mermaid_a", "mermaid_b"):
        out = tmp_path_factory.mktemp(name)
        result = generate(out, "--dsl", "mermaid", "--num_samples", "40", "--num_test", "10", "--seed", "1")
        assert result.returncode == 0, result.stderr
        runs.append(out)
    return runs


def test_mermaid_data_parse_and_hold_out_their_test_charts(two_mermaid_runs):
    import mermaid

    out = two_mermaid_runs[0]
    train, test = read_rows(out / "data.csv"), read_rows(out / "test.csv")
    assert len(train) == 40 and len(test) == 10
    for row in train + test:
        chart = mermaid.parse(row["dsl"])
        assert row["dsl"] == mermaid.to_text(chart), "as the model writes it: ids in reading order"
        assert Image.open(out / row["image_path"]).size == (mermaid.SIZE, mermaid.SIZE)
    tested = [mermaid.canonical(row["dsl"]) for row in test]
    assert len(set(tested)) == len(tested), "test charts are all different"
    assert all(map(mermaid.held_out, tested))
    assert not any(mermaid.held_out(row["dsl"]) for row in train) and not set(tested) & {
        mermaid.canonical(row["dsl"]) for row in train}


def test_mermaid_same_arguments_give_identical_files(two_mermaid_runs):
    a, b = two_mermaid_runs
    assert contents(a) == contents(b) and len(contents(a)) == 40 + 10 + 2


DSL_WITHOUT_HOOKS = "GRAMMAR = None\n\ndef canonical(text):\n    return text\n"

# Three texts, one held out: two different test texts cannot be found.
DSL_OF_THREE = DSL_WITHOUT_HOOKS + """
def sample(rng):
    return rng.choice("abc")

def text_of(item):
    return item

def draw(item, size, rng, augment):
    from PIL import Image
    return Image.new("RGB", (size, size))

def held_out(text):
    return text == "a"
"""


def test_a_dsl_without_the_hooks_or_with_too_few_test_texts_is_one_line(tmp_path):
    (tmp_path / "bare.py").write_text(DSL_WITHOUT_HOOKS)
    (tmp_path / "three.py").write_text(DSL_OF_THREE)
    for dsl_name, status, message in (
            ("text", 2, "text lacks sample, text_of, draw, held_out"),
            (str(tmp_path / "bare.py"), 2, "bare.py lacks sample, text_of, draw, held_out"),
            (str(tmp_path / "three.py"), 2, "found 1 different held-out")):
        result = generate(tmp_path / "out", "--dsl", dsl_name, "--num_samples", "3", "--num_test", "2")
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        assert result.returncode == status and len(errors) == 1 and message in errors[0], result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "out" / "data.csv").exists()
    result = generate(tmp_path / "out", "--dsl", str(tmp_path / "three.py"), "--num_samples", "3", "--num_test", "1",
                      "--size", "8")
    assert result.returncode == 0, result.stderr
    assert [row["dsl"] for row in read_rows(tmp_path / "out" / "test.csv")] == ["a"]
    assert {row["dsl"] for row in read_rows(tmp_path / "out" / "data.csv")} <= {"b", "c"}
