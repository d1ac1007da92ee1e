"""create_images.py writes docs/SPEC.md's data files: reproducible, canonical, held-out test diagrams."""

import csv
import subprocess
import sys

import pytest
from PIL import Image

import dsl
from conftest import ROOT


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
    (["--num_test", "10000"], "more unique test diagrams"),
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
