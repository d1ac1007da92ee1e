"""renderer.py's render-and-compare agreement (ink_fit.py): what the ink fits, quadrant by quadrant; calibration;
the ink's reading as a candidate; the crop to the canvas before reading."""

import random
from dataclasses import replace

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


def test_calibration_error_weighs_each_bins_gap_by_its_pictures():
    import inference

    confidences = [0.95, 0.95, 0.95, 0.95, 0.55, 0.55, 1.0, 1.0]
    exact = [True, True, True, False, True, False, True, True]
    ece, bins = inference.calibration(confidences, exact)
    # 0.9-1.0 holds six (mean confidence 0.9667, exact 5/6); 0.5-0.6 two (0.55, exact 0.5).
    assert [(b["low"], b["n"]) for b in bins] == [(0.5, 2), (0.9, 6)]
    assert abs(ece - (6 * abs(0.9667 - 5 / 6) + 2 * 0.05) / 8) < 1e-3
    assert inference.calibration([0.99] * 4, [True] * 4)[0] < 0.011


def test_the_inks_reading_is_taken_where_the_model_finds_it_nearly_as_likely():
    from types import SimpleNamespace

    import torch

    import inference

    own = dsl.canonical("<StartDiagram> <Large> <Circle> <TopLeft> <EndDiagram>")
    ink = dsl.canonical("<StartDiagram> <Large> <Square> <TopLeft> <EndDiagram>")  # as ink_reading writes it

    class Reader:
        language = SimpleNamespace(canonical_or_raw=dsl.canonical)

        def __init__(self, gap):
            self.gap = gap

        def score_texts(self, features, texts):
            return [(-1.0, 0.9), (-1.0 - self.gap, 0.2)] * (len(texts) // 2)  # (own, ink's) a picture

    pictures, features = [Image.new("RGB", (8, 8))] * 2, torch.zeros(2, 1, 1)
    near, far = Reader(inference.INK_MARGIN - 1), Reader(inference.INK_MARGIN + 1)
    taken = inference.INK_CONFIDENCE
    assert inference.prefer_the_ink(near, features, pictures, [own, own], [0.9, 0.9], lambda p: ink,
                                    inference.INK_MARGIN) == ([ink, ink], [taken, taken], [True, True])
    assert inference.prefer_the_ink(far, features, pictures, [own, own], [0.9, 0.9], lambda p: ink,
                                    inference.INK_MARGIN) == ([own, own], [0.9, 0.9], [False, False])
    # No ink to read, or the ink reads what the model did: nothing to weigh.
    assert inference.prefer_the_ink(near, features, pictures[:1], [own], [0.9], lambda p: None,
                                    inference.INK_MARGIN) == ([own], [0.9], [False])
    assert inference.prefer_the_ink(near, features, pictures[:1], [ink], [0.9], lambda p: ink,
                                    inference.INK_MARGIN) == ([ink], [0.9], [False])


def test_a_reading_is_doubtful_for_each_of_its_reasons():
    import inference

    confident = inference.Reading("<StartDiagram> <EndDiagram>", True, 0.95, 1.0, 0.95)
    assert inference.doubts(confident, 0.5) == []
    assert inference.doubts(replace(confident, agreement=None, picture_check=None), 0.5) == []
    for doubted in (replace(confident, confidence=0.4), replace(confident, picture_check=0.4),
                    replace(confident, agreement=0.75), replace(confident, from_ink=True),
                    replace(confident, borderline=True)):
        assert len(inference.doubts(doubted, 0.5)) == 1 and inference.doubtful(doubted, 0.5), doubted
    assert len(inference.doubts(replace(confident, confidence=0.1, agreement=0.5), 0.5)) == 2
    # The ink fitting another reading, or leaving a size undecided, outweighs neither reader where
    # both are SURE of theirs.
    at_least = replace(confident, confidence=inference.SURE, picture_check=inference.SURE, agreement=0.75,
                       borderline=True)
    assert inference.doubts(at_least, 0.5) == [] and inference.doubts(replace(at_least, picture_check=None), 0.5) == []
    assert len(inference.doubts(replace(at_least, picture_check=inference.SURE - 0.01), 0.5)) == 2


def test_a_zoomed_out_picture_is_read_cropped_to_its_canvas():
    """inference.read crops before the model sees the picture, and the agreement is measured on
    the crop: there the sizes the diagram was drawn with fit; against the whole frame they do not."""
    import torch

    import damage
    import inference
    import ink_fit
    import languages

    diagram = dsl.parse("<StartDiagram> <Large> <Circle> <TopLeft> <Medium> <Square> <BottomRight> <EndDiagram>")
    picture = damage.zoom_out(renderer.render(diagram), 0.75)
    seen = []

    class Vision:
        def encode(self, pictures, progress=None):
            seen.extend(pictures)
            return torch.zeros(len(pictures), 1, 1)

    class Reader:  # reads the diagram it was drawn from, whatever it is shown
        language, vision = languages.load("diagram"), Vision()

        def read_features(self, features, batch_size, constrained, progress):
            return [dsl.to_text(diagram)] * len(features), [0.9] * len(features)

        def picture_check(self, features, texts):
            return [None] * len(texts)

    cropped = inference.read(Reader(), [picture])[0]
    assert seen[-1].tobytes() == ink_fit.crop_to_canvas(picture).tobytes() != picture.tobytes()
    assert cropped.agreement == 1.0
    whole = inference.read(Reader(), [picture], find_canvas=False, ink_margin=0)[0]
    assert seen[-1].tobytes() == picture.tobytes() and whole.agreement < 1
