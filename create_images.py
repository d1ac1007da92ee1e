"""Generate the dataset: random diagrams, their images and DSL (docs/SPEC.md's data files).

    python create_images.py [--num_samples 4444] [--num_test 200] [--damage 0.8] [--out_dir .] [--seed 0]

writes `images/`, `data.csv` (the training pool) and `test.csv` (held out) under
--out_dir. Test diagrams are all different and come from dsl.held_out_diagrams(),
a fifth of the diagrams that no seed's data.csv holds, so the test set measures
reading unseen diagrams, not memory. With
--augment every image gets its own style drawn from SPEC's whole envelope
(outline or filled, stroke, colours, jitter); without it, the nominal style.
--damage gives that share of the training images ordinary damage too (damage.py).
The same arguments always give the same files, byte for byte.

Every picture and CSV is written aside and renamed into place (files.py), and the old
CSVs are removed first (they would name pictures about to change), so a killed run leaves
no CSV or a whole new one, and no half-drawn picture.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import damage
import data
import dsl
import files
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


CSV_NAMES = ("data.csv", "test.csv")
MAX_TEST = len(dsl.held_out_diagrams())


def sample_test_diagrams(num_test: int, seed: int) -> list[dsl.Diagram]:
    """`num_test` different held-out diagrams, drawn like training ones."""
    rng = random.Random(f"{seed}:test")
    held_out = dsl.held_out_diagrams()
    chosen: dict[dsl.Diagram, None] = {}  # insertion-ordered set
    while len(chosen) < num_test:
        diagram = dsl.sample_diagram(rng)
        if diagram in held_out:
            chosen[diagram] = None
    return list(chosen)


def sample_training_diagram(rng: random.Random) -> dsl.Diagram:
    """A diagram drawn like any other, again until it is not one held out for testing."""
    diagram = dsl.sample_diagram(rng)
    while diagram in dsl.held_out_diagrams():
        diagram = dsl.sample_diagram(rng)
    return diagram


def write_split(rows, csv_path: Path, args: Arguments, damage_share: float = 0.0):
    """rows: (image file name, diagram, rng); the rng draws the image's style and jitter,
    and whether (and how) the picture is damaged. Pictures are drawn by a process per
    core (each from its own rng: the files are the same whatever the number); the CSV
    comes last, once every picture it names is in place."""
    jobs = [(csv_path.parent, name, diagram, rng, args.augment, args.size, damage_share)
            for name, diagram, rng in rows]
    try:
        with multiprocessing.Pool(min(os.cpu_count() or 1, 8)) as pool:
            csv_rows = list(tqdm(pool.imap(draw, jobs, chunksize=16), total=len(jobs), desc=csv_path.name,
                                 unit="img"))
    except BaseException:
        files.recover(csv_path.parent / "images")  # the pool stopped its workers, maybe mid-picture
        raise
    os.sync()  # every picture on the disk before the CSV that names them
    data.write_csv(csv_path, csv_rows)


def draw(job) -> list[str]:
    """Render one picture, damage it at the odds given, save it; its CSV row."""
    out_dir, name, diagram, rng, augment, size, damage_share = job
    style = renderer.random_style(rng) if augment else renderer.NOMINAL
    image = renderer.render(diagram, size, style, rng)
    if rng.random() < damage_share:
        image = damage.random_damage(image, rng)
    with files.replacing(out_dir / "images" / name, durable=False) as temporary:  # synced all at once
        image.save(temporary)
    return [f"images/{name}", dsl.to_text(diagram)]


def remove_old_files(out_dir: Path):
    """The CSVs of an earlier run (they name pictures this run replaces) and what a killed
    run left half-written."""
    for name in CSV_NAMES:
        (out_dir / name).unlink(missing_ok=True)
        for leftover in out_dir.glob(f"{files.TEMPORARY}*-{name}"):
            leftover.unlink()
    files.recover(out_dir / "images")
    files.sync_folder(out_dir)


def check(args: Arguments) -> str | None:
    if args.num_samples < 0 or args.num_test < 0:
        return "--num_samples and --num_test cannot be negative"
    if args.num_samples + args.num_test == 0:
        return "nothing to generate: --num_samples and --num_test are both 0"
    if args.num_test > MAX_TEST:
        held_out = Counter(len(diagram) for diagram in dsl.held_out_diagrams())
        shares = ", ".join(f"{held_out[k]} of {n} with {k} element{'s' * (k > 1)}"
                           for k, n in dsl.NUM_DIAGRAMS_BY_COUNT.items())
        return (f"--num_test {args.num_test} is more unique test diagrams than are held out: "
                f"of the {dsl.NUM_DIAGRAMS:,} diagrams, a fifth of each element count ({shares}) is kept "
                f"for test sets, so that training sees the other four fifths of every kind; "
                f"ask for at most {MAX_TEST}")
    if args.size < 8:
        return f"--size must be at least 8 pixels, not {args.size}"
    if not 0 <= args.damage <= 1:
        return f"--damage is a share of the training images, from 0 to 1, not {args.damage}"
    return None


def main(args: Arguments):
    out_dir = Path(args.out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    remove_old_files(out_dir)
    digits = max(5, len(str(max(args.num_samples, args.num_test))))
    # One random stream per image, so each image's diagram and style depend on the seed alone.
    test_diagrams = sample_test_diagrams(args.num_test, args.seed)
    test_rows = [(f"test_{i:0{digits}d}.png", diagram, random.Random(f"{args.seed}:test:{i}"))
                 for i, diagram in enumerate(test_diagrams)]
    train_rows = []
    for i in range(args.num_samples):
        rng = random.Random(f"{args.seed}:train:{i}")
        train_rows.append((f"train_{i:0{digits}d}.png", sample_training_diagram(rng), rng))

    write_split(train_rows, out_dir / "data.csv", args, args.damage)
    write_split(test_rows, out_dir / "test.csv", args)
    print(f"wrote {args.num_samples} training and {args.num_test} test images to {out_dir / 'images'}, "
          f"{out_dir / 'data.csv'} and {out_dir / 'test.csv'}")


if __name__ == "__main__":
    (arguments,) = settings.parse(sys.argv[1:], Arguments, program="create_images.py")
    try:
        main(arguments)
    except files.DiskFull as error:
        print(f"create_images.py: error: {error}", file=sys.stderr)
        sys.exit(1)
