"""A data set drawn by a renderer other than renderer.py: does a model read pictures it
was not trained on?

    python -m tools.other_renderer --out_dir other --num 300
    python inference.py --checkpoint checkpoints --csv other/data.csv --eval

Its own geometry code and its own, even sampling of the rendering envelope
(docs/SPEC.md), the hard corners included: outlines of any width from 2 to 5 px (thin
ones as often as thick), dark colours up to the lightest allowed (each channel <= 100),
fills, light backgrounds, size and position jitter; half the images anti-aliased (drawn
at 4x and downsampled with Lanczos, fractional widths), half drawn pixel-hard. Writes a
data CSV in the usual format. Its diagrams are random: some may also appear in a
training set (it tests the drawing, not unseen diagrams).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

import data
import dsl
import files
import settings
from settings import setting

SUPERSAMPLE = 4
SIDE = {"Large": 0.80, "Medium": 0.55, "Small": 0.30}
COLUMN_ROW = {"TopLeft": (0, 0), "TopRight": (1, 0), "BottomLeft": (0, 1), "BottomRight": (1, 1)}


@dataclass
class Arguments:
    out_dir: str = setting("other", "where images/ and data.csv go")
    num: int = setting(300, "pictures to draw")
    seed: int = setting(12345, "seeds the diagrams and their looks")
    size: int = setting(224, "image side in pixels")


def draw(diagram: dsl.Diagram, size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(220, 255) for _ in range(3))
    lightest = rng.uniform(0, 100)  # how light the ink may be, uniform: light greys as often as black
    ink = tuple(round(max(0.0, lightest - rng.uniform(0, 30))) for _ in range(3))
    filled, stroke = rng.random() < 0.3, rng.uniform(2, 5)
    supersample = SUPERSAMPLE if rng.random() < 0.5 else 1
    big = size * supersample
    image = Image.new("RGB", (big, big), background)
    canvas = ImageDraw.Draw(image)
    q = size / 2
    for element in diagram.elements:
        column, row = COLUMN_ROW[element.position]
        side = (SIDE[element.size] + rng.uniform(-0.03, 0.03)) * q
        cx = (column + 0.5 + rng.uniform(-0.06, 0.06)) * q
        cy = (row + 0.5 + rng.uniform(-0.06, 0.06)) * q
        x0, y0, x1, y1 = (v * supersample for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        style = {"fill": ink} if filled else {"outline": ink, "width": round(stroke * supersample)}
        if element.shape == "Circle":
            canvas.ellipse((x0, y0, x1, y1), **style)
        elif element.shape == "Square":
            canvas.rectangle((x0, y0, x1, y1), **style)
        else:
            canvas.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], **style)
    return image.resize((size, size), Image.LANCZOS) if supersample > 1 else image


def write_set(args, name: str, draw_one):
    """args.num pictures and the CSV naming them under args.out_dir; draw_one(rng) -> (picture,
    text). Each picture, then the CSV, written whole (files.py); an older CSV is removed first,
    as it would name pictures about to change."""
    out = Path(args.out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "data.csv").unlink(missing_ok=True)
    rng = random.Random(args.seed)
    csv_rows = []
    for i in tqdm(range(args.num), desc="drawing", unit="img"):
        picture, text = draw_one(rng)
        with files.replacing(out / "images" / f"{name}_{i:05d}.png") as temporary:
            picture.save(temporary)
        csv_rows.append([f"images/{name}_{i:05d}.png", text])
    data.write_csv(out / "data.csv", csv_rows)
    print(f"wrote {args.num} images and {out / 'data.csv'}")


def main(args: Arguments):
    def draw_one(rng):
        diagram = dsl.sample_diagram(rng)
        return draw(diagram, args.size, rng), dsl.to_text(diagram)

    write_set(args, "other", draw_one)


if __name__ == "__main__":
    (arguments,) = settings.parse(sys.argv[1:], Arguments, program="python -m tools.other_renderer")
    try:
        main(arguments)
    except files.DiskFull as error:
        print(f"other_renderer.py: error: {error}", file=sys.stderr)
        sys.exit(1)
