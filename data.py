"""Reading the data files of docs/SPEC.md (`image_path,dsl` CSVs), checked before any model loads.

`read_dataset` checks the whole CSV first (columns, image files that decode, DSL that
parses, duplicates) and reports every bad row at once, so that a typo in row 1,412
fails at once, not minutes into training.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

import files
import languages

COLUMNS = ["image_path", "dsl"]
SHOWN = 5  # bad rows listed in an error message
MIN_SIDE = 16  # pixels: a smaller picture cannot show four quadrants' shapes


class DataError(Exception):
    """A data file that cannot be used as it is; the message says what to fix."""


@dataclass(frozen=True)
class Row:
    image_path: Path  # absolute, or relative to the working directory
    dsl: str  # the text as written (validated): some DSLs write a picture's parts in the order it shows them


def load_image(path: str | Path) -> Image.Image:
    """An image file as RGB (grayscale, RGBA and palette images are converted)."""
    with Image.open(path) as image:
        image.load()
        if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, "white")  # transparent means background
            return Image.alpha_composite(background, image).convert("RGB")
        return image.convert("RGB")


def image_problem(path: Path) -> str | None:
    """Why an image file cannot be used, or None. The same check for training's CSVs and for
    inference's pictures: a file cut short is refused even where PIL would decode what is there."""
    if not path.exists():
        return "no such file"
    if not path.is_file():
        return "not a file"
    try:
        with Image.open(path) as image:
            image.verify()  # the file's structure and checksums, to its end
        image = load_image(path)
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return f"cannot be decoded ({error})"
    if min(image.size) < MIN_SIDE:
        return f"too small to read ({image.width} x {image.height} pixels; at least {MIN_SIDE} on each side)"
    return None


def write_csv(path: str | Path, rows, columns: list[str] = COLUMNS):
    """A CSV written whole or not at all (files.py): a header, then the rows."""
    with files.replacing(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)


def read_dataset(csv_path: str | Path, skip_bad_rows: bool = False,
                 language: languages.Language | None = None) -> tuple[list[Row], int]:
    """The rows of a data CSV, image paths resolved against the CSV's folder, every row checked,
    its texts against `language` (default: the diagram DSL).

    Returns (good rows, number of bad rows skipped). Raises DataError for a file that
    is missing, has the wrong columns or no rows, and, unless skip_bad_rows, for any
    bad row: the message counts them and shows the first few.
    """
    csv_path = Path(csv_path)
    language = language or languages.load("diagram")
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such file")
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            records = list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{csv_path}: not a readable CSV file ({error})") from None
    if columns != COLUMNS:
        missing = [c for c in COLUMNS if c not in columns]
        extra = [c for c in columns if c not in COLUMNS]
        details = "; ".join(filter(None, [missing and f"missing column(s) {', '.join(missing)}",
                                          extra and f"unexpected column(s) {', '.join(map(str, extra))}"]))
        raise DataError(f"{csv_path}: expected the columns {','.join(COLUMNS)}, found "
                        f"{','.join(map(str, columns)) or 'none'} ({details or 'in another order'})")
    if not records:
        raise DataError(f"{csv_path}: no rows: the file has a header and nothing else")

    rows, problems, seen = [], [], {}
    for number, record in enumerate(records, start=1):
        raw_path, text = record["image_path"], record["dsl"]
        if raw_path is None or text is None or None in record:
            problems.append((number, raw_path, "wrong number of fields"))
            continue
        path = Path(raw_path) if Path(raw_path).is_absolute() else csv_path.parent / raw_path
        problem = image_problem(path) if raw_path.strip() else "empty image_path"
        if problem is None:
            try:
                language.canonical(text)
            except ValueError as error:
                problem = f"bad DSL: {error}"
        if problem is None and path in seen:
            problem = f"duplicate of row {seen[path]} (the same image)"
        if problem:
            problems.append((number, raw_path, problem))
            continue
        seen[path] = number
        rows.append(Row(path, text))

    if problems and not skip_bad_rows:
        shown = "\n".join(f"  row {n}: {p!r}: {why}" for n, p, why in problems[:SHOWN])
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise DataError(f"{csv_path}: {len(problems)} of {len(records)} rows are bad (row 1 is the first "
                        f"after the header):\n{shown}{more}\nFix them, or pass --skip_bad_rows true to use "
                        f"the other {len(rows)}.")
    if not rows:
        raise DataError(f"{csv_path}: all {len(records)} rows are bad; the first: row {problems[0][0]}: "
                        f"{problems[0][2]}")
    return rows, len(problems)
