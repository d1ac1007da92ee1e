"""renderer.py's render-and-compare agreement: ink where the prediction says, none elsewhere."""

import random

import numpy as np
from PIL import Image

import dsl
import renderer


def test_a_picture_agrees_with_its_own_diagram_in_every_style_and_under_noise(tmp_path):
    rng = random.Random(0)
    for i in range(40):
        diagram = dsl.sample_diagram(rng)
        image = renderer.render(diagram, 224, renderer.random_style(rng), rng)
        noisy = np.asarray(image).astype(float) + np.random.default_rng(i).normal(0, 12, (224, 224, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(tmp_path / "x.png")
        assert renderer.agreement(Image.open(tmp_path / "x.png"), dsl.to_text(diagram)) == 1.0, dsl.to_text(diagram)


def test_a_missing_or_extra_element_lowers_the_agreement(tmp_path):
    drawn = dsl.parse("<StartDiagram> <Small> <Square> <TopLeft> <Large> <Circle> <BottomRight> <EndDiagram>")
    renderer.render(drawn, 224, renderer.Style(stroke=2, colour=(100, 100, 100))).save(tmp_path / "x.png")
    missing = "<StartDiagram> <Large> <Circle> <BottomRight> <EndDiagram>"
    extra = "<StartDiagram> <Small> <Square> <TopLeft> <Small> <Square> <TopRight> <Large> <Circle> <BottomRight> <EndDiagram>"
    assert renderer.agreement(Image.open(tmp_path / "x.png"), missing) == 0.75
    assert renderer.agreement(Image.open(tmp_path / "x.png"), extra) == 0.75
    assert renderer.agreement(Image.open(tmp_path / "x.png"), "not a diagram") == 0.0
