"""The vision side alone: what the image tokens say, read by the picture head, with no LLM.

    python -m tools.vision_probe                          # the default settings, data.csv and test.csv
    python -m tools.vision_probe --projector mlp2x_gelu   # any finetune.py setting

Encodes data.csv (split as finetune.py splits it) and test.csv with the frozen CLIP, trains
the projector and its picture head alone (finetune.py's warm-up stage, for
--projector_warmup_epochs), and prints the share of parts (the diagram DSL's quadrants; for
a DSL whose loss names a picture's contents, the F1 of the classes named) and of whole
pictures the head names right: on the training and validation pictures, on test.csv, and on
test.csv under each damage check. The LLM reads no better than its image tokens allow, so
this run, with no LLM, tells what a CLIP or projector setting can give before a whole run.
The last line is one JSON object.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass

import torch
from accelerate import Accelerator

import damage
import data
import dsl
import finetune
from cost import RunCost
import languages
import settings
from model import DiagramReader, picture_targets
from settings import setting

CLASS_NAMES = ["empty"] + [f"{size} {shape}" for size in dsl.SIZES for shape in dsl.SHAPES]


@dataclass
class Arguments:
    test_csv: str = setting("test.csv", "held-out pictures, read clean and under each damage check")


@torch.no_grad()
def score(reader, features: torch.Tensor, rows: list[data.Row]) -> dict:
    """Parts and whole pictures named right, and the most common confusions."""
    projector = reader.projector.eval()
    truth = picture_targets(reader.language, [row.dsl for row in rows])
    logits = projector.quadrant_logits(projector(features))
    if not projector.region_grid:  # contents: the F1 of the classes the picture shows
        named = (logits > 0).float()
        hits, shown = (named * truth).sum().item(), named.sum().item()
        f1 = 2 * hits / max(1, shown + truth.sum().item())
        return {"n": len(rows), "parts": f1, "pictures": (named == truth).all(1).float().mean().item(),
                "confusions": {}}
    named = logits.argmax(-1)
    right = named == truth
    names = CLASS_NAMES if reader.language.name == "diagram" else list(map(str, range(logits.shape[-1])))
    confusions = Counter(f"{names[t]} as {names[n]}"
                         for t, n in zip(truth.flatten().tolist(), named.flatten().tolist()) if t != n)
    return {"n": len(rows), "parts": right.float().mean().item(), "pictures": right.all(1).float().mean().item(),
            "confusions": dict(confusions.most_common(3))}


def main(config, training, args: Arguments) -> dict:
    torch.manual_seed(training.seed)
    language = languages.load(config.dsl)
    train_rows, val_rows = finetune.split_data(training, language)
    test_rows = data.read_dataset(args.test_csv, language=language)[0]
    reader = DiagramReader.build(config)
    accelerator = Accelerator(cpu=True)
    split = finetune.encode_images(reader, train_rows, val_rows, accelerator, RunCost())
    reader.projector.set_feature_statistics(split.train_features)
    finetune.warm_up_projector(reader, split, training, RunCost(), accelerator)
    results = {"training": score(reader, split.train_features, train_rows),
               "validation": score(reader, split.val_features, val_rows)}
    pictures = [data.load_image(row.image_path) for row in test_rows]
    for kind in damage.CHECKS:  # the same damage as tools/robustness.py's
        damaged = [damage.check(kind, picture, training.seed, i) for i, picture in enumerate(pictures)]
        results[f"test: {kind}"] = score(reader, reader.vision.encode(damaged), test_rows)
    for name, result in results.items():
        print(f"{name:34} n {result['n']:5}  parts {result['parts']:.4f}  pictures {result['pictures']:.3f}  "
              f"{', '.join(f'{k}: {v}' for k, v in result['confusions'].items())}")
    return results


if __name__ == "__main__":
    model_config, train_config, arguments = finetune.parse_configs(sys.argv[1:], Arguments)
    try:
        print(json.dumps(main(model_config, train_config, arguments)))
    except data.DataError as error:
        print(f"vision_probe.py: error: {error}", file=sys.stderr)
        sys.exit(2)
