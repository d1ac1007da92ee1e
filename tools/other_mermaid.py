"""Mermaid charts drawn in a second style by drawing code of its own: does a model trained on
mermaid.py's pictures read a chart another tool drew, and one no training set holds?

    python -m tools.other_mermaid --out_dir other_mermaid --num 300
    python inference.py --checkpoint checkpoints --csv other_mermaid/data.csv --eval

The charts and their grid cells come from mermaid.sample, kept only where mermaid.held_out
says so (test charts alone); each row's text is mermaid.to_text's, ids in reading order. Only
the drawing is new, and it shares no code with mermaid.py's: matplotlib's DejaVu fonts (Sans,
Sans Bold or Serif); boxes as wide and tall as their word plus padding, square-cornered or
rounded up to a pill; rhombi and circles sized to their word; arrows from outline to outline
with a notched, narrow or open head; the 3 x 3 grid spanning 80 to 95% of the side, shifted,
nodes moved a little in their cells; light backgrounds, dark inks and light fills from ranges
of its own; sometimes a frame; half the pictures drawn at 4x and downsampled with Lanczos.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw, ImageFont
import files
import mermaid
import settings
from settings import setting
from tools import other_renderer

SUPERSAMPLE = 4
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf")  # in matplotlib's mpl-data/fonts/ttf
# The most a node may reach from its centre, in cells: the sampler keeps every arrow at least
# 0.7 cell from other nodes' centres, and neighbours keep room between them for an arrow.
HALF_WIDTH, HALF_HEIGHT = 0.38, 0.26  # boxes
RHOMBUS_HALF = (0.40, 0.34)
CIRCLE_RADIUS = 0.33
JITTER = 0.05  # of a cell, each way
SMALLEST_FONT = 0.03  # of the side: a word stays readable, its node a little past the limits if need be


@dataclass
class Arguments:
    out_dir: str = setting("other_mermaid", "where images/ and data.csv go")
    num: int = setting(300, "pictures to draw")
    seed: int = setting(0, "seeds the charts and their looks")
    size: int = setting(mermaid.SIZE, "image side in pixels")


def font(name: str, pixels: float) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), max(1, round(pixels)))


def node_shape(label: str, shape: str, font_name: str, pixels: float, cell: float, look: dict):
    """(font pixels, half sizes or radius) for a node: the outline sized to its word with padding,
    the font made smaller until that outline stays within its cell's limits."""
    while True:
        left, top, right, bottom = font(font_name, pixels * look["scale"]).getbbox(label, anchor="mm")
        p, q = max(-left, right) / look["scale"], max(-top, bottom) / look["scale"]  # the word's half sizes
        pad = 0.5 if shape == "diamond" else 1.0  # a rhombus has room beside its word's corners
        px, py = p + pad * look["pad_x"] * pixels, q + pad * look["pad_y"] * pixels
        if shape in ("box", "rounded"):
            extra = look["corner"] * py * 0.4 if shape == "rounded" else 0  # rounder corners need more room
            size = (px + extra, py)
            fits = size[0] <= HALF_WIDTH * cell and size[1] <= HALF_HEIGHT * cell
        elif shape == "diamond":  # the word's padded box inside the rhombus: px / a + py / b <= 1
            b = min(RHOMBUS_HALF[1] * cell, look["rhombus"] * py)
            a = px / max(1e-6, 1 - py / b)
            size = (a, b)
            fits = py < b and a <= RHOMBUS_HALF[0] * cell
        else:
            size = math.hypot(p, q) + look["pad_y"] * pixels
            fits = size <= CIRCLE_RADIUS * cell
        if fits or pixels <= look["smallest"]:
            return pixels, size
        pixels -= 0.5


def reach(shape: str, size, ux: float, uy: float) -> float:
    """How far the outline is from the centre along the unit direction (ux, uy)."""
    if shape == "circle":
        return size
    if shape == "diamond":
        return 1 / (abs(ux) / size[0] + abs(uy) / size[1])
    return min(size[0] / max(abs(ux), 1e-9), size[1] / max(abs(uy), 1e-9))


def look_of(rng: random.Random, size: int) -> dict:
    """A picture's style: colours, font, padding, corners, line width and arrow heads."""
    light = rng.uniform(232, 255)
    background = tuple(round(min(255, light + rng.uniform(-10, 6))) for _ in range(3))
    dark = rng.uniform(5, 95)
    ink = tuple(round(min(110, max(0, dark + rng.uniform(-30, 20)))) for _ in range(3))
    text = ink if rng.random() < 0.7 else tuple(rng.randint(0, 60) for _ in range(3))
    fill = tuple(rng.randint(222, 255) for _ in range(3)) if rng.random() < 0.5 else background
    scale = SUPERSAMPLE if rng.random() < 0.5 else 1
    return {"background": background, "ink": ink, "text": text, "fill": fill, "scale": scale,
            "font": rng.choice(FONTS), "font_share": rng.uniform(0.17, 0.21),
            "pad_x": rng.uniform(0.35, 0.8), "pad_y": rng.uniform(0.25, 0.6),
            "corner": rng.uniform(0.5, 1.0), "rhombus": rng.uniform(2.6, 4.0),
            "stroke": rng.uniform(1.0, 2.6) * size / mermaid.SIZE, "head": rng.choice(("notched", "narrow", "open")),
            "head_share": rng.uniform(0.08, 0.12), "span": rng.uniform(0.80, 0.95),
            "frame": rng.uniform(0.008, 0.025) if rng.random() < 0.3 else None,
            "smallest": max(6.0, SMALLEST_FONT * size)}


def draw(chart: mermaid.Chart, cells: list, size: int, rng: random.Random) -> Image.Image:
    """The chart with node i at grid cell cells[i] (row, column), in a style drawn from rng."""
    look = look_of(rng, size)
    s = look["scale"]
    image = Image.new("RGB", (size * s, size * s), look["background"])
    canvas = ImageDraw.Draw(image)
    cell = look["span"] * size / mermaid.GRID
    room = (1 - look["span"]) * size / 2
    x0, y0 = room + rng.uniform(-0.4, 0.4) * room, room + rng.uniform(-0.4, 0.4) * room
    centres = [(x0 + (c + 0.5 + rng.uniform(-JITTER, JITTER)) * cell, y0 + (r + 0.5 + rng.uniform(-JITTER, JITTER)) * cell)
               for r, c in cells]
    base = look["font_share"] * cell
    shapes = [node_shape(n.label, n.shape, look["font"], base, cell, look) for n in chart.nodes]
    stroke = max(1, round(look["stroke"] * s))

    def scaled(points):
        return [(x * s, y * s) for x, y in points]

    if look["frame"]:
        inset = look["frame"] * size
        canvas.rectangle(scaled([(inset, inset), (size - inset, size - inset)]), outline=look["ink"], width=stroke)
    for a, b in chart.edges:
        (xa, ya), (xb, yb) = centres[a], centres[b]
        length = math.hypot(xb - xa, yb - ya)
        ux, uy = (xb - xa) / length, (yb - ya) / length
        nx, ny = -uy, ux
        gap = look["stroke"] / 2
        start = reach(chart.nodes[a].shape, shapes[a][1], ux, uy) + gap
        tip_back = reach(chart.nodes[b].shape, shapes[b][1], ux, uy) + gap
        tail, tip = (xa + ux * start, ya + uy * start), (xb - ux * tip_back, yb - uy * tip_back)
        head = min(max(4.0, look["head_share"] * cell), 0.5 * (length - start - tip_back))

        def back(along, side=0.0):  # a point `along` behind the tip, `side` to its left
            return tip[0] - ux * along + nx * side, tip[1] - uy * along + ny * side

        if look["head"] == "notched":
            end = back(0.6 * head)
            canvas.polygon(scaled([tip, back(head, 0.45 * head), end, back(head, -0.45 * head)]), fill=look["ink"])
        elif look["head"] == "narrow":
            end = back(0.8 * head)
            canvas.polygon(scaled([tip, back(head, 0.3 * head), back(head, -0.3 * head)]), fill=look["ink"])
        else:
            end = back(look["stroke"] / 2)
            for side in (0.5, -0.5):
                canvas.line(scaled([back(head, side * head), tip]), fill=look["ink"], width=stroke)
        canvas.line(scaled([tail, end]), fill=look["ink"], width=stroke)
    for node, (x, y), (pixels, shape_size) in zip(chart.nodes, centres, shapes):
        style = {"fill": look["fill"], "outline": look["ink"], "width": stroke}
        if node.shape == "circle":
            canvas.ellipse(scaled([(x - shape_size, y - shape_size), (x + shape_size, y + shape_size)]), **style)
        elif node.shape == "diamond":
            w, h = shape_size
            canvas.polygon(scaled([(x, y - h), (x + w, y), (x, y + h), (x - w, y)]), **style)
        else:
            w, h = shape_size
            radius = look["corner"] * h * s if node.shape == "rounded" else 0
            canvas.rounded_rectangle(scaled([(x - w, y - h), (x + w, y + h)]), radius=radius, **style)
        canvas.text((x * s, y * s), node.label, fill=look["text"], font=font(look["font"], pixels * s), anchor="mm")
    return image.resize((size, size), Image.LANCZOS) if s > 1 else image


def held_out_sample(rng: random.Random):
    """A sampled chart and its cells, drawn again until it is a test chart (mermaid.held_out)."""
    while True:
        chart, cells = mermaid.sample(rng)
        if mermaid.held_out(mermaid.to_text(chart)):
            return chart, cells


def main(args: Arguments):
    def draw_one(rng):
        chart, cells = held_out_sample(rng)
        return draw(chart, cells, args.size, rng), mermaid.to_text(chart)

    other_renderer.write_set(args, "chart", draw_one)

if __name__ == "__main__":
    (arguments,) = settings.parse(sys.argv[1:], Arguments, program="python -m tools.other_mermaid")
    try:
        main(arguments)
    except files.DiskFull as error:
        print(f"other_mermaid.py: error: {error}", file=sys.stderr)
        sys.exit(1)
