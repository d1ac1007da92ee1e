"""Read diagrams with a fine-tuned checkpoint: write their DSL, and score it.

    python inference.py --checkpoint checkpoints example.png          # DSL of some images
    python inference.py --checkpoint checkpoints --csv test.csv --eval # the metrics of docs/SPEC.md
    python inference.py --checkpoint checkpoints/epoch-01 --csv test.csv --out predictions.csv --render renders

--checkpoint takes a run folder (its best checkpoint, else its latest epoch) or one
checkpoint folder, and says which it took. Decoding follows the DSL's grammar, so every
output is a valid diagram (--constrained false lets the model write anything). With
--eval, the last line printed is one JSON object of the scores.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

import checkpoint
import data
import dsl
import files
import hardware
import language_model
import renderer
import settings
from model import READ_BATCH, CheckpointError, DiagramReader, read_json
from settings import setting


@dataclass
class Arguments:
    checkpoint: str = setting("checkpoints", "a run folder (its best checkpoint, else latest epoch) or a checkpoint")
    csv: str = setting("", "a data CSV (image_path,dsl) to read; --eval scores it")
    eval: bool = setting(False, "score the predictions against the CSV's dsl column")
    out: str = setting("", "write predictions (with their confidence) to this CSV")
    render: str = setting("", "write each input beside its re-rendered prediction here")
    llm: str = setting("", "load the base LLM from here instead (the same model, moved)")
    skip_bad_rows: bool = setting(False, "read the good rows of a CSV with bad ones")
    constrained: bool = setting(True, "decode by the DSL's grammar: every output parses")
    flag_below: float = setting(0.0, "list the doubtful images: confidence below this, or ink that disagrees")
    batch_size: int = setting(READ_BATCH, "images decoded together")
    device: str = setting("auto", "auto (cuda when there is one), cpu, cuda, ...")
    dtype: str = setting("auto", "auto (the fastest safe one here, by measurement), float32, bfloat16, float16")


def render_side_by_side(image: Image.Image | Path, prediction: str, size: int = 224) -> Image.Image:
    """The input (a picture or its file), and beside it the prediction drawn by renderer.py
    (or why it could not be)."""
    canvas = Image.new("RGB", (2 * size, size), "white")
    picture = image if isinstance(image, Image.Image) else data.load_image(image)
    canvas.paste(picture.convert("RGB").resize((size, size)), (0, 0))
    if (diagram := dsl.parse_or_none(prediction)) is not None:
        canvas.paste(renderer.render(diagram, size), (size, 0))
    else:
        ImageDraw.Draw(canvas).text((size + 8, size // 2), "not a valid diagram", fill="red")
    ImageDraw.Draw(canvas).line([(size, 0), (size, size)], fill="gray")
    return canvas


def print_coverage(predictions, references, confidences, agreements):
    """Exact match among the predictions kept at each confidence threshold (and full
    agreement), against the share kept: how far the confidence can be trusted."""
    exact = [dsl.canonical(p) == r for p, r in zip(predictions, references)]
    print(f"{'kept if':38}{'kept':>8}{'exact among kept':>18}")
    for threshold in (0.0, 0.5, 0.9, 0.99, 0.999):
        for need_agreement in (False, True):
            kept = [e for e, c, a in zip(exact, confidences, agreements) if c >= threshold
                    and (a == 1 or not need_agreement)]
            rule = f"confidence >= {threshold}" + (" and agreement 1" if need_agreement else "")
            print(f"{rule:38}{len(kept) / len(exact):>8.3f}{sum(kept) / len(kept) if kept else float('nan'):>18.4f}")


def print_scores(scores: dict):
    columns = ("n", "exact_match", "element_precision", "element_recall", "element_f1", "valid_rate")
    print(f"{'':12}" + "".join(f"{c:>19}" for c in columns))
    rows = [("overall", scores)] + [(f"{k} element{'s' * (k > 1)}", s) for k, s in scores["by_count"].items()]
    for name, s in rows:
        print(f"{name:12}" + "".join(f"{s[c]:>19}" if c == "n" else f"{s[c]:>19.4f}" for c in columns))
    print(json.dumps(scores))


def load(args: Arguments) -> DiagramReader:
    """The checkpoint --checkpoint names, on the device, in the dtype asked for (or measured)."""
    folder, why = checkpoint.find(args.checkpoint)
    print(f"checkpoint {folder} ({why})", file=sys.stderr)
    device = hardware.pick_device(args.device)
    llm = args.llm or read_json(folder / "config.json").get("llm", "")
    dtype, reason = hardware.choose_dtype(args.dtype, device, lambda: language_model.mlp_shape(llm))
    print(reason, file=sys.stderr)
    reader = DiagramReader.from_pretrained(folder, hardware.DTYPES[dtype], args.llm, merge=True)
    return reader.use_attention_for(device).to(device).eval()


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

    reader = load(args)
    with tqdm(total=2 * len(paths), desc="reading diagrams", unit="img", file=sys.stderr) as bar:
        readings = reader.read_images(paths, args.batch_size, args.constrained, progress=bar)
    predictions = [r.dsl for r in readings]
    confidences = [r.confidence for r in readings]
    agreements = [r.agreement for r in readings]
    for path, reading in zip(paths, readings):
        print(f"# {path} (confidence {reading.confidence:.3f}, agreement {reading.agreement:.2f})\n"
              f"{reading.dsl.rstrip()}")
    if args.flag_below:
        doubtful = [(p, c, a) for p, c, a in zip(paths, confidences, agreements) if c < args.flag_below or a < 1]
        print(f"{len(doubtful)} doubtful of {len(paths)} (confidence below {args.flag_below}, or ink that "
              "disagrees with the prediction):", file=sys.stderr)
        for path, confidence, agrees in doubtful:
            print(f"  {path}: confidence {confidence:.3f}, agreement {agrees:.2f}", file=sys.stderr)

    if args.out:
        data.write_csv(args.out, ([str(path), reading.dsl, reading.valid, f"{reading.confidence:.4f}",
                                   f"{reading.agreement:.2f}"] for path, reading in zip(paths, readings)),
                       ["image_path", "dsl", "valid", "confidence", "agreement"])
    if args.render:
        Path(args.render).mkdir(parents=True, exist_ok=True)
        for i, (path, prediction) in enumerate(zip(paths, predictions)):
            with files.replacing(Path(args.render) / f"{i:05d}_{path.stem}.png") as temporary:
                render_side_by_side(path, prediction).save(temporary)
    if args.eval:
        references = [row.dsl for row in rows]
        print_coverage(predictions[:len(rows)], references, confidences, agreements)
        print_scores(dsl.score(predictions[:len(rows)], references))
    return 1 if failed else 0


if __name__ == "__main__":
    arguments, extra = settings.parse(sys.argv[1:], Arguments, program="inference.py",
                                      positional=("image_paths", {"nargs": "*", "metavar": "IMAGE",
                                                                  "help": "image files to read"}))
    try:
        sys.exit(main(arguments, extra.image_paths))
    except files.DiskFull as error:
        print(f"inference.py: error: {error}", file=sys.stderr)
        sys.exit(1)
    except (data.DataError, CheckpointError, ValueError) as error:
        print(f"inference.py: error: {error}", file=sys.stderr)
        sys.exit(2)
