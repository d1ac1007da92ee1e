"""ink_fit.py: the size and shape each quadrant's ink fits, measured without the model."""

import random

import numpy as np
from PIL import Image

import damage
import dsl
import ink_fit
import renderer


def said(diagram: dsl.Diagram) -> list:
    elements = {e.position: (e.size, e.shape) for e in diagram.elements}
    return [elements.get(position) for position in dsl.POSITIONS]


def test_the_ink_fits_its_own_diagram_in_the_wide_envelope():
    """Outlines of 1-6 px, filled shapes, pen strokes that do not close, dark mode, any colours."""
    rng = random.Random(0)
    fitted_right = 0
    for _ in range(60):
        diagram = dsl.sample_diagram(rng)
        fitted_right += ink_fit.fitted(renderer.render(diagram, 224, renderer.random_style(rng, wide=True), rng)) \
            == said(diagram)
    assert fitted_right >= 58  # measured: 1.000 of test.csv's wide pictures (docs/LOG.md)


def test_a_sheet_on_a_desk_seen_at_a_slant_fits_its_diagram():
    """The desk's wedges and the corners a slant uncovers lie along the frame's edge: not shapes."""
    rng = random.Random(1)
    fitted_right = 0
    for _ in range(30):
        diagram = dsl.sample_diagram(rng)
        picture = renderer.render(diagram, 224, renderer.random_style(rng), rng)
        picture = damage.perspective(damage.on_a_surface(picture, rng.uniform(0.85, 0.95), (120, 90, 60)), 0.05, rng)
        fitted_right += ink_fit.fitted(picture) == said(diagram)
    assert fitted_right >= 27


def test_another_size_or_shape_does_not_fit():
    diagram = dsl.parse("<StartDiagram> <Large> <Circle> <TopLeft> <Medium> <Triangle> <TopRight> "
                        "<Small> <Square> <BottomRight> <EndDiagram>")
    picture = renderer.render(diagram)
    text = dsl.to_text(diagram)
    assert renderer.agreement(picture, text) == 1.0
    for wrong in (text.replace("<Large> <Circle>", "<Medium> <Circle>"),
                  text.replace("<Medium> <Triangle>", "<Medium> <Circle>"),
                  text.replace("<Small> <Square>", "<Small> <Triangle>")):
        assert renderer.agreement(picture, wrong) == 0.75, wrong


def test_the_convex_hull_keeps_the_corners_only():
    inside = [(x, y) for x in range(1, 9) for y in range(1, 9)]
    corners = ink_fit.convex_hull(inside + [(0, 0), (10, 0), (10, 10), (0, 10), (5, 0)])
    assert sorted(corners) == [(0, 0), (0, 10), (10, 0), (10, 10)]


def test_ink_along_the_frames_edge_goes_and_a_shape_the_frame_cuts_stays():
    dots = np.zeros((224, 224), bool)
    dots[:, 220:] = True  # a strip of desk down the right edge
    dots[100:160, 0:60] = True  # a square cut by the left edge, reaching well in
    kept = ink_fit.without_edge_bands(dots)
    assert not kept[:, 220:].any() and kept[100:160, 0:60].all()
    assert ink_fit.fitted(Image.new("RGB", (224, 224), "white")) == [None] * 4
