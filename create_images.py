"""Generate the dataset: random diagrams, their images and DSL (docs/SPEC.md's data files).

    python create_images.py [--num_samples 4444] [--num_test 200] [--damage 0.8] [--out_dir .] [--seed 0]

writes `images/`, `data.csv` (the training pool) and `test.csv` (held out) under
--out_dir. Test diagrams are all different and none of them appears in
data.csv, so the test set measures reading unseen diagrams, not memory. With
--augment every image gets its own style drawn from SPEC's whole envelope
(outline or filled, stroke, colours, jitter); without it, the nominal style.
--damage gives that share of the training images ordinary damage too (damage.py).
The same arguments always give the same files, byte for byte.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import damage
import dsl
import renderer
import settings
from settings import setting


@dataclass
class Arguments:
    num_samples: int = setting(4444, "training pool images (data.csv): finetune.py holds 10% out for validation, "
                                     "so 4,444 are 4,000 training pictures, 500 steps of 8")
    num_test: int = setting(200, "held-out images of unseen diagrams (test.csv)")
    out_dir: str = setting(".", "where images/, data.csv and test.csv go")
    seed: int = setting(0, "the same seed and settings give the same files, byte for byte")
    augment: bool = setting(True, "sample styles from the rendering envelope (docs/SPEC.md)")
    size: int = setting(224, "image side in pixels")
    damage: float = setting(0.8, "share of the training images that also get ordinary damage (damage.py: shift, "
                                 "zoom-out, rotation, blur, noise, JPEG), so that the model reads real pictures; "
                                 "test.csv stays clean")

    def __post_init__(self):
        if problem := check(self):
            raise settings.SettingsError(problem)


# At most half the diagrams of each element count are held out, so that training
# still sees every kind of diagram (there are only 36 one-element diagrams).
TEST_CAP_BY_COUNT = {k: n // 2 for k, n in dsl.NUM_DIAGRAMS_BY_COUNT.items()}
MAX_TEST = sum(TEST_CAP_BY_COUNT.values())


def sample_test_diagrams(num_test: int, seed: int) -> list[dsl.Diagram]:
    """`num_test` different diagrams, drawn like training ones, within TEST_CAP_BY_COUNT."""
    rng = random.Random(f"{seed}:test")
    chosen: dict[dsl.Diagram, None] = {}  # insertion-ordered set
    per_count = Counter()
    while len(chosen) < num_test:
        diagram = dsl.sample_diagram(rng)
        if diagram not in chosen and per_count[len(diagram)] < TEST_CAP_BY_COUNT[len(diagram)]:
            chosen[diagram] = None
            per_count[len(diagram)] += 1
    return list(chosen)


def write_split(rows, csv_path: Path, args: Arguments, damage_share: float = 0.0):
    """rows: (image file name, diagram, rng); the rng draws the image's style and jitter,
    and whether (and how) the picture is damaged. Pictures are drawn by a process per
    core (each from its own rng: the files are the same whatever the number)."""
    jobs = [(csv_path.parent, name, diagram, rng, args.augment, args.size, damage_share)
            for name, diagram, rng in rows]
    with multiprocessing.Pool(min(os.cpu_count() or 1, 8)) as pool, \
            open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image_path", "dsl"])
        for row in tqdm(pool.imap(draw, jobs, chunksize=16), total=len(jobs), desc=csv_path.name, unit="img"):
            writer.writerow(row)


def draw(job) -> list[str]:
    """Render one picture, damage it at the odds given, save it; its CSV row."""
    out_dir, name, diagram, rng, augment, size, damage_share = job
    style = renderer.random_style(rng) if augment else renderer.NOMINAL
    image = renderer.render(diagram, size, style, rng)
    if rng.random() < damage_share:
        image = damage.random_damage(image, rng)
    image.save(out_dir / "images" / name)
    return [f"images/{name}", dsl.to_text(diagram)]


def check(args: Arguments) -> str | None:
    if args.num_samples < 0 or args.num_test < 0:
        return "--num_samples and --num_test cannot be negative"
    if args.num_samples + args.num_test == 0:
        return "nothing to generate: --num_samples and --num_test are both 0"
    if args.num_test > MAX_TEST:
        caps = ", ".join(f"{TEST_CAP_BY_COUNT[k]} of {n} with {k} element{'s' * (k > 1)}"
                         for k, n in dsl.NUM_DIAGRAMS_BY_COUNT.items())
        return (f"--num_test {args.num_test} is more unique test diagrams than can be held out: "
                f"there are {dsl.NUM_DIAGRAMS} diagrams, and at most half of each element count "
                f"({caps}) go to the test set so that training still sees every kind; "
                f"ask for at most {MAX_TEST}")
    if args.size < 8:
        return f"--size must be at least 8 pixels, not {args.size}"
    if not 0 <= args.damage <= 1:
        return f"--damage is a share of the training images, from 0 to 1, not {args.damage}"
    return None


def main(args: Arguments):
    out_dir = Path(args.out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(max(args.num_samples, args.num_test))))
    # One random stream per image, so each image's diagram and style depend on the seed alone.
    test_diagrams = sample_test_diagrams(args.num_test, args.seed)
    test_rows = [(f"test_{i:0{digits}d}.png", diagram, random.Random(f"{args.seed}:test:{i}"))
                 for i, diagram in enumerate(test_diagrams)]
    held_out = set(test_diagrams)
    train_rows = []
    for i in range(args.num_samples):
        rng = random.Random(f"{args.seed}:train:{i}")
        diagram = dsl.sample_diagram(rng)
        while diagram in held_out:
            diagram = dsl.sample_diagram(rng)
        train_rows.append((f"train_{i:0{digits}d}.png", diagram, rng))

    write_split(train_rows, out_dir / "data.csv", args, args.damage)
    write_split(test_rows, out_dir / "test.csv", args)
    print(f"wrote {args.num_samples} training and {args.num_test} test images to {out_dir / 'images'}, "
          f"{out_dir / 'data.csv'} and {out_dir / 'test.csv'}")

if __name__ == "__main__":
    (arguments,) = settings.parse(sys.argv[1:], Arguments, program="create_images.py")
    main(arguments)
