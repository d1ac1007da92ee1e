"""Learning curves: validation exact match and element F1 against images seen, for runs side by side.

    python -m tools.learning_curve checkpoints
    python -m tools.learning_curve runs/a runs/b --labels "recipe A" "recipe B" --out docs/learning_curve.png

Reads each run folder's log.jsonl (finetune.py writes it): every step's record carries the
cumulative images_seen and train_flops, every validation its scores. Images seen and FLOPs
say what a run cost on any machine; its minutes depend on the machine. Prints, per run, the
images and TFLOP at which validation exact match first reached 0.9, 0.95 and 0.99.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import files
import settings
from settings import setting

MILESTONES = (0.9, 0.95, 0.99)


@dataclass
class Arguments:
    labels: list[str] = setting([], "a label per run (default: the folders' names)")
    out: str = setting("learning_curve.png", "the PNG to write")


def read_curve(run_dir: Path) -> list[dict]:
    """(images seen, TFLOP, exact match, element F1, validation images) at each validation."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {run_dir} a run folder of finetune.py?)")
    records = files.read_jsonl(path, "learning_curve")
    cost = {r["step"]: r for r in records if "images_seen" in r}
    curve = []
    for record in records:
        scores = record.get("eval")
        if scores and scores["step"] in cost:
            seen = cost[scores["step"]]
            curve.append({"images_seen": seen["images_seen"], "tflop": seen["train_flops"] / 1e12,
                          "exact_match": scores["exact_match"], "element_f1": scores["element_f1"],
                          "n": scores.get("n")})
    if not curve:
        raise ValueError(f"{path}: no validation with images_seen (a run of an older finetune.py?)")
    return curve


def plot(curves: dict[str, list[dict]], out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, curve in curves.items():
        images = [point["images_seen"] for point in curve]
        line, = left.plot(images, [point["exact_match"] for point in curve], "o-", label=label)
        right.plot(images, [point["element_f1"] for point in curve], "s-", color=line.get_color(), label=label)
    for axis, title in ((left, "validation exact match"), (right, "validation element F1")):
        axis.set(xlabel="training images seen by the LLM", ylim=(0, 1.02), title=title)
        axis.grid(alpha=0.3)
    left.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    with files.replacing(out) as temporary:
        figure.savefig(temporary, dpi=110)
    plt.close(figure)


def main(run_dirs: list[str], args: Arguments) -> dict:
    if not run_dirs:
        raise ValueError("name at least one run folder")
    if args.labels and len(args.labels) != len(run_dirs):
        raise ValueError(f"{len(args.labels)} labels for {len(run_dirs)} runs")
    labels = args.labels or [Path(d).name for d in run_dirs]
    curves = {label: read_curve(Path(d)) for label, d in zip(labels, run_dirs)}
    plot(curves, Path(args.out))
    summary = {}
    for label, curve in curves.items():
        reached = {}
        for goal in MILESTONES:
            first = next((p for p in curve if p["exact_match"] >= goal), None)
            reached[str(goal)] = {"images_seen": first["images_seen"], "tflop": round(first["tflop"], 1)} \
                if first else None
        last = curve[-1]
        summary[label] = {"final": last, "first_reached": reached}
        print(f"{label}: after {last['images_seen']} images ({last['tflop']:.1f} TFLOP): exact "
              f"{last['exact_match']:.3f}, element F1 {last['element_f1']:.3f}; exact first >= " +
              ", ".join(f"{goal}: " + (f"{r['images_seen']} images" if r else "never") for goal, r in reached.items()))
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    arguments, extra = settings.parse(sys.argv[1:], Arguments, program="python -m tools.learning_curve",
                                      positional=("run_dirs", {"nargs": "*", "metavar": "RUN",
                                                               "help": "run folders (finetune.py's --output_dir)"}))
    try:
        print(json.dumps(main(extra.run_dirs, arguments)))
    except (OSError, ValueError) as error:
        print(f"learning_curve: error: {error}", file=sys.stderr)
        sys.exit(2)
