"""Read diagrams with a fine-tuned checkpoint: write their DSL, and score it.

    python inference.py --checkpoint checkpoints example.png          # DSL of some images
    python inference.py --checkpoint checkpoints --csv test.csv --eval # SPEC's metrics
    python inference.py --checkpoint checkpoints/epoch-02 --csv test.csv --out predictions.csv --render renders

--checkpoint takes a run folder (its latest epoch) or one checkpoint folder. With
--eval, the last line printed is one JSON object of the scores.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm
from transformers import HfArgumentParser

import data
import dsl
import renderer
from model import DTYPES, CheckpointError, find_checkpoint, load_checkpoint, with_examples


@dataclass
class Arguments:
    checkpoint: str = field(default="checkpoints", metadata={"help": "a run folder (latest epoch) or a checkpoint"})
    csv: str = field(default="", metadata={"help": "a data CSV (image_path,dsl) to read; --eval scores it"})
    eval: bool = field(default=False, metadata={"help": "score the predictions against the CSV's dsl column"})
    out: str = field(default="", metadata={"help": "write predictions to this CSV"})
    render: str = field(default="", metadata={"help": "write each input beside its re-rendered prediction here"})
    llm: str = field(default="", metadata={"help": "load the base LLM from here instead (the same model, moved)"})
    skip_bad_rows: bool = field(default=False, metadata={"help": "read the good rows of a CSV with bad ones"})
    batch_size: int = 16
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    device: str = "auto"  # auto: cuda when there is one


def predict(reader, vision, examples, paths, batch_size, device) -> list[str]:
    """Raw model outputs for image files."""
    example_features = vision.encode([image for image, _ in examples]).to(device)
    example_dsls = [text for _, text in examples]
    predictions = []
    with tqdm(total=len(paths), desc="reading diagrams", unit="img", file=sys.stderr) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            features = vision.encode(chunk).to(device)
            predictions += reader.generate(with_examples(example_features, features), [example_dsls] * len(chunk))
            bar.update(len(chunk))
    return predictions


def render_side_by_side(image_path: Path, prediction: str, out_path: Path, size: int = 224):
    """The input, and beside it the prediction drawn by renderer.py (or why it could not be)."""
    canvas = Image.new("RGB", (2 * size, size), "white")
    canvas.paste(data.load_image(image_path).resize((size, size)), (0, 0))
    if (diagram := dsl.parse_or_none(prediction)) is not None:
        canvas.paste(renderer.render(diagram, size), (size, 0))
    else:
        ImageDraw.Draw(canvas).text((size + 8, size // 2), "not a valid diagram", fill="red")
    ImageDraw.Draw(canvas).line([(size, 0), (size, size)], fill="gray")
    canvas.save(out_path)


def print_scores(scores: dict):
    columns = ("n", "exact_match", "element_precision", "element_recall", "element_f1", "valid_rate")
    print(f"{'':12}" + "".join(f"{c:>19}" for c in columns))
    rows = [("overall", scores)] + [(f"{k} element{'s' * (k > 1)}", s) for k, s in scores["by_count"].items()]
    for name, s in rows:
        print(f"{name:12}" + "".join(f"{s[c]:>19}" if c == "n" else f"{s[c]:>19.4f}" for c in columns))
    print(json.dumps(scores))


def main(args: Arguments, image_args: list[str]) -> int:
    if args.eval and not args.csv:
        raise data.DataError("--eval needs --csv (a CSV with the reference dsl)")
    # Input is checked before the model loads: a bad CSV stops here; a bad image path is
    # reported and skipped, and the exit status says so.
    rows, skipped = data.read_dataset(args.csv, args.skip_bad_rows) if args.csv else ([], 0)
    if skipped:
        print(f"skipping {skipped} bad rows of {args.csv} (--skip_bad_rows)", file=sys.stderr)
    paths = [row.image_path for row in rows]
    failed = 0
    for name in image_args:
        if problem := data.image_problem(Path(name)):
            print(f"inference.py: {name}: {problem}", file=sys.stderr)
            failed += 1
        else:
            paths.append(Path(name))
    if not paths:
        if failed:
            return 1
        raise data.DataError("nothing to read: give image files and/or --csv")

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    folder = find_checkpoint(args.checkpoint)
    print(f"checkpoint {folder}", file=sys.stderr)
    reader, vision, examples = load_checkpoint(folder, DTYPES[args.dtype], args.llm)
    reader.to(device).eval()
    vision.to(device)

    predictions = predict(reader, vision, examples, paths, args.batch_size, device)
    for path, prediction in zip(paths, predictions):
        print(f"# {path}\n{dsl.canonical(prediction).rstrip()}")

    if args.out:
        with open(args.out, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image_path", "dsl", "valid"])
            for path, prediction in zip(paths, predictions):
                writer.writerow([str(path), dsl.canonical(prediction), dsl.is_valid(prediction)])
    if args.render:
        Path(args.render).mkdir(parents=True, exist_ok=True)
        for i, (path, prediction) in enumerate(zip(paths, predictions)):
            render_side_by_side(path, prediction, Path(args.render) / f"{i:05d}_{path.stem}.png")
    if args.eval:
        print_scores(dsl.evaluate(predictions[:len(rows)], [row.dsl for row in rows]))
    return 1 if failed else 0


if __name__ == "__main__":
    parser = HfArgumentParser(Arguments)
    parser.add_argument("image_paths", nargs="*", metavar="IMAGE", help="image files to read")
    arguments, extra = parser.parse_args_into_dataclasses()
    try:
        sys.exit(main(arguments, extra.image_paths))
    except (data.DataError, CheckpointError) as error:
        print(f"inference.py: error: {error}", file=sys.stderr)
        sys.exit(2)
