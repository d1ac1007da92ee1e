"""Draw a diagram as an image, inside docs/SPEC.md's rendering envelope.

    python renderer.py example.dsl.txt -o example.png [--size 224]
    echo "<StartDiagram> <Large> <Circle> <TopLeft> <EndDiagram>" | python renderer.py - -o x.png

Each of the four positions is a quadrant of side q = size/2. An element's
bounding box is 0.80q / 0.55q / 0.30q (Large / Medium / Small), centred in its
quadrant. `Style()` is the nominal look (black 3 px outline on white);
`random_style(rng)` samples the envelope SPEC allows when augmenting; with wide=True,
also inks and grounds of any colour with enough contrast (dark mode) and pen strokes.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass

import math

import numpy as np
from PIL import Image, ImageDraw

import dsl
import files
import ink_fit

SIZE_JITTER = 0.03  # +- fraction of q on the side
CENTRE_JITTER = 0.06  # +- fraction of q on each axis


@dataclass(frozen=True)
class Style:
    filled: bool = False
    stroke: int = 3  # outline width in pixels (ignored when filled)
    colour: tuple[int, int, int] = (0, 0, 0)
    background: tuple[int, int, int] = (255, 255, 255)
    jitter: bool = False  # move and resize each element within SPEC's jitter bounds
    pen: bool = False  # outlines drawn by hand: wobbly strokes that may not quite close


NOMINAL = Style()
MIN_CONTRAST = 90  # the least difference in grey level (0-255) between ink and ground
PEN_WOBBLE = 0.06  # a pen stroke strays from the outline by up to this share of the side


def grey(colour: tuple[int, int, int]) -> float:
    r, g, b = colour
    return 0.299 * r + 0.587 * g + 0.114 * b


def random_style(rng: random.Random, wide: bool = False) -> Style:
    """A style drawn from the envelope, with jitter. The classic one: outline 2-5 px or
    filled, a dark ink (each channel <= 100; its lightness drawn first, uniformly, so greys
    near 100 are as common as black), a light ground (each channel >= 220). The wide one
    (pictures people bring): outline 1-6 px (by pen, a third of outlines) or filled, in one
    of three looks: dark ink on a light ground (half), light ink on a dark ground (dark
    mode), or any ink on any ground that differ by MIN_CONTRAST in grey level."""
    if not wide:
        lightness = rng.randint(0, 100)
        return Style(filled=rng.random() < 0.5, stroke=rng.randint(2, 5),
                     colour=tuple(max(0, lightness - rng.randint(0, 50)) for _ in range(3)),
                     background=tuple(rng.randint(220, 255) for _ in range(3)), jitter=True)
    filled = rng.random() < 0.4
    look = rng.random()
    if look < 0.5:
        lightness = rng.randint(0, 100)
        colour = tuple(max(0, lightness - rng.randint(0, 50)) for _ in range(3))
        background = tuple(rng.randint(220, 255) for _ in range(3))
    elif look < 0.75:  # dark mode
        lightness = rng.randint(190, 255)
        colour = tuple(lightness - rng.randint(0, 40) for _ in range(3))
        background = tuple(rng.randint(0, 60) for _ in range(3))
    else:  # coloured ink on a coloured ground
        background = tuple(rng.randint(0, 255) for _ in range(3))
        colour = background
        while abs(grey(colour) - grey(background)) < MIN_CONTRAST:
            colour = tuple(rng.randint(0, 255) for _ in range(3))
    return Style(filled=filled, stroke=rng.randint(1, 6), colour=colour, background=background, jitter=True,
                 pen=not filled and rng.random() < 1 / 3)


def element_box(element: dsl.Element, size: int, style: Style = NOMINAL,
                rng: random.Random | None = None) -> tuple[float, float, float]:
    """(centre x, centre y, side) in pixels of an element's bounding box."""
    q = size / 2
    side = dsl.SIDE_FRACTION[element.size] * q
    column, row = dsl.QUADRANT_OFFSET[element.position]
    cx, cy = (column + 0.5) * q, (row + 0.5) * q
    if style.jitter:
        rng = rng or random.Random()
        side += rng.uniform(-SIZE_JITTER, SIZE_JITTER) * q
        # The shape stays inside its quadrant: at most the slack left by its size.
        room = min(CENTRE_JITTER * q, (q - side) / 2)
        cx += rng.uniform(-room, room)
        cy += rng.uniform(-room, room)
    return cx, cy, side


def render(diagram: dsl.Diagram, size: int = 224, style: Style = NOMINAL,
           rng: random.Random | None = None) -> Image.Image:
    """An RGB image of the diagram. `rng` drives the jitter (when the style has it)."""
    image = Image.new("RGB", (size, size), style.background)
    draw = ImageDraw.Draw(image)
    for element in diagram.elements:
        cx, cy, side = element_box(element, size, style, rng)
        # Pixel edges: the box covers pixels left..right inclusive, `side` pixels wide.
        left, top = round(cx - side / 2), round(cy - side / 2)
        right, bottom = left + round(side) - 1, top + round(side) - 1
        fill = style.colour if style.filled else None
        outline = None if style.filled else style.colour
        width = 0 if style.filled else style.stroke
        if style.pen:
            points = pen_stroke(outline_points(element.shape, left, top, right, bottom), side, rng or random.Random())
            draw.line(points, fill=style.colour, width=style.stroke, joint="curve")
        elif element.shape == "Circle":
            draw.ellipse((left, top, right, bottom), fill=fill, outline=outline, width=width)
        elif element.shape == "Square":
            draw.rectangle((left, top, right, bottom), fill=fill, outline=outline, width=width)
        else:  # isosceles triangle, apex up, base and height = side
            apex = ((left + right) / 2, top)
            draw.polygon((apex, (right, bottom), (left, bottom)), fill=fill, outline=outline, width=width)
    return image


def outline_points(shape: str, left: float, top: float, right: float, bottom: float) -> list[tuple[float, float]]:
    """The shape's outline as a closed path of points, about one every 2 pixels."""
    if shape == "Circle":
        cx, cy, rx, ry = (left + right) / 2, (top + bottom) / 2, (right - left) / 2, (bottom - top) / 2
        n = max(12, round(math.pi * (rx + ry)))
        return [(cx + rx * math.cos(2 * math.pi * i / n), cy + ry * math.sin(2 * math.pi * i / n)) for i in range(n + 1)]
    corners = ([(left, top), (right, top), (right, bottom), (left, bottom)] if shape == "Square"
               else [((left + right) / 2, top), (right, bottom), (left, bottom)])
    path = []
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
        n = max(2, round(math.hypot(x1 - x0, y1 - y0) / 2))
        path += [(x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n) for i in range(n)]
    return path + path[:1]


def pen_stroke(path: list[tuple[float, float]], side: float, rng: random.Random) -> list[tuple[float, float]]:
    """A closed path as a hand draws it: a slow wobble of up to PEN_WOBBLE of the side on each
    axis, starting anywhere, ending up to 8% of the way short of the start or past it."""
    n = len(path) - 1
    start = rng.randrange(n)
    end = n + round(rng.uniform(-0.08, 0.08) * n)  # a gap, or an overshoot
    waves = [(rng.uniform(-PEN_WOBBLE, PEN_WOBBLE) / 2 * side, rng.randint(1, 3), rng.uniform(0, 2 * math.pi))
             for _ in range(2)]
    stroke = []
    for i in range(end + 1):
        x, y = path[(start + i) % n]
        t = 2 * math.pi * i / n
        wobble = sum(amplitude * math.sin(frequency * t + phase) for amplitude, frequency, phase in waves)
        stroke.append((x + wobble, y + sum(a * math.cos(f * t + p) for a, f, p in waves)))
    return stroke


# ---------------------------------------------------------------------------- render and compare

def draw(diagram: dsl.Diagram, size: int, rng: random.Random, augment: bool | str) -> Image.Image:
    """A sampled diagram's picture (create_images.py): a style drawn from rng when augmenting,
    from the wide envelope where augment is "wide"."""
    return render(diagram, size, random_style(rng, wide=augment == "wide") if augment else NOMINAL, rng)


def picture(text: str, size: int) -> Image.Image:
    """A DSL text drawn nominally: the page's side-by-side."""
    return render(dsl.parse(text), size)


def agreement(image: Image.Image, prediction: str) -> float:
    """Render and compare: the share of quadrants where the prediction says what the picture's
    ink fits (ink_fit.py: the size and shape that fit each quadrant's ink, or no element where
    there is none); 0 for an output that does not parse."""
    diagram = dsl.parse_or_none(prediction)
    if diagram is None:
        return 0.0
    said = {e.position: (e.size, e.shape) for e in diagram.elements}
    return sum(said.get(position) == fit for position, fit in zip(dsl.POSITIONS, ink_fit.fitted(image))) / 4


def borderline(image: Image.Image, prediction: str) -> bool:
    """Whether the ink leaves some of the prediction undecided: a shape it says whose ink's side
    lies on the line between two sizes (ink_fit.sizes_undecided); False for one that does not parse."""
    diagram = dsl.parse_or_none(prediction)
    if diagram is None:
        return False
    undecided = ink_fit.sizes_undecided(image)
    return any(e.position in undecided for e in diagram.elements)


def ink_reading(image: Image.Image) -> str | None:
    """The reading the ink alone fits (ink_fit.py), a candidate beside the model's; None where
    it fits no element."""
    return ink_fit.reading(image)


def crop_to_canvas(image: Image.Image) -> Image.Image:
    """A picture whose diagram is smaller in the frame than its canvas, with no edge showing,
    cropped to the canvas its shapes' grid shows (ink_fit.py); as it is otherwise."""
    return ink_fit.crop_to_canvas(image)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Render a diagram DSL file to an image.")
    parser.add_argument("file", help="DSL file, or - for standard input")
    parser.add_argument("-o", "--output", required=True, help="image to write (PNG)")
    parser.add_argument("--size", type=int, default=224, help="canvas side in pixels")
    args = parser.parse_args(argv)
    if args.size < 8:
        parser.error(f"--size must be at least 8 pixels, not {args.size}")
    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as error:
        parser.exit(2, f"renderer.py: error: cannot read {args.file}: {error}\n")
    try:
        diagram = dsl.parse(text)
    except dsl.DSLParseError as error:
        name = "<stdin>" if args.file == "-" else args.file
        parser.exit(2, f"renderer.py: error: {name}: {error}\n")
    try:
        with files.replacing(args.output) as temporary:
            render(diagram, args.size).save(temporary)  # the temporary name keeps the suffix, the format
    except files.DiskFull as error:
        parser.exit(1, f"renderer.py: error: {error}\n")
    except (OSError, ValueError) as error:
        parser.exit(2, f"renderer.py: error: cannot write {args.output}: {error}\n")


if __name__ == "__main__":
    main()
