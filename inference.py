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
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import checkpoint
import data
import files
import hardware
import language_model
import languages
import settings
from checkpoint import CheckpointError, read_json
from model import READ_BATCH, DiagramReader
from settings import setting

PICTURES_IN_MEMORY = 256  # pictures decoded from their files at a time
# How much less likely (in nats) the model may find the ink's own reading and still be overruled
# by it: chosen on the training code's own pictures, photo-damaged and zoomed out (docs/LOG.md).
INK_MARGIN = 6.0
# A reading taken from the ink has this confidence: the model's own least token probability in it
# says how much it preferred its own reading (0.13-0.21 on average), not how often such a reading
# is right: 20 of 24 on the training code's own pictures, cropped to their canvas (docs/LOG.md).
INK_CONFIDENCE = 0.83
# The ink fitting another reading in some quadrant, or putting a size on the line between two, is
# a doubt only where the model or its picture head is less sure than this of its reading: a
# shadow, a blur or a neighbour's stroke that widens a quadrant's ink should not outweigh both
# being this sure (chosen on the training code's own pictures: it kept every wrong reading the ink
# caught there, and flagged a third fewer right ones; docs/LOG.md).
SURE = 0.99


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
    ink_margin: float = setting(INK_MARGIN, "take the ink's own reading where the DSL has one and the model gives it "
                                            "a log-probability at most this far below its own (0: never)")
    find_canvas: bool = setting(True, "crop a picture whose diagram is smaller than the frame, with no edge showing, "
                                      "to the canvas its shapes show, where the DSL can (diagram)")
    flag_below: float = setting(0.0, "list the doubtful images and why: confidence or picture check below this, "
                                     f"the ink fitting another reading or leaving a size undecided while either "
                                     f"is under {SURE}, or the reading the ink's (0: no list)")
    reliability_png: str = setting("reliability.png", "with --eval: the reliability diagram of the confidence")
    batch_size: int = setting(READ_BATCH, "images decoded together")
    device: str = setting("auto", "auto (cuda when there is one), cpu, cuda, ...")
    dtype: str = setting("auto", "auto (the fastest safe one here, by measurement), float32, bfloat16, float16")


@dataclass
class Reading:
    """What the model read in one picture."""

    dsl: str  # the canonical DSL text (the raw output where it does not parse: never with grammar decoding)
    valid: bool  # the text parses under the DSL
    confidence: float  # the lowest probability the model gave to a token it chose
    # Render and compare, for a DSL that has it (diagram: the share of quadrants where the reading
    # says what the ink there fits, ink_fit.py); None for one without.
    agreement: float | None
    # The picture head's probability of what the reading says, from the image tokens alone
    # (DiagramReader.picture_check); None for a model without the head.
    picture_check: float | None = None
    from_ink: bool = False  # the ink's own reading, taken over the model's (prefer_the_ink)
    # The ink leaves some of the reading undecided, for a DSL that can tell (diagram: a shape's
    # size on the line between two); None for one that cannot.
    borderline: bool | None = None


def read(reader: DiagramReader, pictures: list[Image.Image | str | Path], batch_size: int = READ_BATCH,
         constrained: bool = True, progress=None, ink_margin: float = INK_MARGIN,
         find_canvas: bool = True) -> list[Reading]:
    """Read pictures (PIL images or files): each one's DSL, confidence, agreement and picture check.
    Where the DSL has them: each picture first cropped to its diagram's canvas (find_canvas), and
    the ink's own reading taken where the model finds it nearly as likely (ink_margin; 0: never).

        reader = inference.load("checkpoints")
        for reading in inference.read(reader, ["example.png"]):
            print(reading.dsl, reading.confidence, reading.agreement)
    """
    language, readings = reader.language, []
    agreement, borderline = language.part("agreement"), language.part("borderline")
    ink_reading = language.part("ink_reading")
    crop_to_canvas = (find_canvas and language.part("crop_to_canvas")) or (lambda picture: picture)
    for start in range(0, len(pictures), PICTURES_IN_MEMORY):
        chunk = [picture.convert("RGB") if isinstance(picture, Image.Image) else data.load_image(picture)
                 for picture in pictures[start:start + PICTURES_IN_MEMORY]]
        chunk = [crop_to_canvas(picture) for picture in chunk]
        features = reader.vision.encode(chunk, progress=progress)
        texts, confidences = reader.read_features(features, batch_size, constrained, progress)
        taken = [False] * len(texts)
        if ink_reading and ink_margin:
            texts, confidences, taken = prefer_the_ink(reader, features, chunk, texts, confidences, ink_reading,
                                                       ink_margin)
        checks = reader.picture_check(features, texts)
        readings += [Reading(language.canonical_or_raw(text), language.is_valid(text), confidence,
                             agreement(picture, text) if agreement else None, check, from_ink,
                             borderline(picture, text) if borderline else None)
                     for picture, text, confidence, check, from_ink in zip(chunk, texts, confidences, checks, taken)]
    return readings


def prefer_the_ink(reader: DiagramReader, features: torch.Tensor, pictures: list[Image.Image], texts: list[str],
                   confidences: list[float], ink_reading, margin: float) -> tuple[list[str], list[float], list[bool]]:
    """Two candidates reranked by render and compare, as DeTikZify reranks its candidates by how
    like the picture their renders are: where the ink alone reads otherwise than the model (the
    DSL's ink_reading) and the model gives that reading a log-probability at most `margin`
    below its own, the ink's reading is taken, with the confidence INK_CONFIDENCE. Returns the
    texts, their confidences and which were taken from the ink."""
    texts, confidences, taken = list(texts), list(confidences), [False] * len(texts)
    others = [ink_reading(picture) for picture in pictures]
    differ = [i for i, other in enumerate(others)
              if other is not None and other != reader.language.canonical_or_raw(texts[i])]
    for start in range(0, len(differ), READ_BATCH // 2):  # both candidates of each picture in one call
        chunk = differ[start:start + READ_BATCH // 2]
        scores = reader.score_texts(features[chunk].repeat_interleave(2, dim=0),
                                    [text for i in chunk for text in (texts[i], others[i])])
        for i, (own, _), (theirs, _) in zip(chunk, scores[::2], scores[1::2]):
            if theirs >= own - margin:
                texts[i], confidences[i], taken[i] = others[i], INK_CONFIDENCE, True
    return texts, confidences, taken


def doubts(reading: Reading, below: float) -> list[str]:
    """Why a reading is doubtful, one phrase a reason: the LLM's confidence, or the picture head's
    probability of the reading, below `below`; the ink fitting another reading in some quadrant
    (agreement below 1, where the DSL has a render-and-compare), or leaving some of it undecided
    (borderline), while the two are not both SURE of it; the reading the ink's, which the model
    found less likely than its own; none when it is not."""
    reasons = [f"confidence {reading.confidence:.3f} is below {below}"] if reading.confidence < below else []
    if reading.picture_check is not None and reading.picture_check < below:
        reasons += [f"the image tokens alone give it {reading.picture_check:.3f}"]
    if reading.agreement is not None and reading.agreement < 1 and not sure(reading):
        reasons += [f"the ink fits another reading (agreement {reading.agreement:.2f})"]
    if reading.borderline and not sure(reading):
        reasons += ["the ink puts a shape's size on the line between two"]
    if reading.from_ink:
        reasons += ["the ink's reading, which the model found less likely than its own"]
    return reasons


def sure(reading: Reading) -> bool:
    """Whether the LLM's confidence and the picture head's probability (where there is one) are
    both at least SURE: then the ink fitting another reading, or leaving a size undecided, is no
    doubt."""
    return min(reading.confidence, 1.0 if reading.picture_check is None else reading.picture_check) >= SURE


def doubtful(reading: Reading, below: float) -> bool:
    """The doubt flag: any of `doubts`."""
    return bool(doubts(reading, below))


def render_side_by_side(image: Image.Image | Path, prediction: str, language: languages.Language,
                        size: int = 224) -> Image.Image:
    """The input (a picture or its file), and beside it the prediction drawn by the DSL's
    renderer (or why it could not be)."""
    canvas = Image.new("RGB", (2 * size, size), "white")
    picture = image if isinstance(image, Image.Image) else data.load_image(image)
    canvas.paste(picture.convert("RGB").resize((size, size)), (0, 0))
    render = language.part("picture")
    if render and language.is_valid(prediction):
        canvas.paste(render(prediction, size).convert("RGB").resize((size, size)), (size, 0))
    else:
        why = f"not valid {language.name}" if render else f"{language.name} has no renderer"
        ImageDraw.Draw(canvas).text((size + 8, size // 2), why, fill="red")
    ImageDraw.Draw(canvas).line([(size, 0), (size, size)], fill="gray")
    return canvas


def print_coverage(exact: list[bool], confidences: list[float], agreements: list[float | None]):
    """Exact match among the predictions kept at each confidence threshold (and full
    agreement, where the DSL has it), against the share kept: how far the confidence can be trusted."""
    print(f"{'kept if':38}{'kept':>8}{'exact among kept':>18}")
    for threshold in (0.0, 0.5, 0.9, 0.99, 0.999):
        for need_agreement in (False, True) if None not in agreements else (False,):
            kept = [e for e, c, a in zip(exact, confidences, agreements) if c >= threshold
                    and (a == 1 or not need_agreement)]
            rule = f"confidence >= {threshold}" + (" and agreement 1" if need_agreement else "")
            print(f"{rule:38}{len(kept) / len(exact):>8.3f}{sum(kept) / len(kept) if kept else float('nan'):>18.4f}")


def calibration(confidences: list[float], correct: list[bool], bins: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error of the confidence (how far, weighted by pictures, each
    bin's mean confidence is from its share of exact readings), and the bins."""
    rows = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [(c, k) for c, k in zip(confidences, correct) if low <= c < high or (b == bins - 1 and c == 1.0)]
        if members:
            rows.append({"low": low, "high": high, "n": len(members),
                         "confidence": sum(c for c, _ in members) / len(members),
                         "exact": sum(k for _, k in members) / len(members)})
    ece = sum(r["n"] * abs(r["confidence"] - r["exact"]) for r in rows) / max(1, len(confidences))
    return ece, rows


def write_reliability_diagram(rows: list[dict], ece: float, path: str | Path):
    """Exact share against mean confidence, bin by bin: on the diagonal when calibrated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.plot([0, 1], [0, 1], ":", color="gray", label="calibrated")
    axes.bar([r["low"] for r in rows], [r["exact"] for r in rows], width=[r["high"] - r["low"] for r in rows],
             align="edge", alpha=0.6, edgecolor="black", label="exact match in the bin")
    axes.plot([r["confidence"] for r in rows], [r["exact"] for r in rows], "o", color="C3", label="bin's confidence")
    axes.set(xlabel="confidence", ylabel="exact match", xlim=(0, 1), ylim=(0, 1.02),
             title=f"reliability (ECE {ece:.3f}, n {sum(r['n'] for r in rows)})")
    axes.legend(loc="upper left")
    figure.tight_layout()
    with files.replacing(path) as temporary:
        figure.savefig(temporary, dpi=100)
    plt.close(figure)


def print_scores(scores: dict):
    """A table of the scores (the DSL's own, such as element F1, between exact match and valid
    rate), by element count where the DSL counts them; then the JSON line."""
    own = [c for c in scores if c.endswith(("_precision", "_recall", "_f1"))]
    columns = ("n", "exact_match", *own, "valid_rate", "cer")
    print(f"{'':12}" + "".join(f"{c:>19}" for c in columns))
    rows = [("overall", scores)] + [(f"{k} element{'s' * (k > 1)}", s) for k, s in scores.get("by_count", {}).items()]
    for name, s in rows:
        print(f"{name:12}" + "".join(f"{s[c]:>19}" if c == "n" else f"{s.get(c, math.nan):>19.4f}" for c in columns))
    print(json.dumps(scores))


def load(checkpoint_path: str | Path, device: str = "auto", dtype: str = "auto", llm: str = "") -> DiagramReader:
    """A checkpoint (a run folder or a checkpoint folder) for reading, on the device, in the dtype
    asked for (or measured); `llm` loads the base LLM from elsewhere (the same model, moved)."""
    folder, why = checkpoint.find(checkpoint_path)
    print(f"checkpoint {folder} ({why})", file=sys.stderr)
    device = hardware.pick_device(device)
    base = llm or read_json(folder / "config.json").get("llm", "")
    dtype, reason = hardware.choose_dtype(dtype, device, lambda: language_model.mlp_shape(base))
    print(reason, file=sys.stderr)
    reader = DiagramReader.from_pretrained(folder, hardware.DTYPES[dtype], llm, merge_adapter=True)
    return reader.use_attention_for(device).to(device).eval()


def language_of(checkpoint_path: str | Path) -> languages.Language:
    """The DSL a checkpoint writes (config.json), read before the model loads."""
    folder, _ = checkpoint.find(checkpoint_path)
    return languages.load(read_json(folder / "config.json").get("dsl", "diagram"))


def notes(reading: Reading) -> str:
    """", agreement 1.00, picture check 0.998": what a reading has beside its confidence."""
    return ("" if reading.agreement is None else f", agreement {reading.agreement:.2f}") + \
           ("" if reading.picture_check is None else f", picture check {reading.picture_check:.3f}") + \
           (", the ink's reading" if reading.from_ink else "")


def main(args: Arguments, image_args: list[str]) -> int:
    if args.eval and not args.csv:
        raise data.DataError("--eval needs --csv (a CSV with the reference dsl)")
    # Input is checked before the model loads: a bad CSV stops here; a bad image path is
    # reported and skipped, and the exit status says so.
    language = language_of(args.checkpoint)
    rows, skipped = data.read_dataset(args.csv, args.skip_bad_rows, language) if args.csv else ([], 0)
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

    reader = load(args.checkpoint, args.device, args.dtype, args.llm)
    with tqdm(total=2 * len(paths), desc="reading diagrams", unit="img", file=sys.stderr) as bar:
        readings = read(reader, paths, args.batch_size, args.constrained, progress=bar, ink_margin=args.ink_margin,
                        find_canvas=args.find_canvas)
    predictions = [r.dsl for r in readings]
    confidences = [r.confidence for r in readings]
    agreements = [r.agreement for r in readings]
    for path, reading in zip(paths, readings):
        print(f"# {path} (confidence {reading.confidence:.3f}{notes(reading)})\n{reading.dsl.rstrip()}")
    if args.flag_below:
        flagged = [(p, r) for p, r in zip(paths, readings)
                   if doubtful(r, args.flag_below)]
        print(f"{len(flagged)} doubtful of {len(paths)} (docs/SPEC.md's doubt flag at {args.flag_below}):",
              file=sys.stderr)
        for path, reading in flagged:
            print(f"  {path}: {'; '.join(doubts(reading, args.flag_below))}", file=sys.stderr)

    if args.out:
        data.write_csv(args.out, ([str(path), reading.dsl, reading.valid, f"{reading.confidence:.4f}",
                                   "" if reading.agreement is None else f"{reading.agreement:.2f}",
                                   "" if reading.picture_check is None else f"{reading.picture_check:.4f}"]
                                  for path, reading in zip(paths, readings)),
                       ["image_path", "dsl", "valid", "confidence", "agreement", "picture_check"])
    if args.render:
        Path(args.render).mkdir(parents=True, exist_ok=True)
        for i, (path, prediction) in enumerate(zip(paths, predictions)):
            with files.replacing(Path(args.render) / f"{i:05d}_{path.stem}.png") as temporary:
                render_side_by_side(path, prediction, reader.language).save(temporary)
    if args.eval:
        references = [row.dsl for row in rows]
        exact = [reader.language.canonical_or_raw(p) == reader.language.canonical(r)
                 for p, r in zip(predictions, references)]
        print_coverage(exact, confidences, agreements)
        ece, bins = calibration(confidences[:len(rows)], exact)
        if args.reliability_png:
            write_reliability_diagram(bins, ece, args.reliability_png)
        print(f"expected calibration error of the confidence: {ece:.4f}"
              + (f" (reliability diagram: {args.reliability_png})" if args.reliability_png else ""))
        print_scores({**reader.language.score(predictions[:len(rows)], references), "ece": round(ece, 4)})
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
