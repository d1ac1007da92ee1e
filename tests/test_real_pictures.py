"""tools/real_pictures.py: test sets of pictures people bring (sketches, phone photos, wide
margins, dark mode), drawn by code of its own from held-out diagrams only, reproducible from
the seed; and its scores by shape and position, and of the doubt flag."""

import ast
import random
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from PIL import ImageFilter

import data
import dsl
import inference
import languages
from conftest import ROOT
from tools import real_pictures

SOURCE = ROOT / "tools" / "real_pictures.py"
SIZE = 224  # docs/SPEC.md's picture side


def test_it_imports_none_of_the_training_drawing_code():
    tree = ast.parse(SOURCE.read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):  # imports anywhere, inside functions too
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {node.module or ""} | {f"{node.module}.{alias.name}" for alias in node.names}
    for name in imported:
        assert not {"renderer", "damage", "other_renderer", "mermaid"} & set(name.split(".")), name
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not {"__import__", "importlib", "renderer", "damage", "other_renderer"} & names


def test_the_diagrams_are_held_out_different_and_the_same_for_a_seed():
    diagrams = real_pictures.held_out_sample(60, seed=0)
    assert len(set(diagrams)) == 60 and all(d in dsl.held_out_diagrams() for d in diagrams)
    assert diagrams == real_pictures.held_out_sample(60, seed=0)
    assert diagrams != real_pictures.held_out_sample(60, seed=1)
    assert {len(d) for d in diagrams} == {1, 2, 3, 4}
    with pytest.raises(ValueError):
        real_pictures.held_out_sample(len(dsl.held_out_diagrams()) + 1, seed=0)


@pytest.mark.parametrize("kind", real_pictures.KINDS)
def test_each_kind_draws_the_same_picture_again_at_the_size_asked(kind):
    for index, diagram in enumerate(real_pictures.held_out_sample(4, seed=0)):
        picture, variant = real_pictures.draw(kind, diagram, SIZE, 0, index)
        again, _ = real_pictures.draw(kind, diagram, SIZE, 0, index)
        assert picture.size == (SIZE, SIZE) and picture.mode == "RGB" and variant
        assert np.array_equal(np.asarray(picture), np.asarray(again))


@pytest.mark.parametrize("kind", real_pictures.KINDS)
def test_a_picture_is_not_blank_and_differs_between_seeds(kind):
    diagram = real_pictures.held_out_sample(1, seed=0)[0]
    first = np.asarray(real_pictures.draw(kind, diagram, SIZE, 0, 0)[0], dtype=float)
    second = np.asarray(real_pictures.draw(kind, diagram, SIZE, 1, 0)[0], dtype=float)
    grey = first.mean(axis=2)
    assert np.percentile(grey, 99.5) - np.percentile(grey, 0.5) > 60  # ink against its ground
    assert np.abs(first - second).mean() > 1


def ink_by_quadrant(picture: PIL.Image.Image) -> np.ndarray:
    """Pixels that stand out from their neighbourhood (dark on light or light on dark), counted
    per quadrant (TopLeft, TopRight, BottomLeft, BottomRight); left out: the outer tenth of the
    frame (a photo's desk) and rows and columns more than half ink (a sheet's edge, the only
    line that long)."""
    grey = picture.convert("L")
    local = np.asarray(grey.filter(ImageFilter.BoxBlur(8)), dtype=float)
    ink = np.abs(np.asarray(grey, dtype=float) - local) > 30
    ink[ink.mean(axis=1) > 0.5], ink[:, ink.mean(axis=0) > 0.5] = False, False
    border, half = SIZE // 10, SIZE // 2
    ink[:border], ink[-border:], ink[:, :border], ink[:, -border:] = False, False, False, False
    return np.array([ink[:half, :half].sum(), ink[:half, half:].sum(), ink[half:, :half].sum(), ink[half:, half:].sum()])


@pytest.mark.parametrize("kind", real_pictures.KINDS)
def test_a_lone_element_is_drawn_in_its_own_quadrant(kind):
    lone = sorted((d for d in dsl.held_out_diagrams() if len(d) == 1), key=dsl.to_text)
    for index, diagram in enumerate(lone):
        counts = ink_by_quadrant(real_pictures.draw(kind, diagram, SIZE, 0, index)[0])
        where = dsl.POSITIONS.index(diagram.elements[0].position)
        assert counts.argmax() == where and counts[where] > np.delete(counts, where).sum(), (dsl.to_text(diagram), counts)


def test_elements_stay_inside_the_rendering_envelope():
    rng = random.Random(0)
    for diagram in real_pictures.held_out_sample(50, seed=0):
        for element, placed in zip(diagram.elements, real_pictures.place(diagram, rng)):
            q = 0.5
            column, row = element.position.endswith("Right"), element.position.startswith("Bottom")
            assert abs(placed.side - real_pictures.QUADRANT_SHARE[element.size] * q) <= 0.03 * q + 1e-9
            assert abs(placed.x - (column + 0.5) * q) <= 0.06 * q + 1e-9
            assert abs(placed.y - (row + 0.5) * q) <= 0.06 * q + 1e-9
            assert column * q <= placed.x - placed.side / 2 and placed.x + placed.side / 2 <= (column + 1) * q


def test_dark_colours_have_the_contrast_they_claim():
    diagram = real_pictures.held_out_sample(1, seed=0)[0]
    for index in range(20):
        pixels = np.asarray(real_pictures.draw("dark", diagram, SIZE, 0, index)[0]).reshape(-1, 3)
        colours, counts = np.unique(pixels, axis=0, return_counts=True)
        ground, ink = colours[np.argsort(counts)[-1]], colours[np.argsort(counts)[-2]]  # the two commonest
        assert real_pictures.contrast(ground, ink) >= 4.5
        assert abs(real_pictures.grey(ground) - real_pictures.grey(ink)) >= 90


SQUARE_TL = "<StartDiagram> <Large> <Square> <TopLeft> <EndDiagram>"
TWO = "<StartDiagram> <Large> <Square> <TopLeft> <Small> <Circle> <BottomRight> <EndDiagram>"


def test_shape_and_position_scores_ignore_sizes_and_nothing_else():
    scores = real_pictures.shape_position_scores
    # Sizes differ: still right.
    assert scores(["<StartDiagram> <Small> <Square> <TopLeft> <EndDiagram>"], [SQUARE_TL]) == \
        {"n": 1, "shape_position_exact": 1.0, "shape_position_f1": 1.0}
    same_but_sizes = "<StartDiagram><Medium><Square><TopLeft><Large><Circle><BottomRight><EndDiagram>"
    assert scores([same_but_sizes], [TWO])["shape_position_exact"] == 1.0
    # A wrong shape, a wrong position, a missing or an extra element, or no parse: wrong.
    wrong = ["<StartDiagram> <Large> <Circle> <TopLeft> <EndDiagram>",
             "<StartDiagram> <Large> <Square> <TopRight> <EndDiagram>",
             "not a diagram"]
    result = scores(wrong, [SQUARE_TL] * 3)
    assert result["shape_position_exact"] == 0.0 and result["shape_position_f1"] == 0.0
    missing = scores([SQUARE_TL], [TWO])  # 1 of 1 predicted right, 1 of 2 found: F1 2/3
    assert missing["shape_position_exact"] == 0.0 and missing["shape_position_f1"] == pytest.approx(2 / 3)
    extra = scores([TWO], [SQUARE_TL])
    assert extra["shape_position_exact"] == 0.0 and extra["shape_position_f1"] == pytest.approx(2 / 3)
    half = scores([SQUARE_TL, "<StartDiagram> <Large> <Triangle> <TopLeft> <EndDiagram>"], [SQUARE_TL, SQUARE_TL])
    assert half["shape_position_exact"] == 0.5 and half["shape_position_f1"] == 0.5
    with pytest.raises(ValueError):
        scores([SQUARE_TL], [SQUARE_TL, TWO])


def test_the_doubt_flag_and_its_quality():
    below = real_pictures.DOUBT_CONFIDENCE

    def reading(confidence, picture_check, agreement, from_ink=False, borderline=False):
        return inference.Reading(TWO, True, confidence, agreement, picture_check, from_ink, borderline)

    assert real_pictures.doubtful(reading(below - 0.01, None, 1.0))
    assert real_pictures.doubtful(reading(0.99, below - 0.01, 1.0))
    assert real_pictures.doubtful(reading(0.98, 0.995, 0.75))  # the ink fits another reading
    assert not real_pictures.doubtful(reading(0.995, None, 0.75))  # ... and the model is sure of its own
    assert real_pictures.doubtful(reading(0.98, 0.995, 1.0, borderline=True))  # a size the ink cannot tell
    assert real_pictures.doubtful(reading(0.99, 0.99, 1.0, from_ink=True))  # the model preferred its own
    assert not real_pictures.doubtful(reading(below, below, 1.0))
    assert not real_pictures.doubtful(reading(0.99, None, None))
    quality = real_pictures.flag_quality(right=[True, True, True, True, False, False],
                                         flagged=[True, False, False, False, True, False])
    assert quality == {"wrong": 2, "catches_wrong": 0.5, "right": 4, "flags_right": 0.25, "flagged": 2 / 6}
    assert real_pictures.flag_quality([True], [False])["catches_wrong"] is None


def test_a_kind_is_scored_with_the_language_and_margin_no_edge_by_shape_and_position():
    language = languages.load("diagram")
    small_square = "<StartDiagram> <Small> <Square> <TopLeft> <EndDiagram>"
    readings = [inference.Reading(dsl.canonical(small_square), True, 0.95, 1.0, 0.99),  # size wrong
                inference.Reading(dsl.canonical(TWO), True, 0.3, 1.0, 0.99)]  # right, doubted
    references = [dsl.canonical(SQUARE_TL), dsl.canonical(TWO)]
    usual = real_pictures.score_kind("sketch", readings, references, language)
    assert usual["exact"] == 0.5 and usual["flag_catches_wrong"] == 0.0 and usual["flag_flags_right"] == 1.0
    assert "shape_position_exact" not in usual and usual["flag_judged_by"] == "exact"
    margin = real_pictures.score_kind("margin_no_edge", readings, references, language)
    assert margin["exact"] == 0.5 and margin["shape_position_exact"] == 1.0
    assert margin["flag_wrong"] == 0 and margin["flag_flags_right"] == 0.5 and margin["flag_judged_by"] == "shape_position"


def run_tool(out, *arguments):
    return subprocess.run([sys.executable, "-m", "tools.real_pictures", "--out", str(out), "--num", "3", *arguments],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_tool_writes_a_data_file_per_kind_and_the_same_bytes_again(tmp_path):
    result = run_tool(tmp_path / "a", "--kinds", "sketch", "dark")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["dark", "sketch"]
    for kind in ("sketch", "dark"):
        rows, bad = data.read_dataset(tmp_path / "a" / kind / "data.csv")
        assert bad == 0 and len(rows) == 3 and all(dsl.held_out(row.dsl) for row in rows)
        assert all(row.dsl == dsl.canonical(row.dsl) for row in rows)
    assert run_tool(tmp_path / "b", "--kinds", "sketch", "dark").returncode == 0
    for kind in ("sketch", "dark"):
        first, second = tmp_path / "a" / kind, tmp_path / "b" / kind
        names = sorted(p.name for p in (first / "images").iterdir())
        assert names == sorted(p.name for p in (second / "images").iterdir()) and len(names) == 3
        for name in [f"images/{n}" for n in names] + ["data.csv"]:
            assert (first / name).read_bytes() == (second / name).read_bytes()
    # Another seed in the same folder: its own pictures only, none of the first run's left beside them.
    assert run_tool(tmp_path / "a", "--kinds", "sketch", "--seed", "1").returncode == 0
    rows, _ = data.read_dataset(tmp_path / "a" / "sketch" / "data.csv")
    left = sorted(p.name for p in (tmp_path / "a" / "sketch" / "images").iterdir())
    assert left == sorted(row.image_path.name for row in rows)


def test_bad_settings_end_in_one_line():
    for arguments in (["--kinds", "watercolour"], ["--num", "0"], ["--num", "2000"], ["--size", "8"]):
        result = subprocess.run([sys.executable, "-m", "tools.real_pictures", "--out", "unused", *arguments],
                                capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert result.returncode == 2 and f"error: {arguments[0]}" in result.stderr, result.stderr
