"""How well a checkpoint reads damaged pictures: ordinary damage, each kind scored apart.

    python -m tools.robustness --checkpoint checkpoints --csv test.csv
    python -m tools.robustness --checkpoint checkpoints --csv other/data.csv --num 100 --out_dir damaged

Damages the first --num images of a data CSV in each way of damage.CHECKS (seeded: the
same damage every time), writes them with a CSV per kind under --out_dir (to look at, or to
score again with inference.py), reads them as inference.py does (inference.read: the canvas
found and the ink's reading a candidate, where the DSL has them) with the model loaded once, and
prints exact match, element F1 and valid rate per kind; the last line is one JSON object.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import damage
import data
import files
import inference
import settings
from checkpoint import CheckpointError
from model import READ_BATCH
from settings import setting


@dataclass
class Arguments:
    checkpoint: str = setting("checkpoints", "a run folder (its best checkpoint, else latest epoch) or a checkpoint")
    csv: str = setting("test.csv", "the data CSV whose images are damaged")
    num: int = setting(200, "how many of its images (the first ones)")
    out_dir: str = setting("damaged", "where the damaged images and their CSVs go")
    seed: int = setting(0, "seeds the random parts of the damage")
    batch_size: int = setting(READ_BATCH, "images decoded together")
    device: str = setting("auto", "auto (cuda when there is one), cpu, cuda, ...")
    dtype: str = setting("auto", "auto (the fastest safe one here, by measurement), float32, bfloat16, float16")


def write_damaged(rows: list[data.Row], kind: str, out_dir: Path, seed: int) -> list[Path]:
    """Each picture, then the CSV naming them, written whole (files.py); an older CSV is
    removed first, as it would name pictures about to change."""
    folder = out_dir / kind.replace(" ", "_")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "data.csv").unlink(missing_ok=True)
    paths = []
    for i, row in enumerate(rows):
        damaged = damage.check(kind, data.load_image(row.image_path), seed, i)
        paths.append(folder / "images" / f"{i:05d}.png")
        with files.replacing(paths[-1]) as temporary:
            damaged.save(temporary)
    data.write_csv(folder / "data.csv", ([f"images/{i:05d}.png", row.dsl] for i, row in enumerate(rows)))
    return paths


def main(args: Arguments) -> dict:
    language = inference.language_of(args.checkpoint)
    rows = data.read_dataset(args.csv, language=language)[0][:args.num]
    reader = inference.load(args.checkpoint, args.device, args.dtype)
    results = {}
    for kind in damage.CHECKS:
        paths = write_damaged(rows, kind, Path(args.out_dir), args.seed)
        predictions = [reading.dsl for reading in inference.read(reader, paths, args.batch_size)]
        scores = language.score(predictions, [row.dsl for row in rows])
        results[kind] = {k: v for k, v in scores.items() if k != "by_count"}
        own = "".join(f"  {k[:-3].replace('_', ' ')} F1 {v:.3f}" for k, v in scores.items() if k.endswith("_f1"))
        print(f"{kind:26} n {scores['n']:4}  exact {scores['exact_match']:.3f}{own}  valid {scores['valid_rate']:.3f}",
              flush=True)
    return results


if __name__ == "__main__":
    (arguments,) = settings.parse(sys.argv[1:], Arguments, program="python -m tools.robustness")
    try:
        print(json.dumps(main(arguments)))
    except (data.DataError, CheckpointError) as error:
        print(f"robustness.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except files.DiskFull as error:
        print(f"robustness.py: error: {error}", file=sys.stderr)
        sys.exit(1)
