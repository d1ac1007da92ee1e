"""Diagrams drawn by a renderer other than renderer.py, to check that a model reads pictures
it was not trained on.

    python check_other_renderer.py --out_dir other --num 200
    python inference.py --checkpoint checkpoints --csv other/data.csv --eval

Its own geometry code, anti-aliased (drawn at 4x and downsampled with Lanczos), with
fractional stroke widths and its own sampling of SPEC's envelope: fills, dark colours,
light backgrounds, size and position jitter. Writes a data CSV in SPEC's format. Its
diagrams are random: some may also appear in a training set (it tests the drawing, not
unseen diagrams).
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm
from transformers import HfArgumentParser

import dsl

SUPERSAMPLE = 4
SIDE = {"Large": 0.80, "Medium": 0.55, "Small": 0.30}
COLUMN_ROW = {"TopLeft": (0, 0), "TopRight": (1, 0), "BottomLeft": (0, 1), "BottomRight": (1, 1)}


@dataclass
class Arguments:
    out_dir: str = "other"
    num: int = 200
    seed: int = 12345
    size: int = 224


def draw(diagram: dsl.Diagram, size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(220, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 100) for _ in range(3))
    filled, stroke = rng.random() < 0.3, rng.uniform(2, 5)
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    canvas = ImageDraw.Draw(image)
    q = size / 2
    for element in diagram.elements:
        column, row = COLUMN_ROW[element.position]
        side = (SIDE[element.size] + rng.uniform(-0.03, 0.03)) * q
        cx = (column + 0.5 + rng.uniform(-0.06, 0.06)) * q
        cy = (row + 0.5 + rng.uniform(-0.06, 0.06)) * q
        x0, y0, x1, y1 = (v * SUPERSAMPLE for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        style = {"fill": ink} if filled else {"outline": ink, "width": round(stroke * SUPERSAMPLE)}
        if element.shape == "Circle":
            canvas.ellipse((x0, y0, x1, y1), **style)
        elif element.shape == "Square":
            canvas.rectangle((x0, y0, x1, y1), **style)
        else:
            canvas.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], **style)
    return image.resize((size, size), Image.LANCZOS)


def main(args: Arguments):
    out = Path(args.out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    with open(out / "data.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image_path", "dsl"])
        for i in tqdm(range(args.num), desc="drawing", unit="img"):
            diagram = dsl.sample_diagram(rng)
            draw(diagram, args.size, rng).save(out / "images" / f"other_{i:05d}.png")
            writer.writerow([f"images/other_{i:05d}.png", dsl.to_text(diagram)])
    print(f"wrote {args.num} images and {out / 'data.csv'}")


if __name__ == "__main__":
    main(*HfArgumentParser(Arguments).parse_args_into_dataclasses())
