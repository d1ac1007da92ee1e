"""How a picture looks when CLIP gets it (ModelConfig.image_look): as it is; normalised (grey,
dark ink on an even white ground, whatever its colours and light); or scanned (a sheet lying
on a surface found and cropped first, as a scanning app does, then normalised). docs/SPEC.md
says what each does, with its numbers. It needs only numpy and PIL: export.py copies it into an
exported model's folder, whose read.py loads it from there."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps

LOOKS = ("as_is", "normalised", "scanned")


def look(picture: Image.Image, image_look: str) -> Image.Image:
    """The picture as CLIP gets it, by ModelConfig.image_look."""
    if image_look == "scanned":
        picture = crop_to_sheet(picture)
    return picture if image_look == "as_is" else normalise_look(picture)


GROUND_CLOSING = 0.45  # the ground's closing, as a share of the side: wider than a Large shape (0.4)
# The band whose median is the ground's grey, as shares of the side: from 3% to 6% in from the
# edge, ground in every diagram, and inside what a crop to the sheet leaves of the surface.
GROUND_BAND = (0.03, 0.06)


def band(values: np.ndarray, inner: float, outer: float) -> np.ndarray:
    """The pixels between `inner` and `outer` (shares of the shorter side) in from the frame's
    edge: where the ground shows, though filled shapes may cover most of the rest."""
    height, width = values.shape[:2]
    a = round(inner * min(height, width))
    b = max(round(outer * min(height, width)), a + 1)
    return np.concatenate([values[a:b, a:width - a].ravel(), values[height - b:height - a, a:width - a].ravel(),
                           values[b:height - b, a:b].ravel(), values[b:height - b, width - b:width - a].ravel()])


def square_filter(values: np.ndarray, side: int, reduce) -> np.ndarray:
    """PIL's MaxFilter (reduce: np.max) or MinFilter (np.min) of a side x side square, the
    frame's edge repeated beyond it, as a pass along the rows and one along the columns: the
    same pixels in a tenth of the time (a square of 25 at 224 pixels)."""
    padded = np.pad(values, side // 2, mode="edge")
    rows = reduce(np.lib.stride_tricks.sliding_window_view(padded, side, axis=0), axis=-1)
    return reduce(np.lib.stride_tricks.sliding_window_view(rows, side, axis=1), axis=-1)


def normalise_look(picture: Image.Image) -> Image.Image:
    """The picture as dark ink on an even white ground, whatever its colours and light: grey;
    inverted where the ink is lighter than the ground (dark mode, light ink on a colour);
    divided by its ground's light, a closing (a max filter, then a min filter) wider than any
    filled shape, which removes the ink, solid or thin, and keeps slow changes of light;
    stretched so that the ground's noise is white and the darkest ink black."""
    grey = picture.convert("L")
    values = np.asarray(grey, dtype=np.float32)
    # The ink lies on the side of the ground's grey that reaches further: 0.2% of the pixels is
    # a lone small outline.
    ground_grey = np.median(band(values, *GROUND_BAND))
    if np.percentile(values, 99.8) - ground_grey > ground_grey - np.percentile(values, 0.2):
        grey = ImageOps.invert(grey)
    small = grey.resize((max(1, grey.width // 4), max(1, grey.height // 4)), Image.BOX)  # a quarter the side: fast
    side = round(GROUND_CLOSING * small.width) // 2 * 2 + 1
    closed = square_filter(square_filter(np.asarray(small), side, np.max), side, np.min)
    ground = Image.fromarray(closed).resize(grey.size, Image.BILINEAR).filter(ImageFilter.GaussianBlur(4))
    even = np.asarray(grey, dtype=np.float32) / np.maximum(np.asarray(ground, dtype=np.float32), 1.0)
    paper_pixels = even[even > 0.75]  # the ground is near 1 once divided by its light; ink is well under
    paper = np.median(paper_pixels) if paper_pixels.size else 1.0
    white = paper - 3 * 1.4826 * np.median(np.abs(paper_pixels - paper)) if paper_pixels.size else paper
    ink = even[even < white - 0.1]
    black = np.percentile(ink, 5) if ink.size else 0.0  # of the ink alone: a lone small shape is <1% of pixels
    stretched = (even - black) / max(white - black, 0.05)
    return Image.fromarray((stretched.clip(0, 1) * 255).astype(np.uint8)).convert("RGB")


SHEET_WORK_SIDE = 112  # the sheet is looked for on a picture this small: fast, and noise averaged away
SURFACE_STEP = 10  # the most two neighbouring pixels of the surface differ, in any channel (0-255)
SURFACE_FAR = 70  # the most a pixel of the surface differs from the edge's colour (uneven light)
PAPER_APART = 28  # the least the sheet's colour differs from the surface's
# A side of the sheet's box is its edge where the colours 2 px either side of it differ by more
# than this (the 75th percentile along the side): sheets' edges differ by 45 or more, where the
# flood stopped inside a shaded sheet by 3-16 (docs/LOG.md).
EDGE_STEP = 30


def runs(like: np.ndarray, joined: np.ndarray) -> np.ndarray:
    """A number for each run of pixels along the rows that are `like` and joined to the next
    one (`joined`, one column fewer); 0 for pixels that are not `like`."""
    starts = np.ones(like.shape, dtype=bool)
    starts[:, 1:] = ~joined | ~like[:, :-1]
    return np.where(like, np.cumsum(starts).reshape(like.shape), 0)


def spread(reached: np.ndarray, run_of: np.ndarray) -> np.ndarray:
    """`reached`, and every pixel of a run (`runs`) that holds a reached pixel."""
    hit = np.zeros(run_of.max() + 1, dtype=bool)
    hit[run_of[reached]] = True
    hit[0] = False
    return hit[run_of] | reached


def reached_from_edge(like: np.ndarray, down: np.ndarray, across: np.ndarray) -> np.ndarray:
    """The `like` pixels joined to the frame's edge, 4-connected, through neighbours that are
    joined (`down`: each to the one below; `across`: to the one on its right) and `like`:
    grown along every row at once, then every column, until nothing grows (a round for each
    turn of the longest path, not one for each pixel)."""
    reached = np.zeros_like(like)
    reached[[0, -1], :], reached[:, [0, -1]] = like[[0, -1], :], like[:, [0, -1]]
    rows, columns = runs(like, across), runs(like.T, down.T).T
    while True:
        grown = spread(spread(reached, rows), columns)
        if (grown == reached).all():
            return reached
        reached = grown


def find_sheet(picture: Image.Image) -> tuple[int, int, int, int] | None:
    """The box (left, top, right, bottom) of a sheet lying on a surface that shows around it,
    as a phone photographs a printout: or None where there is no such surface. The surface
    is what reaches the frame's edge: the pixels joined to the edge through neighbours that
    differ little, none far from the edge's colour. What they surround is the sheet where it
    is large (at least 0.6 of the frame each way, not all of it), solid (0.85 of its box) and
    of another colour than the surface (its paper). A diagram on its own ground is none of these: what its ground
    surrounds is ink and the insides of outlines, of the ground's colour. Where light shades a
    side of the sheet to the surface's colour, the flood runs on into it and stops at no edge:
    the sheet goes on to the frame's edge there (soft_sides)."""
    side = SHEET_WORK_SIDE
    small = np.asarray(picture.convert("RGB").resize((side, side), Image.BOX).filter(ImageFilter.GaussianBlur(1)),
                       dtype=np.int16)
    edge = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])
    surface = np.median(edge, axis=0)
    like = np.abs(small - surface).max(-1) <= SURFACE_FAR  # the surface, under uneven light
    # Neighbours that differ little: the surface goes on (a gradient of light), no sheet edge between.
    down = np.abs(small[1:] - small[:-1]).max(-1) <= SURFACE_STEP
    across = np.abs(small[:, 1:] - small[:, :-1]).max(-1) <= SURFACE_STEP
    inside = ~reached_from_edge(like, down, across)
    rows, columns = np.flatnonzero(inside.mean(1) > 0.1), np.flatnonzero(inside.mean(0) > 0.1)
    if not len(rows) or not len(columns):
        return None
    top, bottom, left, right = rows[0], rows[-1] + 1, columns[0], columns[-1] + 1
    height, width = bottom - top, right - left
    if min(height, width) < 0.6 * side or min(height, width) > 0.97 * side:
        return None
    box = inside[top:bottom, left:right]
    paper = np.median(small[top:bottom, left:right][box], axis=0)
    if box.mean() < 0.85 or np.abs(paper - surface).max() <= PAPER_APART:
        return None
    soft = soft_sides(small, (left, top, right, bottom))
    left, top = (0 if "left" in soft else left), (0 if "top" in soft else top)
    right, bottom = (side if "right" in soft else right), (side if "bottom" in soft else bottom)
    scale_x, scale_y = picture.width / side, picture.height / side
    return round(left * scale_x), round(top * scale_y), round(right * scale_x), round(bottom * scale_y)


def soft_sides(small: np.ndarray, box: tuple[int, int, int, int], gap: int = 2) -> set[str]:
    """The sides of `box` (left, top, right, bottom, in `small`'s pixels) across which the
    colour changes by EDGE_STEP or less: no edge of a sheet there. Of the steps along a side,
    the 75th percentile, not the median: strokes drawn along an edge in a colour near the
    surface's hide the edge where they run, and they may run along half of it."""
    left, top, right, bottom = box
    last = small.shape[0] - 1
    inner_outer = {"left": (small[top:bottom, left + gap], small[top:bottom, max(left - gap, 0)]),
                   "right": (small[top:bottom, right - 1 - gap], small[top:bottom, min(right - 1 + gap, last)]),
                   "top": (small[top + gap, left:right], small[max(top - gap, 0), left:right]),
                   "bottom": (small[bottom - 1 - gap, left:right], small[min(bottom - 1 + gap, last), left:right])}
    return {name for name, (inner, outer) in inner_outer.items()
            if np.percentile(np.abs(inner - outer).max(-1), 75) <= EDGE_STEP}


def crop_to_sheet(picture: Image.Image) -> Image.Image:
    """The picture cropped to the sheet it shows on a surface (find_sheet), at its own size; as
    it is where it shows none."""
    box = find_sheet(picture)
    return picture if box is None else picture.crop(box).resize(picture.size, Image.BICUBIC)
