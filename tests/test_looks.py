"""looks.py: the picture as CLIP gets it (read.py loads the same file from an export's folder:
tests/test_export.py)."""

import random

import numpy as np
from PIL import Image, ImageDraw

import dsl
import looks


def test_a_normalised_look_is_dark_ink_on_an_even_white_ground():
    import damage
    import renderer

    text = "<StartDiagram> <Large> <Circle> <TopLeft> <Small> <Triangle> <BottomRight> <EndDiagram>"
    nominal = np.asarray(renderer.render(dsl.parse(text)).convert("L"))
    styles = [renderer.Style(colour=(230, 230, 200), background=(15, 20, 30)),  # dark mode
              renderer.Style(colour=(200, 30, 30), background=(120, 220, 120))]  # red on green
    for style in styles:
        picture = damage.uneven_light(renderer.render(dsl.parse(text), 224, style), 0.6, random.Random(0))
        normalised = np.asarray(looks.normalise_look(picture).convert("L")).astype(int)
        ink, ground = normalised[nominal < 128], normalised[nominal >= 128]
        assert np.median(ink) < 90 and np.percentile(ground, 5) > 200, style  # the light evened out
    assert looks.normalise_look(Image.new("RGB", (64, 64), (40, 40, 40))).size == (64, 64)  # a blank picture


def test_a_normalised_look_keeps_a_lone_small_shape_and_solid_fills():
    import renderer

    # A lone Small outline is under 1% of the pixels; Large filled shapes are wider than thin ink;
    # light ink on a mid-grey ground is inverted though the ground is not dark; ink may cover most pixels.
    cases = [("<StartDiagram> <Small> <Triangle> <BottomLeft> <EndDiagram>", renderer.Style(background=(235, 245, 235))),
             ("<StartDiagram> <Large> <Circle> <TopLeft> <Large> <Square> <BottomRight> <EndDiagram>",
              renderer.Style(colour=(30, 30, 20), background=(250, 220, 220), filled=True)),
             ("<StartDiagram> <Large> <Triangle> <TopRight> <EndDiagram>",
              renderer.Style(colour=(230, 240, 120), background=(70, 140, 230))),
             ("<StartDiagram> " + " ".join(f"<Large> <Square> <{q}>" for q in ("TopLeft", "TopRight", "BottomLeft", "BottomRight"))
              + " <EndDiagram>", renderer.Style(colour=(20, 20, 60), filled=True))]  # ink on most of the pixels
    for text, style in cases:
        nominal = np.asarray(renderer.render(dsl.parse(text), 224, style).convert("L"))
        ink_mask = np.abs(nominal.astype(int) - renderer.grey(style.background)) > 40
        normalised = np.asarray(looks.normalise_look(renderer.render(dsl.parse(text), 224, style)).convert("L"))
        assert np.median(normalised[ink_mask]) < 60 and np.percentile(normalised[~ink_mask], 5) > 220, text


def test_a_normalised_look_is_not_inverted_by_what_a_crop_leaves_of_the_surface():
    import renderer

    # A sheet cropped from a dark desk keeps a few pixels of the desk at its edges.
    text = "<StartDiagram> <Large> <Triangle> <TopLeft> <Small> <Circle> <TopRight> <Large> <Square> <BottomRight> <EndDiagram>"
    picture = renderer.render(dsl.parse(text), 224, renderer.Style(background=(230, 240, 230)))
    ImageDraw.Draw(picture).rectangle([0, 0, 223, 223], outline=(20, 60, 30), width=6)
    assert np.median(np.asarray(looks.normalise_look(picture).convert("L"))) > 220  # the ground white, not inverted


def test_a_sheet_on_a_surface_is_found_and_a_diagram_on_its_own_ground_is_not():
    import damage
    import renderer

    rng = random.Random(3)
    for _ in range(20):
        picture = renderer.render(dsl.sample_diagram(rng), 224, renderer.random_style(rng, wide=True), rng)
        assert looks.find_sheet(picture) is None  # its ground reaches the edge: no surface
        assert looks.crop_to_sheet(picture) is picture
        ground = picture.getpixel((0, 0))
        surface = (40, 30, 20) if sum(ground) > 3 * 128 else (230, 220, 200)  # a desk far from the sheet's colour
        side = round(224 * rng.uniform(0.7, 0.95))
        offset = (224 - side) // 2
        box = looks.find_sheet(damage.on_a_surface(picture, side / 224, surface))
        assert box is not None and max(abs(a - b) for a, b in
                                       zip(box, (offset, offset, offset + side, offset + side))) <= 6, (box, side)
    # The same under uneven light (the surface darker in one corner than in another) and noise.
    lit = damage.noise(damage.uneven_light(damage.on_a_surface(picture, 0.8, surface), 0.6, rng), 8, rng)
    assert looks.find_sheet(lit) is not None and looks.crop_to_sheet(lit).size == (224, 224)
    # A blank picture, and one whose margin has the ground's own colour: nothing shows a sheet.
    assert looks.find_sheet(Image.new("RGB", (224, 224), (30, 30, 30))) is None
    assert looks.find_sheet(damage.on_a_surface(picture, 0.8, ground)) is None


def test_the_closing_is_pils_max_and_min_filters_pixel_for_pixel():
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    for height, width, side in [(56, 56, 25), (31, 47, 9), (20, 12, 13)]:  # a square wider than the picture too
        values = rng.integers(0, 256, (height, width), dtype=np.uint8)
        picture = Image.fromarray(values)
        assert np.array_equal(looks.square_filter(values, side, np.max),
                              np.asarray(picture.filter(ImageFilter.MaxFilter(side))))
        assert np.array_equal(looks.square_filter(values, side, np.min),
                              np.asarray(picture.filter(ImageFilter.MinFilter(side))))


def test_growing_along_runs_reaches_what_growing_a_pixel_at_a_time_does():
    rng = np.random.default_rng(1)
    for _ in range(20):
        like = rng.random((30, 40)) < 0.7
        down, across = rng.random((29, 40)) < 0.8, rng.random((30, 39)) < 0.8
        slow = np.zeros_like(like)
        slow[[0, -1], :], slow[:, [0, -1]] = like[[0, -1], :], like[:, [0, -1]]  # the edge's like pixels
        while True:  # one pixel a round, 4-connected, through joined neighbours that are `like`
            grown = slow.copy()
            grown[1:] |= slow[:-1] & down
            grown[:-1] |= slow[1:] & down
            grown[:, 1:] |= slow[:, :-1] & across
            grown[:, :-1] |= slow[:, 1:] & across
            grown &= like
            if (grown == slow).all():
                break
            slow = grown
        fast = looks.reached_from_edge(like, down, across)
        assert np.array_equal(fast, slow)


def test_a_sheet_shaded_to_the_surfaces_colour_on_one_side_is_not_cut_there():
    # A sheet (x 10-200, y 20-200) on a grey desk, its left part shaded so that its paper meets
    # the desk's grey without an edge, a square and a circle drawn there: the desk's flood runs on
    # into the shade, but the box goes to the frame's left edge, not through the drawing.
    pixels = np.full((224, 224, 3), 120, dtype=np.float32)
    light = np.clip((np.arange(224) - 10) / 70, 0, 1)  # 120 at the sheet's left edge, 240 from x = 80
    pixels[20:200, 10:200] = (120 + 120 * light[10:200])[None, :, None]
    picture = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    draw.rectangle([25, 40, 75, 90], outline=(20, 20, 20), width=3)
    draw.ellipse([25, 120, 75, 170], outline=(20, 20, 20), width=3)
    draw.rectangle([120, 40, 170, 90], outline=(20, 20, 20), width=3)
    side = looks.SHEET_WORK_SIDE
    small = np.asarray(picture.resize((side, side), Image.BOX), dtype=np.int16)
    # The box the flood leaves (at 112 px) starts in the shade, 24 px in: that side has no edge.
    assert looks.soft_sides(small, (12, 10, 100, 100)) == {"left"}
    box = looks.find_sheet(picture)
    assert box is not None and box[0] == 0, box
    assert max(abs(a - b) for a, b in zip(box[1:], (20, 200, 200))) <= 6, box
    # A sheet's edge stays an edge where strokes as dark as the desk run along 0.6 of it.
    for bottom in (192, 194):  # two squares' bottoms along 0.6 of the sheet's
        picture = Image.new("RGB", (224, 224), (110, 114, 123))
        draw = ImageDraw.Draw(picture)
        draw.rectangle([28, 32, 191, 195], fill=(235, 250, 250))
        for left, right in ((40, 100), (130, 170)):
            draw.rectangle([left, 120, right, bottom], outline=(34, 42, 46), width=4)
        box = looks.find_sheet(picture)
        assert box is not None and max(abs(a - b) for a, b in zip(box, (28, 32, 192, 196))) <= 4, box
