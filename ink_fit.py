"""Render and compare for the diagram DSL: what the ink in each quadrant of a picture fits,
measured without the model, so that a reading can be checked against it (renderer.agreement).

Each quadrant's ink (after the scanned look: grey, dark ink on white, the sheet cropped) is
closed into its convex hull, so that outlines, filled shapes, pen strokes that do not quite
close and thin lines all become the same solid silhouette (every shape of the DSL is convex).
Its bounding box gives the size (the nearest of dsl.SIDE_FRACTION) and the shape is the
one whose silhouette, drawn in that box, overlaps the hull best. docs/SPEC.md gives the numbers.
It needs only numpy and PIL."""

from __future__ import annotations

import functools

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


def ink(picture: Image.Image) -> np.ndarray:
    """[SIDE, SIDE] bool: the picture's ink, specks and the surround along the frame's edge left out."""
    grey = looks.look(picture.convert("RGB"), "scanned").convert("L").resize((SIDE, SIDE),
                                                                            Image.Resampling.BILINEAR)
    mask = grey.point(lambda v: 255 if v < INK_BELOW else 0)
    neighbours = np.asarray(mask.filter(ImageFilter.BoxBlur(2)), dtype=np.float32) * 25 / 255
    # BoxBlur keeps whole grey levels: a count of SPECK comes back a hair above or below it
    return without_edge_bands((np.asarray(mask) > 0) & (neighbours >= SPECK - 0.01))


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


def fit_quadrant(dots: np.ndarray) -> tuple[str, str] | None:
    """(size, shape) that the quadrant's ink fits best, or None where there is no shape."""
    q = dots.shape[0]
    ys, xs = np.nonzero(dots)
    if len(xs) < 12:
        return None
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    width, height = box[2] - box[0] + 1, box[3] - box[1] + 1
    if max(width, height) < LEAST_SIDE * q or min(width, height) < LEAST_ASPECT * max(width, height):
        return None
    corners = convex_hull(list(zip(xs.tolist(), ys.tolist())))
    if len(corners) < 3:
        return None
    image = Image.new("L", (q, q), 0)
    ImageDraw.Draw(image).polygon(corners, fill=255, outline=255)
    hull = np.asarray(image) > 0

    def overlap(shape):
        drawn = silhouette(shape, box, q)
        return (hull & drawn).sum() / (hull | drawn).sum()

    side = max(width, height) / q
    size = min(dsl.SIDE_FRACTION, key=lambda name: abs(dsl.SIDE_FRACTION[name] - side))
    return size, max(dsl.SHAPES, key=overlap)


def fitted(picture: Image.Image) -> list[tuple[str, str] | None]:
    """Per position (dsl.POSITIONS' order): the (size, shape) the ink there fits, or None."""
    picture = picture.convert("RGB")
    return list(fitted_pixels(picture.tobytes(), picture.size))


@functools.lru_cache(maxsize=64)  # a reading asks about one picture twice: the ink's reading, the agreement
def fitted_pixels(pixels: bytes, size: tuple[int, int]) -> tuple[tuple[str, str] | None, ...]:
    dots, h = ink(Image.frombytes("RGB", size, pixels)), SIDE // 2
    return tuple(fit_quadrant(dots[top:top + h, left:left + h]) for left, top in
                 ((dsl.QUADRANT_OFFSET[p][0] * h, dsl.QUADRANT_OFFSET[p][1] * h) for p in dsl.POSITIONS))


def reading(picture: Image.Image) -> str | None:
    """What the ink alone reads, as the DSL's canonical text; None where it fits no element."""
    elements = [dsl.Element(*fit, position) for position, fit in zip(dsl.POSITIONS, fitted(picture)) if fit]
    return dsl.to_text(dsl.Diagram(elements)) if elements else None
