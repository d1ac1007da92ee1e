"""Draw a diagram as an image, inside docs/SPEC.md's rendering envelope.

    python renderer.py example.dsl.txt -o example.png [--size 224]
    echo "<StartDiagram> <Large> <Circle> <TopLeft> <EndDiagram>" | python renderer.py - -o x.png

Each of the four positions is a quadrant of side q = size/2. An element's
bounding box is 0.80q / 0.55q / 0.30q (Large / Medium / Small), centred in its
quadrant. `Style()` is the nominal look (black 3 px outline on white);
`random_style(rng)` samples the whole envelope SPEC allows when augmenting.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

import dsl
import files

SIDE_FRACTION = {"Large": 0.80, "Medium": 0.55, "Small": 0.30}  # of the quadrant side q
SIZE_JITTER = 0.03  # +- fraction of q on the side
CENTRE_JITTER = 0.06  # +- fraction of q on each axis
QUADRANT_OFFSET = {"TopLeft": (0, 0), "TopRight": (1, 0), "BottomLeft": (0, 1), "BottomRight": (1, 1)}


@dataclass(frozen=True)
class Style:
    filled: bool = False
    stroke: int = 3  # outline width in pixels (ignored when filled)
    colour: tuple[int, int, int] = (0, 0, 0)
    background: tuple[int, int, int] = (255, 255, 255)
    jitter: bool = False  # move and resize each element within SPEC's jitter bounds


NOMINAL = Style()


def random_style(rng: random.Random) -> Style:
    """A style drawn from the whole envelope: outline 2-5 px or filled, a dark colour
    (each channel <= 100), a light background (each channel >= 220), with jitter. The
    ink's lightness is drawn first, uniformly, so the lightest allowed inks (greys near
    100) are as common as black: with each channel drawn alone they would be rare."""
    lightness = rng.randint(0, 100)
    return Style(
        filled=rng.random() < 0.5,
        stroke=rng.randint(2, 5),
        colour=tuple(max(0, lightness - rng.randint(0, 50)) for _ in range(3)),
        background=tuple(rng.randint(220, 255) for _ in range(3)),
        jitter=True,
    )


def element_box(element: dsl.Element, size: int, style: Style = NOMINAL,
                rng: random.Random | None = None) -> tuple[float, float, float]:
    """(centre x, centre y, side) in pixels of an element's bounding box."""
    q = size / 2
    side = SIDE_FRACTION[element.size] * q
    column, row = QUADRANT_OFFSET[element.position]
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
        if element.shape == "Circle":
            draw.ellipse((left, top, right, bottom), fill=fill, outline=outline, width=width)
        elif element.shape == "Square":
            draw.rectangle((left, top, right, bottom), fill=fill, outline=outline, width=width)
        else:  # isosceles triangle, apex up, base and height = side
            apex = ((left + right) / 2, top)
            draw.polygon((apex, (right, bottom), (left, bottom)), fill=fill, outline=outline, width=width)
    return image


# ---------------------------------------------------------------------------- render and compare

def draw(diagram: dsl.Diagram, size: int, rng: random.Random, augment: bool) -> Image.Image:
    """A sampled diagram's picture (create_images.py): a style drawn from rng when augmenting."""
    return render(diagram, size, random_style(rng) if augment else NOMINAL, rng)


def picture(text: str, size: int) -> Image.Image:
    """A DSL text drawn nominally: the page's side-by-side."""
    return render(dsl.parse(text), size)


def ink_by_quadrant(image: Image.Image) -> list[bool]:
    """Per quadrant (TopLeft, TopRight, BottomLeft, BottomRight): is anything drawn there?
    Ink is a pixel much darker than the picture's median (its background), and a quadrant
    has some when over 0.5% of its pixels are ink (a small thin outline is ~2%)."""
    grey = np.asarray(image.convert("L"), dtype=float)
    ink = grey < np.median(grey) - 60
    half_h, half_w = ink.shape[0] // 2, ink.shape[1] // 2
    quadrants = [ink[:half_h, :half_w], ink[:half_h, half_w:], ink[half_h:, :half_w], ink[half_h:, half_w:]]
    return [q.mean() > 0.005 for q in quadrants]


def agreement(image: Image.Image, prediction: str) -> float:
    """Render and compare: the share of quadrants where the picture has ink exactly where the
    prediction, drawn here, has an element (0 for an output that does not parse)."""
    diagram = dsl.parse_or_none(prediction)
    if diagram is None:
        return 0.0
    drawn = ink_by_quadrant(render(diagram, image.width))
    return sum(a == b for a, b in zip(ink_by_quadrant(image), drawn)) / 4


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
