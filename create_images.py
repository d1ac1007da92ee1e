"""Generate the dataset: random diagrams, their images and DSL (docs/SPEC.md's data files).

    python create_images.py [--num_samples 6667] [--num_test 200] [--looks wide] [--damage 0.8] [--out_dir .] [--seed 0]
    python create_images.py --dsl mermaid --looks classic   # another DSL's data: any plug-in with the hooks below

writes `images/`, `data.csv` (the training pool) and `test.csv` (held out) under
--out_dir. It draws any DSL (languages.py) through its hooks: sample(rng) an item,
text_of(item) its text, draw(item, size, rng, augment) its picture, held_out(text)
whether only test sets may show it. Test texts are all different (canonical forms)
and held out, training texts never are, so no seed's data.csv holds any test diagram
and the test set measures reading unseen diagrams, not memory (the diagram DSL: a
fifth of each element count, dsl.held_out_diagrams()). With
--augment every image gets its own style drawn from SPEC's whole envelope
(outline or filled, stroke, colours, jitter); without it, the nominal style.
--damage gives that share of the training images ordinary damage too (damage.py).
The same arguments always give the same files, byte for byte.

Every picture and CSV is written aside and renamed into place (files.py), and the old
CSVs are removed first (they would name pictures about to change), so a killed run leaves
no CSV or a whole new one, and no half-drawn picture.
"""

from __future__ import annotations

import functools
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
import languages
import settings
from settings import setting

HOOKS = ("sample", "text_of", "draw", "held_out")  # what a DSL needs for its data to be drawn here
DEFAULT_SIZE = 224  # for a DSL that names no SIZE of its own
GIVE_UP_DRAWS = 20_000  # draws in a row without a new held-out text before giving up (DSLs without a MAX_TEST)


@dataclass
class Arguments:
    num_samples: int = setting(6667, "training pool images (data.csv); 10% validate, so 6,667 train on 6,000")
    num_test: int = setting(200, "held-out images of unseen diagrams (test.csv)")
    out_dir: str = setting(".", "where images/, data.csv and test.csv go")
    seed: int = setting(0, "the same seed and settings give the same files, byte for byte")
    augment: bool = setting(True, "sample styles from the rendering envelope (docs/SPEC.md)")
    looks: str = setting("wide", "wide: dark ink on light grounds, dark mode, coloured grounds, pen strokes "
                                 "and phone photos (docs/SPEC.md); classic: dark ink on light grounds only")
    size: int | None = setting(None, "image side in pixels (unset: the DSL's SIZE, else 224)")
    damage: float = setting(0.8, "share of training images also damaged (damage.py), to read real pictures; "
                                 "test.csv stays clean")
    dsl: str = setting("diagram", "the DSL whose data to draw: diagram, mermaid, or a plug-in with a sampler "
                                  "(docs/SPEC.md)")

    def __post_init__(self):
        if problem := check(self):
            raise settings.SettingsError(problem)
        if self.size is None:
            self.size = getattr(language_of(self.dsl).module, "SIZE", DEFAULT_SIZE)


CSV_NAMES = ("data.csv", "test.csv")
MAX_TEST = len(dsl.held_out_diagrams())


@functools.cache
def language_of(name: str) -> languages.Language:
    """The DSL of --dsl, loaded once (a plug-in file runs once per process)."""
    return languages.load(name)


def sample_test_items(language: languages.Language, num_test: int, seed: int) -> list:
    """`num_test` held-out items of different canonical texts, drawn like training ones. The
    diagram DSL's check() bounds num_test by MAX_TEST; another DSL's search gives up after
    GIVE_UP_DRAWS draws in a row without a new one."""
    sample, text_of, held_out = (language.part(hook) for hook in ("sample", "text_of", "held_out"))
    rng = random.Random(f"{seed}:test")
    chosen: dict[str, object] = {}  # canonical text -> item, insertion-ordered
    draws = 0  # since the last new one
    while len(chosen) < num_test:
        item = sample(rng)
        text = text_of(item)
        if held_out(text) and (key := language.canonical(text)) not in chosen:
            chosen[key], draws = item, 0
            continue
        draws += 1
        if draws >= GIVE_UP_DRAWS and language.module is not dsl:
            raise TooFewTestTexts(f"--num_test {num_test}: found {len(chosen)} different held-out {language.name} texts, "
                               f"then none new in {GIVE_UP_DRAWS:,} draws; ask for fewer")
    return list(chosen.values())


def sample_training_item(language: languages.Language, rng: random.Random):
    """An item drawn like any other, again until its text is not one held out for testing."""
    sample, text_of, held_out = (language.part(hook) for hook in ("sample", "text_of", "held_out"))
    item = sample(rng)
    while held_out(text_of(item)):
        item = sample(rng)
    return item


class TooFewTestTexts(ValueError):
    """Fewer different held-out texts than --num_test asks for, as far as sampling finds."""


def write_split(rows, csv_path: Path, args: Arguments, damage_share: float = 0.0):
    """rows: (image file name, item, rng); the rng draws the image's style and jitter,
    and whether (and how) the picture is damaged. Pictures are drawn by a process per
    core (each from its own rng: the files are the same whatever the number); the CSV
    comes last, once every picture it names is in place."""
    augment = args.looks if args.augment else False  # the DSL's draw takes the look it augments with
    jobs = [(args.dsl, csv_path.parent, name, item, rng, augment, args.size, damage_share)
            for name, item, rng in rows]
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
    dsl_name, out_dir, name, item, rng, augment, size, damage_share = job
    language = language_of(dsl_name)
    image = language.part("draw")(item, size, rng, augment)
    if rng.random() < damage_share:
        image = damage.random_damage(image, rng, wide=augment == "wide")
    with files.replacing(out_dir / "images" / name, durable=False) as temporary:  # synced all at once
        image.save(temporary)
    return [f"images/{name}", language.part("text_of")(item)]


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
    if args.looks not in ("classic", "wide"):
        return f"--looks must be classic or wide, not {args.looks!r}"
    try:
        language = language_of(args.dsl)
    except ValueError as error:
        return str(error)
    if missing := [hook for hook in HOOKS if not callable(language.part(hook))]:
        return (f"--dsl {args.dsl}: create_images.py draws a DSL's data through {', '.join(HOOKS)}; "
                f"{args.dsl} lacks {', '.join(missing)}")
    if language.module is dsl and args.num_test > MAX_TEST:
        held_out = Counter(len(diagram) for diagram in dsl.held_out_diagrams())
        shares = ", ".join(f"{held_out[k]} of {n} with {k} element{'s' * (k > 1)}"
                           for k, n in dsl.NUM_DIAGRAMS_BY_COUNT.items())
        return (f"--num_test {args.num_test} is more unique test diagrams than are held out: "
                f"of the {dsl.NUM_DIAGRAMS:,} diagrams, a fifth of each element count ({shares}) is kept "
                f"for test sets, so that training sees the other four fifths of every kind; "
                f"ask for at most {MAX_TEST}")
    if args.size is not None and args.size < 8:
        return f"--size must be at least 8 pixels, not {args.size}"
    if not 0 <= args.damage <= 1:
        return f"--damage is a share of the training images, from 0 to 1, not {args.damage}"
    return None


def main(args: Arguments):
    language = language_of(args.dsl)
    out_dir = Path(args.out_dir)
    digits = max(5, len(str(max(args.num_samples, args.num_test))))
    # One random stream per image, so each image's item and style depend on the seed alone.
    test_items = sample_test_items(language, args.num_test, args.seed)
    test_rows = [(f"test_{i:0{digits}d}.png", item, random.Random(f"{args.seed}:test:{i}"))
                 for i, item in enumerate(test_items)]
    train_rows = []
    for i in range(args.num_samples):
        rng = random.Random(f"{args.seed}:train:{i}")
        train_rows.append((f"train_{i:0{digits}d}.png", sample_training_item(language, rng), rng))

    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    remove_old_files(out_dir)
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
    except TooFewTestTexts as error:
        print(f"create_images.py: error: {error}", file=sys.stderr)
        sys.exit(2)
