"""Render and compare for the diagram DSL: what the ink in each quadrant of a picture fits,
measured without the model, so that a reading can be checked against it (renderer.agreement).

Each quadrant's ink (after the scanned look: grey, dark ink on white, the sheet cropped) is
closed into its convex hull, so that outlines, filled shapes, pen strokes that do not quite
close and thin lines all become the same solid silhouette (every shape of the DSL is convex).
Its bounding box gives the size (the nearest of dsl.SIDE_FRACTION) and the shape is the
one whose silhouette, drawn in that box, overlaps the hull best; a side about a pixel from
where the nearest size changes leaves the size undecided (sizes_undecided). docs/SPEC.md gives
the numbers.
The same shapes' grid shows where a diagram's canvas lies when nothing else does
(crop_to_canvas). It needs only numpy and PIL."""

from __future__ import annotations

import functools
import itertools

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

import dsl
import looks

SIDE = 224  # pixels the picture is measured at
INK_BELOW = 160  # grey level (0-255) under which a pixel of the scanned look is ink
SPECK = 3  # ink with fewer ink pixels than this in its 5 x 5 neighbourhood is noise
EDGE_BAND = 0.08  # share of the side along the frame's edge where desks and slanted corners show
IN_BAND = 0.7  # ink lying this much in that band is the surround, not a shape
LEAST_SIDE = 0.12  # of the quadrant side: smaller ink is a mark, not a shape
LEAST_ASPECT = 0.6  # a box thinner than this (short side / long side) is a sliver, not a shape
# A canvas found smaller than this share of the frame's side is cropped to: the grid's estimate of
# the canvas strays by about 5% either way, and up to 10% under a slant (docs/LOG.md), so a canvas
# that fills the frame stays; from about 0.84 down, a Large shape read against the frame is Medium.
ZOOMED_OUT = 0.88
CANVAS_SLACK = 0.02  # of the side: ink further than this outside the canvas found says it is wrong
MOST_PIECES = 64  # more pieces of ink than this is noise, in which no canvas is looked for
# A box side this near (in quadrant sides: about a pixel at SIDE) the line between two sizes
# reads as either: photos and felt tips widen a Medium's ink to the line with Large (docs/LOG.md).
BORDERLINE = 0.01
SIZE_LINES = [(a + b) / 2 for a, b in itertools.pairwise(sorted(dsl.SIDE_FRACTION.values()))]  # sizes meet


def ink(picture: Image.Image) -> np.ndarray:
    """[SIDE, SIDE] bool, read-only: the picture's ink, specks and the surround along the frame's
    edge left out."""
    picture = picture.convert("RGB")
    return ink_of_pixels(picture.tobytes(), picture.size)


@functools.lru_cache(maxsize=64)  # a picture read as it came is asked for its ink again: crop, then fits
def ink_of_pixels(pixels: bytes, size: tuple[int, int]) -> np.ndarray:
    grey = looks.look(Image.frombytes("RGB", size, pixels), "scanned").convert("L").resize(
        (SIDE, SIDE), Image.Resampling.BILINEAR)
    mask = grey.point(lambda v: 255 if v < INK_BELOW else 0)
    neighbours = np.asarray(mask.filter(ImageFilter.BoxBlur(2)), dtype=np.float32) * 25 / 255
    # BoxBlur keeps whole grey levels: a count of SPECK comes back a hair above or below it
    dots = without_edge_bands((np.asarray(mask) > 0) & (neighbours >= SPECK - 0.01))
    dots.flags.writeable = False  # shared by every caller through the cache
    return dots


def without_edge_bands(dots: np.ndarray) -> np.ndarray:
    """The ink less each connected piece that lies mostly in a band along the frame's edge (a
    desk's wedge, the corner a slant uncovers, their outlines); a shape the frame cuts reaches
    further in and stays."""
    h, w = dots.shape
    ys, xs = np.mgrid[0:h, 0:w]
    band = np.minimum(np.minimum(xs, w - 1 - xs), np.minimum(ys, h - 1 - ys)) < max(2, round(EDGE_BAND * w))
    # .copy(): an image from fromarray shares the array's read-only buffer, and floodfill would not write
    mask = Image.fromarray(np.where(dots, 255, 0).astype(np.uint8)).copy()
    for y, x in np.argwhere(dots & band):
        if mask.getpixel((int(x), int(y))) != 255:
            continue  # judged with its piece already
        ImageDraw.floodfill(mask, (int(x), int(y)), 100)
        values = np.array(mask)
        piece = values == 100
        values[piece] = 0 if (piece & band).sum() > IN_BAND * piece.sum() else 254
        mask = Image.fromarray(values).copy()
    return np.asarray(mask) >= 254


def convex_hull(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Andrew's monotone chain: the hull's corners, counter-clockwise."""
    points = sorted(set(points))
    if len(points) < 3:
        return points

    def turn(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for chain, ordered in ((lower, points), (upper, reversed(points))):
        for p in ordered:
            while len(chain) >= 2 and turn(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
    return lower[:-1] + upper[:-1]


def silhouette(shape: str, box: tuple[int, int, int, int], side: int) -> np.ndarray:
    """A filled shape drawn in box (left, top, right, bottom) on a side x side canvas."""
    image = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box
    if shape == "Circle":
        draw.ellipse(box, fill=255)
    elif shape == "Square":
        draw.rectangle(box, fill=255)
    else:  # apex at the top, as renderer.py draws it
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=255)
    return np.asarray(image) > 0


def shaped(box: tuple[int, int, int, int], q: int) -> bool:
    """Whether a box of ink is big and square enough for a shape of a quadrant of side q."""
    width, height = box[2] - box[0] + 1, box[3] - box[1] + 1
    return max(width, height) >= LEAST_SIDE * q and min(width, height) >= LEAST_ASPECT * max(width, height)


def shape_box(dots: np.ndarray) -> tuple[int, int, int, int] | None:
    """The box (left, top, right, bottom) of a quadrant's ink where it is a shape's (`shaped`), else None."""
    ys, xs = np.nonzero(dots)
    if len(xs) < 12:
        return None
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    return box if shaped(box, dots.shape[0]) else None


def side_of(box: tuple[int, int, int, int], q: int) -> float:
    """A box's long side, in quadrant sides (q pixels)."""
    return max(box[2] - box[0] + 1, box[3] - box[1] + 1) / q


def fit_quadrant(dots: np.ndarray) -> tuple[str, str] | None:
    """(size, shape) that the quadrant's ink fits best, or None where there is no shape."""
    q, box = dots.shape[0], shape_box(dots)
    if box is None:
        return None
    ys, xs = np.nonzero(dots)
    corners = convex_hull(list(zip(xs.tolist(), ys.tolist())))
    if len(corners) < 3:
        return None
    image = Image.new("L", (q, q), 0)
    ImageDraw.Draw(image).polygon(corners, fill=255, outline=255)
    hull = np.asarray(image) > 0

    def overlap(shape):
        drawn = silhouette(shape, box, q)
        return (hull & drawn).sum() / (hull | drawn).sum()

    side = side_of(box, q)
    size = min(dsl.SIDE_FRACTION, key=lambda name: abs(dsl.SIDE_FRACTION[name] - side))
    return size, max(dsl.SHAPES, key=overlap)


def quadrants(dots: np.ndarray):
    """Each quadrant's ink, in dsl.POSITIONS' order."""
    h = SIDE // 2
    for position in dsl.POSITIONS:
        column, row = dsl.QUADRANT_OFFSET[position]
        yield dots[row * h:(row + 1) * h, column * h:(column + 1) * h]


def fitted(picture: Image.Image) -> list[tuple[str, str] | None]:
    """Per position (dsl.POSITIONS' order): the (size, shape) the ink there fits, or None."""
    picture = picture.convert("RGB")
    return list(fitted_pixels(picture.tobytes(), picture.size))


@functools.lru_cache(maxsize=64)  # a reading asks about one picture twice: the ink's reading, the agreement
def fitted_pixels(pixels: bytes, size: tuple[int, int]) -> tuple[tuple[str, str] | None, ...]:
    return tuple(fit_quadrant(quadrant) for quadrant in quadrants(ink_of_pixels(pixels, size)))


def sizes_undecided(picture: Image.Image) -> list[str]:
    """The positions (dsl.POSITIONS) whose shape's side lies within BORDERLINE of the line
    between two sizes: there the ink cannot tell them apart."""
    dots, undecided = ink(picture), []
    for position, quadrant in zip(dsl.POSITIONS, quadrants(dots)):
        box = shape_box(quadrant)
        if box is not None and any(abs(side_of(box, quadrant.shape[0]) - line) < BORDERLINE for line in SIZE_LINES):
            undecided.append(position)
    return undecided


def reading(picture: Image.Image) -> str | None:
    """What the ink alone reads, as the DSL's canonical text; None where it fits no element."""
    elements = [dsl.Element(*fit, position) for position, fit in zip(dsl.POSITIONS, fitted(picture)) if fit]
    return dsl.to_text(dsl.Diagram(elements)) if elements else None


def pieces(dots: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The box (left, top, right, bottom) of each connected piece of the ink, joined across a
    pixel's gap (a thin outline drawn small breaks up); [] for more than MOST_PIECES (noise, not a
    diagram's strokes)."""
    mask, boxes = Image.fromarray(np.where(dots, 255, 0).astype(np.uint8)).filter(ImageFilter.MaxFilter(3)), []
    while (found := np.argwhere(np.asarray(mask) == 255)).size:
        if len(boxes) == MOST_PIECES:
            return []
        y, x = found[0]
        ImageDraw.floodfill(mask, (int(x), int(y)), len(boxes) + 1)
        ys, xs = np.nonzero(np.asarray(mask) == len(boxes) + 1)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())))
    return boxes


def canvas(dots: np.ndarray) -> tuple[float, float, float] | None:
    """The canvas (left, top, side, in the ink's pixels) that the grid of the shapes shows: every
    shape is centred in its quadrant, so two shapes a column apart are half the canvas's side apart
    across, and two a row apart half its side apart down. A shape is the pieces of ink whose
    centres lie in one quadrant of the frame, whole even where they cross into another. None with
    fewer than two shapes in different columns or rows: one shape alone does not show the scale."""
    h, boxes = SIDE // 2, {}
    for left, top, right, bottom in pieces(dots):
        cell = (int(left + right >= 2 * h), int(top + bottom >= 2 * h))  # its centre's (column, row)
        was = boxes.get(cell, (left, top, right, bottom))
        boxes[cell] = (min(was[0], left), min(was[1], top), max(was[2], right), max(was[3], bottom))
    centres = [((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, column, row)
               for (column, row), box in boxes.items() if shaped(box, h)]
    sides = [2 * abs(a[axis] - b[axis]) for i, a in enumerate(centres) for b in centres[i + 1:]
             for axis in (0, 1) if a[axis + 2] != b[axis + 2]]
    if not sides:
        return None
    side = float(np.median(sides))
    left = float(np.mean([x - (column + 0.5) * side / 2 for x, _, column, _ in centres]))
    top = float(np.mean([y - (row + 0.5) * side / 2 for _, y, _, row in centres]))
    return left, top, side


def crop_to_canvas(picture: Image.Image) -> Image.Image:
    """A picture whose diagram is smaller than the frame, with no edge to show where its canvas
    ends (a whiteboard, a zoomed-out screenshot), cropped to the canvas its shapes' grid shows
    (`canvas`) and brought back to its size, so that sizes read against the canvas; as it is where
    the canvas found fills the frame (ZOOMED_OUT), cannot be found, or would cut some of the ink,
    and where the ink reaches the frame's edge (the diagram is not smaller than the frame). Cropped
    in the scanned look's frame: after the crop to a sheet on a surface, where one shows."""
    picture = picture.convert("RGB")
    dots = ink(picture)
    if dots[0].any() or dots[-1].any() or dots[:, 0].any() or dots[:, -1].any():
        return picture
    found = canvas(dots)
    if found is None or found[2] >= ZOOMED_OUT * SIDE:
        return picture
    left, top, side = found
    ys, xs = np.nonzero(dots)
    slack = CANVAS_SLACK * SIDE
    if xs.min() < left - slack or ys.min() < top - slack or xs.max() > left + side + slack \
            or ys.max() > top + side + slack:
        return picture
    sheet = looks.crop_to_sheet(picture)
    across, down = sheet.width / SIDE, sheet.height / SIDE
    box = (round(left * across), round(top * down), round((left + side) * across), round((top + side) * down))
    # Where the canvas found reaches past the frame, the frame's ground fills it.
    cropped = Image.new("RGB", (box[2] - box[0], box[3] - box[1]), sheet.getpixel((0, 0)))
    cropped.paste(sheet, (-box[0], -box[1]))
    return cropped.resize(picture.size, Image.Resampling.BICUBIC)
