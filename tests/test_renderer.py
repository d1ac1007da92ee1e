"""Rendered pixels land where docs/SPEC.md's envelope says: the right quadrant, the right size band."""

import random
import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import dsl
import renderer
from conftest import ROOT

diagrams = st.sampled_from(list(dsl.all_diagrams()))
styles = st.one_of(st.just(renderer.NOMINAL),
                   st.builds(lambda seed, wide: renderer.random_style(random.Random(seed), wide),
                             st.integers(0, 2**32 - 1), st.booleans()))
# Side of the bounding box in units of q, with the +-0.03 q jitter SPEC allows.
BANDS = {"Large": (0.77, 0.83), "Medium": (0.52, 0.58), "Small": (0.27, 0.33)}


def ink_boxes(image: Image.Image, background=(255, 255, 255)):
    """Per quadrant: (width, height, centre x, centre y) of the ink (every pixel not of the
    background: drawing is not antialiased), or None."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    dark = np.any(pixels != np.array(background), axis=2)
    q = pixels.shape[0] // 2
    boxes = {}
    for position, (column, row) in dsl.QUADRANT_OFFSET.items():
        ys, xs = np.nonzero(dark[row * q:(row + 1) * q, column * q:(column + 1) * q])
        boxes[position] = None if len(xs) == 0 else (
            xs.max() - xs.min() + 1, ys.max() - ys.min() + 1, (xs.max() + xs.min() + 1) / 2, (ys.max() + ys.min() + 1) / 2)
    return boxes


@settings(max_examples=80, deadline=None)
@given(diagrams, styles, st.integers(0, 2**32 - 1), st.sampled_from([224, 160, 320]))
def test_elements_land_in_their_quadrant_with_their_size_band(diagram, style, seed, size):
    image = renderer.render(diagram, size, style, random.Random(seed))
    assert image.size == (size, size) and image.mode == "RGB"
    q = size / 2
    boxes = ink_boxes(image, style.background)
    drawn = {e.position: e for e in diagram.elements}
    # A pen's stroke strays from the outline and is centred on it, not drawn inside it.
    slack = (2 * renderer.PEN_WOBBLE * q + style.stroke) if style.pen else 0
    for position, box in boxes.items():
        if position not in drawn:
            assert box is None, f"something drawn in the empty quadrant {position}"
            continue
        assert box is not None, f"nothing drawn at {position}"
        width, height, cx, cy = box
        low, high = BANDS[drawn[position].size]
        for side in (width, height):
            assert low * q - 1.5 - slack <= side <= high * q + 1.5 + slack, (drawn[position], side / q)
        centre_room = (0.06 if style.jitter else 0.0) * q + 1.5 + slack / 2
        assert abs(cx - q / 2) <= centre_room and abs(cy - q / 2) <= centre_room


def test_nominal_style_is_black_outline_on_white():
    image = renderer.render(dsl.parse(open(ROOT / "example.dsl.txt").read()))
    colours = {colour for _, colour in image.getcolors()}
    assert colours == {(0, 0, 0), (255, 255, 255)}
    # An outline, not a fill: the centre of the Large circle in the top-left quadrant is white.
    assert image.getpixel((56, 56)) == (255, 255, 255)


def test_shapes_differ():
    images = [np.asarray(renderer.render(dsl.Diagram((dsl.Element("Large", shape, "TopLeft"),))))
              for shape in dsl.SHAPES]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    # A triangle's apex is narrow: the top row of its box has few dark pixels, a square's has many.
    square, triangle = (img.max(axis=2) <= 160 for img in images[1:])
    top = np.nonzero(square.any(axis=1))[0].min()
    assert square[top].sum() > 50 and triangle[top].sum() < 10


def test_example_png_is_the_rendered_example():
    expected = renderer.render(dsl.parse(open(ROOT / "example.dsl.txt").read()))
    assert np.array_equal(np.asarray(Image.open(ROOT / "example.png").convert("RGB")), np.asarray(expected))


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "renderer.py"), *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_renders_a_file_and_stdin(tmp_path):
    out = tmp_path / "x.png"
    result = run_cli(str(ROOT / "example.dsl.txt"), "-o", str(out), "--size", "112")
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (112, 112)
    result = run_cli("-", "-o", str(out), stdin=open(ROOT / "example.dsl.txt").read())
    assert result.returncode == 0, result.stderr
    assert set(p for p, box in ink_boxes(Image.open(out)).items() if box) == {"TopLeft", "TopRight", "BottomLeft"}


def test_cli_bad_dsl_is_one_line_and_status_2(tmp_path):
    bad = tmp_path / "bad.dsl"
    bad.write_text("<StartDiagram>\n  <Large> <Hexagon> <TopLeft>\n<EndDiagram>\n")
    result = run_cli(str(bad), "-o", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "line 2" in result.stderr and "<Hexagon>" in result.stderr
    assert not (tmp_path / "x.png").exists()
    missing = run_cli(str(tmp_path / "nope.dsl"), "-o", str(tmp_path / "x.png"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "nope.dsl" in missing.stderr


def test_renderer_py_on_a_full_disk_says_so_in_one_line_and_leaves_nothing(full_disk):
    result = subprocess.run([sys.executable, str(ROOT / "renderer.py"), str(ROOT / "example.dsl.txt"), "-o",
                             str(full_disk / "example.png")], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("renderer.py: error: the disk is full"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_random_styles_keep_ink_and_ground_apart_in_every_look():
    styles = [renderer.random_style(random.Random(seed), wide=True) for seed in range(2000)]
    assert all(abs(renderer.grey(s.colour) - renderer.grey(s.background)) >= renderer.MIN_CONTRAST for s in styles)
    dark_mode = [s for s in styles if renderer.grey(s.background) < renderer.grey(s.colour)]
    assert 0.25 < len(dark_mode) / len(styles) < 0.45  # dark mode, and light ink on coloured grounds
    assert not any(s.pen and s.filled for s in styles) and 0.1 < sum(s.pen for s in styles) / len(styles) < 0.3


def test_agreement_sees_light_ink_on_a_dark_ground_and_a_pen_stroke():
    text = "<StartDiagram> <Large> <Circle> <TopLeft> <Small> <Triangle> <BottomRight> <EndDiagram>"
    diagram = dsl.parse(text)
    for style in (renderer.Style(colour=(230, 230, 230), background=(20, 20, 30)),
                  renderer.Style(colour=(40, 40, 120), background=(250, 240, 220), pen=True, stroke=2)):
        image = renderer.render(diagram, 224, style, random.Random(0))
        assert renderer.agreement(image, text) == 1.0
        assert renderer.agreement(image, text.replace("<Circle>", "<Square>")) == 0.75


def test_the_classic_envelope_keeps_dark_ink_on_a_light_ground_ruled():
    styles = [renderer.random_style(random.Random(seed)) for seed in range(500)]
    assert all(max(s.colour) <= 100 and min(s.background) >= 220 and 2 <= s.stroke <= 5 and not s.pen for s in styles)
