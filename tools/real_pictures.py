"""Test sets of the pictures people bring: sketches, phone photos, wide margins, dark mode.

    python -m tools.real_pictures --out real --seed 0                            # draw every kind
    python -m tools.real_pictures --out real --checkpoint checkpoints            # and read them, scored
    python inference.py --checkpoint checkpoints --csv real/sketch/data.csv --eval   # one kind, as any data file

Each kind is a folder under --out with `images/` and `data.csv` (`image_path,dsl`, as
docs/SPEC.md's data files), --num pictures of --size pixels. Every diagram is one of the
held-out test diagrams (`dsl.held_out_diagrams`: no training set holds them), --num different
ones drawn with the seed, the same list for every kind, so that the kinds differ by their
look alone. Each picture's look comes from its own generator (seed, kind, index): the same
arguments write the same files, byte for byte.

The drawing is this module's own, from docs/SPEC.md's meaning of the DSL (sides 0.80, 0.55,
0.30 of a quadrant; centred in it; the triangle's apex up), with PIL and numpy; it shares no
code with renderer.py, damage.py or tools/other_renderer.py, so a model trained on their
pictures meets a drawing it has never seen. The kinds:

- `sketch`: drawn by hand with one pen per picture (ballpoint, fineliner, felt tip, marker,
  pencil; black, blue, red, green, grey inks; strokes 1.5 to 5 px, pressure varying along
  them), outline only: wobbly polylines (a slow bow, a few low waves, a little tremor),
  circles slightly oval and drifting, squares and triangles as one stroke around or a stroke
  per side, never closed exactly (a gap or an overshoot at the end of the stroke, sides
  stopping short of or crossing at the corners); sizes and centres drawn from the whole
  rendering envelope (side within 0.03 q of nominal, centre within 0.06 q), on off-white
  paper with a little grain.
- `photo`: a printed sheet or a screen showing the diagram (inside the envelope), taken with
  a phone: perspective (each corner moved up to 5% of the side; the desk or the bezel shows
  where the sheet does not reach), uneven light (a gradient and a vignette), exposure and a
  colour cast (warm, cool, greenish), lifted blacks, a slight blur, noise and JPEG
  compression; a screen also has its pixel grid, which the camera's resampling turns into
  moire, and sometimes glare.
- `margin_edge`: the diagram's canvas (its sheet) is 70 to 95% of the frame's side, near the
  middle, on a surround of another colour (a desk, a mat, a dark table), sometimes with a
  shadow: the canvas edge shows, so sizes are still read against it.
- `margin_no_edge`: the canvas is 70 to 100% of the frame's side and the margin around it is
  the background's own colour: nothing shows where the canvas ends, so an element's size
  relative to the canvas cannot be seen (a Large circle on a 70% canvas is 0.56 of the frame's
  quadrant, a Medium one's size). Size is ill-posed there, and this tool scores that kind by
  shape and position only (`shape_position_scores`: every element's shape and position right,
  sizes ignored), beside the usual scores. In both margin kinds the canvas sits so that each
  of its quadrants' centres stays within 0.2 q of the frame's quadrant's centre (q: half the
  frame's side), so that positions still read.
- `dark`: half dark mode (light ink on a near-black ground, as editors and slides draw it)
  and half coloured ink on a coloured ground, the two at a contrast ratio of at least 4.5
  (WCAG's, for text) and 7 in dark mode, and at least 90 grey levels apart; outlines of 2
  to 5 px or filled shapes.

With --checkpoint it reads each kind with the model (`inference.read`) and prints per kind:
n, exact match, element F1 (the language's score), valid rate, for margin_no_edge exact
match on shape and position only, and how good the doubt flag is there (the flag: the
confidence or the picture head's probability of the reading below 0.5, the ink fitting
another reading or leaving a size undecided while either is under inference.SURE, or the
reading taken from the ink over the model's): the share of wrong
readings it catches and the share of right readings it flags (right: exact match; for
margin_no_edge: shape and position right), and the expected calibration error of the
confidence against the same rightness; then the flag and the calibration over all kinds
together. The last line is one JSON object with all of it, to paste into docs/LOG.md.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

import data
import dsl
import files
import settings
from settings import setting

KINDS = ("sketch", "photo", "margin_edge", "margin_no_edge", "dark")
SCORED_BY_SHAPE_AND_POSITION = ("margin_no_edge",)  # where size cannot be seen
DOUBT_CONFIDENCE = 0.5  # the doubt flag: confidence or picture check below this (inference.doubts)

# docs/SPEC.md's rendering envelope, in quadrants (q = half the canvas side).
QUADRANT_SHARE = {"Large": 0.80, "Medium": 0.55, "Small": 0.30}  # side of the bounding box
SIDE_SLACK, CENTRE_SLACK = 0.03, 0.06  # how far each may stray, in q
SUPERSAMPLE = 4  # masks are drawn at 4x the picture and shrunk: smooth edges
GREY_APART = 90  # the least difference of ink and ground in grey level (0-255) in `dark`


@dataclass
class Arguments:
    out: str = setting("real", "the folder that gets one folder per kind, each with images/ and data.csv")
    num: int = setting(300, "pictures per kind: different held-out diagrams, the same list for every kind")
    seed: int = setting(0, "seeds the diagrams and every picture's look")
    size: int = setting(224, "picture side in pixels (docs/SPEC.md's W)")
    kinds: list[str] = setting(list(KINDS), "which kinds to draw (and read): " + ", ".join(KINDS))
    checkpoint: str = setting("", "a run folder or checkpoint: also read every set with it and print the scores")
    batch_size: int = setting(0, "pictures read together (with --checkpoint); 0: inference.read's default")
    find_canvas: bool = setting(True, "read as inference.py --find_canvas: crop to the canvas the shapes show")
    device: str = setting("auto", "auto (cuda when there is one), cpu, cuda, ... (with --checkpoint)")
    dtype: str = setting("auto", "auto (the fastest safe one here, by measurement), float32, bfloat16, float16")

    def __post_init__(self):
        held_out = len(dsl.held_out_diagrams())
        settings.check(1 <= self.num <= held_out, "num", self.num, f"1 to {held_out} (the held-out diagrams)")
        settings.check(self.size >= 32, "size", self.size, "at least 32 pixels")
        settings.check(self.batch_size >= 0, "batch_size", self.batch_size, "0 (the default) or more")
        unknown = [k for k in self.kinds if k not in KINDS]
        settings.check(not unknown and self.kinds, "kinds", " ".join(self.kinds), "some of " + ", ".join(KINDS))


# ---------------------------------------------------------------------------- diagrams

def held_out_sample(num: int, seed: int) -> list[dsl.Diagram]:
    """`num` different held-out diagrams, element counts drawn as dsl.sample_diagram draws
    them (uniform 1 to 4, while a count has diagrams left)."""
    held_out = dsl.held_out_diagrams()
    if num > len(held_out):
        raise ValueError(f"{num} diagrams asked for; {len(held_out)} are held out")
    rng = random.Random(f"{seed}:real_pictures")
    chosen: dict[dsl.Diagram, None] = {}
    while len(chosen) < num:
        diagram = dsl.sample_diagram(rng)
        if diagram in held_out:
            chosen.setdefault(diagram)
    return list(chosen)


@dataclass(frozen=True)
class Placed:
    """An element on its canvas, in canvas units (the canvas side is 1; y grows downwards):
    its bounding box's centre and side."""

    shape: str
    x: float
    y: float
    side: float


def place(diagram: dsl.Diagram, rng: random.Random) -> list[Placed]:
    """Each element's box: its nominal side and centre, each moved within the envelope's
    allowance (uniform), so that it still reads as its size and quadrant."""
    placed = []
    for element in diagram.elements:
        column = 1 if element.position.endswith("Right") else 0
        row = 1 if element.position.startswith("Bottom") else 0
        side = (QUADRANT_SHARE[element.size] + rng.uniform(-SIDE_SLACK, SIDE_SLACK)) / 2
        x = (column + 0.5 + rng.uniform(-CENTRE_SLACK, CENTRE_SLACK)) / 2
        y = (row + 0.5 + rng.uniform(-CENTRE_SLACK, CENTRE_SLACK)) / 2
        placed.append(Placed(element.shape, x, y, side))
    return placed


def corners(shape: str, x: float, y: float, side: float) -> list[tuple[float, float]]:
    """The polygon of a square or triangle (apex up, base and height equal to the side),
    clockwise on the screen from the top left (square) or the apex (triangle)."""
    h = side / 2
    if shape == "Square":
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    return [(x, y - h), (x + h, y + h), (x - h, y + h)]


# ---------------------------------------------------------------------------- colour and masks

def luminance(rgb) -> float:
    """WCAG's relative luminance of an sRGB colour (0-255 channels)."""
    def linear(c):
        c = c / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (linear(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a, b) -> float:
    """WCAG's contrast ratio, 1 to 21."""
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def grey(rgb) -> float:
    """The grey level (0-255) of a colour, as a greyscale conversion (ITU-R 601) gives it."""
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def shrink(mask: Image.Image, size: int) -> np.ndarray:
    """A supersampled coverage mask at the picture's size, as floats 0 to 1."""
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255


def paint(ground: np.ndarray, coverage: np.ndarray, ink, opacity: float = 1.0) -> np.ndarray:
    """Ink laid over a ground (H x W x 3 floats) where the coverage says, by its share."""
    a = np.clip(coverage * opacity, 0, 1)[..., None]
    return ground * (1 - a) + np.asarray(ink, dtype=np.float32) * a


def to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def flat(size: int, colour) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, dtype=np.float32), (size, size, 3)).copy()


def solid_mask(placed: list[Placed], big: int, to_pixels, width: float, filled: bool) -> Image.Image:
    """Clean shapes as a coverage mask of side `big`: each shape filled, or its outline as
    the band between the shape grown and shrunk by half the width (circles by their radius,
    polygons about their incentre). `to_pixels(x, y)` maps canvas units to mask pixels;
    `width` is in mask pixels."""
    mask = Image.new("L", (big, big), 0)
    pen = ImageDraw.Draw(mask)
    for p in placed:
        (x, y), (x1, _) = to_pixels(p.x, p.y), to_pixels(p.x + p.side / 2, p.y)
        half = x1 - x  # half the side, in mask pixels
        bands = [(half, 255)] if filled else [(half + width / 2, 255), (half - width / 2, 0)]
        for extent, value in bands:
            if extent <= 0:
                continue
            if p.shape == "Circle":
                pen.ellipse((x - extent, y - extent, x + extent, y + extent), fill=value)
                continue
            points = [to_pixels(*c) for c in corners(p.shape, p.x, p.y, p.side)]
            if p.shape == "Square":
                centre, inradius = (x, y), half
            else:  # the incentre of the triangle, and its inradius, in mask pixels
                sides = [math.dist(points[(i + 1) % 3], points[(i + 2) % 3]) for i in range(3)]
                centre = tuple(sum(s * pt[k] for s, pt in zip(sides, points)) / sum(sides) for k in (0, 1))
                area = abs((points[1][0] - points[0][0]) * (points[2][1] - points[0][1])
                           - (points[2][0] - points[0][0]) * (points[1][1] - points[0][1])) / 2
                inradius = 2 * area / sum(sides)
            scale = (inradius + extent - half) / inradius
            if scale > 0:
                pen.polygon([(centre[0] + scale * (px - centre[0]), centre[1] + scale * (py - centre[1]))
                             for px, py in points], fill=value)
    return mask


def canvas_mapping(big: int, left: float = 0.0, top: float = 0.0, side: float = 1.0):
    """Canvas units to the pixels of a mask of side `big`, the canvas at (left, top) of the
    frame with that side (all in shares of the frame)."""
    return lambda x, y: ((left + side * x) * big, (top + side * y) * big)


def clean_look(rng: random.Random) -> dict:
    """A look from inside the rendering envelope: dark ink on a light ground, an outline 2 to
    5 px or filled (in pixels of the picture)."""
    darkest = rng.uniform(0, 100)
    return {"ink": tuple(round(max(0.0, darkest - rng.uniform(0, 25))) for _ in range(3)),
            "ground": tuple(rng.randint(225, 255) for _ in range(3)),
            "width": rng.uniform(2, 5), "filled": rng.random() < 0.25}


# ---------------------------------------------------------------------------- sketch

# (name, ink, stroke widths in px at 224, opacity, grain): one pen per picture.
PENS = (("ballpoint", (25, 40, 120), (1.5, 2.5), 0.95, 0.15),
        ("fineliner", (20, 20, 25), (1.5, 2.5), 1.0, 0.0),
        ("felt tip", (20, 30, 85), (2.5, 4.0), 1.0, 0.05),
        ("marker", (15, 15, 15), (3.5, 5.0), 0.95, 0.1),
        ("pencil", (55, 55, 60), (1.5, 2.5), 0.8, 0.45),
        ("red pen", (115, 25, 30), (1.8, 3.0), 1.0, 0.05),
        ("green pen", (20, 75, 40), (1.8, 3.0), 1.0, 0.05))


def waves(n: int, amplitude: float, rng: random.Random) -> np.ndarray:
    """Smooth offsets along a stroke of n points: a few low waves and a little tremor."""
    t = np.linspace(0, 1, n)
    offsets = np.zeros(n)
    for cycles, share in ((rng.uniform(0.3, 1.2), 0.55), (rng.uniform(1.5, 3.0), 0.3), (rng.uniform(4, 7), 0.15)):
        offsets += share * np.sin(2 * np.pi * cycles * t + rng.uniform(0, 6.3))
    tremor = np.array([rng.gauss(0, 1) for _ in range(n)])
    tremor = np.convolve(tremor, np.ones(3) / 3, mode="same")
    return amplitude * (offsets + 0.15 * tremor)


def line_stroke(start, end, side: float, rng: random.Random) -> np.ndarray:
    """A hand-drawn straight line: a slight bow and waves across it."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    length = float(np.linalg.norm(end - start))
    n = max(12, int(40 * length / max(side, 1e-6)))
    t = np.linspace(0, 1, n)[:, None]
    normal = np.array([-(end - start)[1], (end - start)[0]]) / max(length, 1e-9)
    across = rng.uniform(-0.03, 0.03) * length * 4 * t[:, 0] * (1 - t[:, 0]) + waves(n, 0.018 * side, rng)
    return start + t * (end - start) + across[:, None] * normal


def polygon_strokes(points: list[tuple[float, float]], side: float, rng: random.Random) -> list[np.ndarray]:
    """A square or triangle by hand: corners a little off; either one stroke around, ending
    short of its start or past it, or one stroke per side, each stopping short of its corners
    or crossing them."""
    points = [(px + rng.gauss(0, 0.015) * side, py + rng.gauss(0, 0.015) * side) for px, py in points]
    start = rng.randrange(len(points))
    order = points[start:] + points[:start]
    if rng.random() < 0.5:
        order = order[:1] + order[:0:-1]  # counter-clockwise
    n = len(order)
    if rng.random() < 0.5:
        # One stroke around: the last side ends a gap before the start, or runs past it.
        miss = rng.choice((-1, 1)) * rng.uniform(0.04, 0.12)
        pieces = []
        for i in range(n):
            a, b = np.asarray(order[i]), np.asarray(order[(i + 1) % n])
            if i == n - 1:
                b = b + miss * (b - a) / np.linalg.norm(b - a) * side
            pieces.append(line_stroke(a, b, side, rng)[(1 if i else 0):])
        return [np.concatenate(pieces)]
    strokes = []
    for i in range(n):
        a, b = np.asarray(order[i]), np.asarray(order[(i + 1) % n])
        along = (b - a) / np.linalg.norm(b - a)
        a = a - rng.uniform(-0.04, 0.08) * side * along  # negative: stops short of the corner
        b = b + rng.uniform(-0.04, 0.08) * side * along
        strokes.append(line_stroke(a, b, side, rng))
    return strokes


def circle_stroke(x: float, y: float, side: float, rng: random.Random) -> np.ndarray:
    """A circle by hand: one stroke, a little oval and tilted, its radius drifting, ending a
    gap short of its start or past it."""
    miss = rng.choice((-1, 1)) * rng.uniform(0.15, 0.5)  # radians
    n = 90
    start = rng.uniform(0, 2 * np.pi)
    theta = start + np.linspace(0, 2 * np.pi + miss, n) * rng.choice((-1, 1))
    radius = side / 2 * (1 + np.linspace(0, rng.uniform(-0.05, 0.05), n)) + waves(n, 0.018 * side, rng)
    squash, tilt = rng.uniform(0.94, 1.0), rng.uniform(0, np.pi)
    u, v = radius * np.cos(theta), radius * squash * np.sin(theta)
    return np.stack([x + u * math.cos(tilt) - v * math.sin(tilt), y + u * math.sin(tilt) + v * math.cos(tilt)], 1)


def draw_stroke(pen: ImageDraw.ImageDraw, points: np.ndarray, width: float, rng: random.Random):
    """A polyline of varying width (pen pressure, lighter at the ends), joints rounded."""
    n = len(points)
    t = np.linspace(0, 1, n)
    pressure = 0.85 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t + rng.uniform(0, 6.3))
    pressure *= np.minimum(1, 0.6 + 0.4 * np.minimum(t, 1 - t) * n / 6)  # taper over the first and last points
    for i in range(n - 1):
        w = width * pressure[i]
        (x0, y0), (x1, y1) = points[i], points[i + 1]
        pen.line((x0, y0, x1, y1), fill=255, width=max(1, round(w)))
        pen.ellipse((x1 - w / 2, y1 - w / 2, x1 + w / 2, y1 + w / 2), fill=255)


def sketch(diagram: dsl.Diagram, size: int, rng: random.Random) -> tuple[Image.Image, str]:
    name, ink, widths, opacity, grain = rng.choice(PENS)
    ink = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in ink)
    width = rng.uniform(*widths) * size / 224
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    pen = ImageDraw.Draw(mask)
    for p in place(diagram, rng):
        if p.shape == "Circle":
            strokes = [circle_stroke(p.x, p.y, p.side, rng)]
        else:
            strokes = polygon_strokes(corners(p.shape, p.x, p.y, p.side), p.side, rng)
        for stroke in strokes:
            draw_stroke(pen, stroke * big, width * SUPERSAMPLE, rng)
    noise = np.random.default_rng(rng.getrandbits(64))
    white, warmth = rng.uniform(236, 252), rng.uniform(0, 8)  # white to a little cream
    paper = flat(size, (min(255.0, white + warmth / 2), white, white - warmth))
    paper += noise.normal(0, 1.5, (size, size, 1)).astype(np.float32)
    coverage = shrink(mask, size)
    if grain:
        coverage = coverage * (1 - grain * noise.random((size, size), dtype=np.float32))
    return to_image(paint(paper, coverage, ink, opacity)), name.replace(" ", "_")


# ---------------------------------------------------------------------------- photo

def perspective(output_corners, input_corners) -> tuple[float, ...]:
    """PIL's PERSPECTIVE data: for each output pixel, the input pixel it shows."""
    rows, values = [], []
    for (u, v), (x, y) in zip(output_corners, input_corners):
        rows += [[u, v, 1, 0, 0, 0, -x * u, -x * v], [0, 0, 0, u, v, 1, -y * u, -y * v]]
        values += [x, y]
    return tuple(np.linalg.solve(np.array(rows, float), np.array(values, float)))


def photo(diagram: dsl.Diagram, size: int, rng: random.Random) -> tuple[Image.Image, str]:
    screen = rng.random() < 0.5
    look = clean_look(rng)
    noise = np.random.default_rng(rng.getrandbits(64))
    source = 2 * size  # the sheet or screen, at twice the photo's resolution
    ground = look["ground"]
    if screen:  # screens are whiter and a little blue
        ground = (rng.randint(232, 250), rng.randint(238, 252), rng.randint(245, 255))
    mask = solid_mask(place(diagram, rng), source * 2, canvas_mapping(source * 2), look["width"] * 4, look["filled"])
    sheet = paint(flat(source, ground), shrink(mask, source), look["ink"])
    if screen:  # its pixel grid, RGB stripes and dark rows, near 2 source pixels: the photo's
        # sampling (one pixel per 2 source pixels, perspective) folds it into slow bands, moire
        pitch, depth = rng.uniform(1.8, 2.25), rng.uniform(0.1, 0.3)
        ys, xs = np.mgrid[0:source, 0:source].astype(np.float32)
        for channel in range(3):
            stripe = 0.5 + 0.5 * np.cos(2 * np.pi * (xs / pitch - channel / 3))
            sheet[..., channel] *= 1 - depth * (1 - stripe)
        sheet *= (1 - 0.5 * depth * (0.5 + 0.5 * np.cos(2 * np.pi * ys / pitch)))[..., None]
    surround = ((rng.randint(10, 35),) * 3 if screen else
                rng.choice(((150, 110, 70), (120, 120, 125), (70, 60, 55), (180, 170, 150))))
    framed = [(rng.uniform(-0.05, 0.05) * size + cx, rng.uniform(-0.05, 0.05) * size + cy)
              for cx, cy in ((0, 0), (size, 0), (size, size), (0, size))]
    picture = to_image(sheet).transform((size, size), Image.Transform.PERSPECTIVE,
                                        perspective(framed, [(0, 0), (source, 0), (source, source), (0, source)]),
                                        Image.Resampling.BILINEAR, fillcolor=surround)
    pixels = np.asarray(picture, dtype=np.float32)
    ys, xs = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    light = 1 - rng.uniform(0.08, 0.3) * (0.5 + xs * math.cos(angle) + ys * math.sin(angle))  # a gradient
    light *= 1 - rng.uniform(0.1, 0.35) * (xs ** 2 + ys ** 2) * 2  # a vignette
    if screen and rng.random() < 0.4:  # glare
        gx, gy, spread = rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), rng.uniform(0.1, 0.25)
        light += rng.uniform(0.05, 0.15) * np.exp(-((xs - gx) ** 2 + (ys - gy) ** 2) / (2 * spread ** 2))
    cast = rng.choice(((1.0, 0.94, 0.8), (0.86, 0.95, 1.0), (0.93, 1.0, 0.9), (1.0, 1.0, 1.0)))
    cast = np.array([c * rng.uniform(0.97, 1.03) for c in cast], dtype=np.float32)
    exposure, lift = rng.uniform(0.8, 1.05), rng.uniform(8, 30)
    pixels = lift + pixels * (1 - lift / 255) * light[..., None] * cast * exposure
    picture = to_image(pixels).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * size / 224))
    pixels = np.asarray(picture, dtype=np.float32)
    pixels += noise.normal(0, rng.uniform(2, 6), (size, size, 1)) + noise.normal(0, 1.5, (size, size, 3))
    buffer = io.BytesIO()
    to_image(pixels).save(buffer, "JPEG", quality=rng.randint(60, 92))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB"), "screen" if screen else "print"


# ---------------------------------------------------------------------------- margins

SURROUNDS = ((150, 108, 68), (110, 80, 55), (105, 105, 110), (60, 60, 65), (30, 32, 36), (45, 95, 70),
             (60, 80, 130), (150, 150, 145))  # wood, dark wood, grey, dark grey, black, a mat, blue, concrete


def margin(diagram: dsl.Diagram, size: int, rng: random.Random, edge: bool) -> tuple[Image.Image, str]:
    """The canvas (side 70-95% of the frame with an edge, 70-100% without) near the frame's
    middle: moved at most so far that each of its quadrants' centres stays within 0.2 q of the
    frame's quadrant's centre (a 70% canvas, centred, puts them 0.15 q off)."""
    look = clean_look(rng)
    share = rng.uniform(0.70, 0.95 if edge else 1.0)
    reach = max(0.0, min((1 - share) / 2, share / 4 - 0.15))
    left, top = ((1 - share) / 2 + rng.uniform(-reach, reach) for _ in range(2))
    big = size * SUPERSAMPLE
    mapping = canvas_mapping(big, left, top, share)
    mask = solid_mask(place(diagram, rng), big, mapping, look["width"] * SUPERSAMPLE, look["filled"])
    if not edge:
        return to_image(paint(flat(size, look["ground"]), shrink(mask, size), look["ink"])), f"{round(100 * share)}pct"
    surround = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in rng.choice(SURROUNDS))
    pixels = flat(size, surround)
    (x0, y0), (x1, y1) = mapping(0, 0), mapping(1, 1)
    if rng.random() < 0.5:  # a soft shadow under the sheet, down and to one side
        shadow = Image.new("L", (big, big), 0)
        dx, dy = rng.uniform(-3, 3) * SUPERSAMPLE, rng.uniform(1, 4) * SUPERSAMPLE
        ImageDraw.Draw(shadow).rectangle((x0 + dx, y0 + dy, x1 + dx, y1 + dy), fill=255)
        shadow = shadow.filter(ImageFilter.GaussianBlur(2 * SUPERSAMPLE))
        pixels = paint(pixels, shrink(shadow, size), (0, 0, 0), 0.45)
    sheet = Image.new("L", (big, big), 0)
    ImageDraw.Draw(sheet).rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    pixels = paint(pixels, shrink(sheet, size), look["ground"])
    return to_image(paint(pixels, shrink(mask, size), look["ink"])), f"{round(100 * share)}pct"


# ---------------------------------------------------------------------------- dark

def dark(diagram: dsl.Diagram, size: int, rng: random.Random) -> tuple[Image.Image, str]:
    """Dark mode (a near-black ground, light ink; contrast at least 7) or coloured ink on a
    coloured ground (both saturated; contrast at least 4.5); in both, ink and ground at least
    GREY_APART grey levels apart (WCAG's ratio alone lets a few coloured pairs be as close as 65)."""
    dark_mode = rng.random() < 0.5
    while True:
        if dark_mode:
            base = rng.randint(10, 48)
            ground = tuple(min(255, max(0, base + rng.randint(-8, 12))) for _ in range(3))
            ink = hsv(rng.random(), rng.choice((0.0, rng.uniform(0, 0.5))), rng.uniform(0.78, 1.0))
            enough = 7.0
        else:
            hue = rng.random()
            ground = hsv(hue, rng.uniform(0.3, 0.9), rng.uniform(0.25, 1.0))
            ink = hsv(hue + rng.uniform(0.15, 0.85), rng.uniform(0.4, 1.0), rng.uniform(0.2, 1.0))
            enough = 4.5
        if contrast(ground, ink) >= enough and abs(grey(ground) - grey(ink)) >= GREY_APART:
            break
    width, filled = rng.uniform(2, 5), rng.random() < 0.25
    big = size * SUPERSAMPLE
    mask = solid_mask(place(diagram, rng), big, canvas_mapping(big), width * SUPERSAMPLE, filled)
    return to_image(paint(flat(size, ground), shrink(mask, size), ink)), "dark_mode" if dark_mode else "coloured"


# ---------------------------------------------------------------------------- the sets

def draw(kind: str, diagram: dsl.Diagram, size: int, seed: int, index: int) -> tuple[Image.Image, str]:
    """Picture `index` of a kind, and its variant (the pen, print or screen, the canvas's
    share, dark mode or coloured): its look from its own generator, so any one picture can be
    drawn again alone."""
    rng = random.Random(f"{seed}:{kind}:{index}")
    if kind == "sketch":
        return sketch(diagram, size, rng)
    if kind == "photo":
        return photo(diagram, size, rng)
    if kind in ("margin_edge", "margin_no_edge"):
        return margin(diagram, size, rng, edge=kind == "margin_edge")
    if kind == "dark":
        return dark(diagram, size, rng)
    raise ValueError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")


def write_kind(folder: Path, kind: str, diagrams: list[dsl.Diagram], size: int, seed: int) -> list[Path]:
    """Each picture, then the CSV naming them (files.py: whole or absent); an older CSV is
    removed first, as it would name pictures about to change, and so are the pictures of an
    earlier run (their names carry their variant: another seed's would stay beside)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "data.csv").unlink(missing_ok=True)
    files.recover(folder / "images")
    for old in (folder / "images").glob("[0-9][0-9][0-9][0-9][0-9]_*.png"):  # an earlier run's pictures
        old.unlink()
    rows, paths = [], []
    for index, diagram in enumerate(diagrams):
        picture, variant = draw(kind, diagram, size, seed, index)
        name = f"images/{index:05d}_{variant}.png"
        with files.replacing(folder / name, durable=False) as temporary:  # synced all at once below
            picture.save(temporary)
        rows.append([name, dsl.to_text(diagram)])
        paths.append(folder / name)
    os.sync()
    data.write_csv(folder / "data.csv", rows)
    return paths


# ---------------------------------------------------------------------------- scores

def shape_position_scores(predictions: list[str], references: list[str]) -> dict:
    """Scores that ignore sizes: exact match on (shape, position) pairs (every element's
    shape and position right, none missing or extra) and their F1, micro-averaged; an output
    that does not parse is wrong and predicts nothing."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    exact = true_positives = predicted_count = reference_count = 0
    for prediction, reference in zip(predictions, references):
        parsed = dsl.parse_or_none(prediction)
        predicted = {(e.shape, e.position) for e in parsed.elements} if parsed else set()
        wanted = {(e.shape, e.position) for e in dsl.parse(reference).elements}
        exact += parsed is not None and predicted == wanted
        true_positives += len(predicted & wanted)
        predicted_count += len(predicted)
        reference_count += len(wanted)
    precision = true_positives / predicted_count if predicted_count else 0.0
    recall = true_positives / reference_count if reference_count else 0.0
    n = len(references)
    return {"n": n, "shape_position_exact": exact / n if n else 0.0,
            "shape_position_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}


def doubtful(reading) -> bool:
    """inference.py's doubt flag at --flag_below DOUBT_CONFIDENCE: any of inference.doubts."""
    import inference  # here, not at the top: drawing alone needs neither torch nor the model's code

    return inference.doubtful(reading, DOUBT_CONFIDENCE)


def flag_quality(right: list[bool], flagged: list[bool]) -> dict:
    """How good a flag is: the share of wrong readings it catches, the share of right ones it
    flags (None where there are none), and the counts behind them."""
    wrong = [f for r, f in zip(right, flagged) if not r]
    fine = [f for r, f in zip(right, flagged) if r]
    return {"wrong": len(wrong), "catches_wrong": sum(wrong) / len(wrong) if wrong else None,
            "right": len(fine), "flags_right": sum(fine) / len(fine) if fine else None,
            "flagged": sum(flagged) / len(flagged) if flagged else None}


def judged_right(kind: str, predictions: list[str], references: list[str], language) -> list[bool]:
    """Whether each reading is right: exact match, or for a kind where size cannot be seen
    (SCORED_BY_SHAPE_AND_POSITION) every element's shape and position."""
    if kind in SCORED_BY_SHAPE_AND_POSITION:
        return [shape_position_scores([p], [r])["shape_position_exact"] == 1 for p, r in zip(predictions, references)]
    return [language.canonical_or_raw(p) == language.canonical(r) for p, r in zip(predictions, references)]


def score_kind(kind: str, readings, references: list[str], language) -> dict:
    """One kind's scores from its readings (inference.Reading) and reference texts: the language's,
    the doubt flag's (flag_quality) and the calibration error of the confidence (both against
    judged_right)."""
    import inference

    predictions = [r.dsl for r in readings]
    scores = language.score(predictions, references)
    result = {"n": scores["n"], "exact": scores["exact_match"], "element_f1": scores["element_f1"],
              "valid": scores["valid_rate"]}
    if kind in SCORED_BY_SHAPE_AND_POSITION:
        result.update({k: v for k, v in shape_position_scores(predictions, references).items() if k != "n"})
    right = judged_right(kind, predictions, references, language)
    flag = flag_quality(right, [doubtful(r) for r in readings])
    result.update({f"flag_{k}": v for k, v in flag.items()},
                  flag_judged_by="shape_position" if kind in SCORED_BY_SHAPE_AND_POSITION else "exact",
                  ece=inference.calibration([r.confidence for r in readings], right)[0])
    return result


def part(share: float | None, count: int) -> str:
    """"12/15 (0.800)": a share of a count, as its numerator and the share."""
    return "0/0 (  -  )" if share is None else f"{round(share * count)}/{count} ({share:.3f})"


def print_kind(kind: str, s: dict):
    extra = f"  shape+position exact {s['shape_position_exact']:.3f}" if "shape_position_exact" in s else ""
    print(f"{kind:15} n {s['n']:4}  exact {s['exact']:.3f}  element F1 {s['element_f1']:.3f}  "
          f"valid {s['valid']:.3f}{extra}  doubt flag catches {part(s['flag_catches_wrong'], s['flag_wrong'])} "
          f"wrong, flags {part(s['flag_flags_right'], s['flag_right'])} right "
          f"(right: {s['flag_judged_by'].replace('_', ' and ')})  calibration error {s['ece']:.3f}", flush=True)


def print_all_kinds(s: dict):
    print(f"{'all kinds':15} n {s['n']:4}  doubt flag catches {part(s['flag_catches_wrong'], s['flag_wrong'])} wrong, "
          f"flags {part(s['flag_flags_right'], s['flag_right'])} right  calibration error {s['ece']:.3f}", flush=True)


def rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def main(args: Arguments) -> dict | None:
    diagrams = held_out_sample(args.num, args.seed)
    written = {}
    for kind in args.kinds:
        written[kind] = write_kind(Path(args.out) / kind, kind, diagrams, args.size, args.seed)
        print(f"{kind}: wrote {len(diagrams)} pictures and {Path(args.out) / kind / 'data.csv'}", flush=True)
    if not args.checkpoint:
        return None
    import inference  # only to read: it loads torch and the model's code

    reader = inference.load(args.checkpoint, args.device, args.dtype)
    references = [dsl.to_text(d) for d in diagrams]
    results, right, flagged, confidences = {}, [], [], []
    for kind, paths in written.items():
        readings = inference.read(reader, paths, *([args.batch_size] if args.batch_size else []),
                                  find_canvas=args.find_canvas)
        results[kind] = score_kind(kind, readings, references, reader.language)
        print_kind(kind, results[kind])
        right += judged_right(kind, [r.dsl for r in readings], references, reader.language)
        flagged += [doubtful(r) for r in readings]
        confidences += [r.confidence for r in readings]
    all_kinds = {"n": len(right), **{f"flag_{k}": v for k, v in flag_quality(right, flagged).items()},
                 "ece": inference.calibration(confidences, right)[0]}
    print_all_kinds(all_kinds)
    summary = {"tool": "real_pictures", "checkpoint": args.checkpoint, "seed": args.seed, "num": args.num,
               "size": args.size, "find_canvas": args.find_canvas,
               "doubt_flag": f"confidence or picture check < {DOUBT_CONFIDENCE}, agreement < 1 or a size "
                             f"undecided with either < {inference.SURE}, or the ink's reading",
               "kinds": results, "all_kinds": all_kinds}
    print(json.dumps(rounded(summary)))
    return summary


if __name__ == "__main__":
    (arguments,) = settings.parse(sys.argv[1:], Arguments, program="python -m tools.real_pictures")
    try:
        main(arguments)
    except files.DiskFull as error:
        print(f"real_pictures.py: error: {error}", file=sys.stderr)
        sys.exit(1)
    except data.DataError as error:
        print(f"real_pictures.py: error: {error}", file=sys.stderr)
        sys.exit(2)
