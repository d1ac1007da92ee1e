"""What decoding by the DSL's grammar file costs (grammar.py, xgrammar), as a share of a
generation step, at batch 1 and 128, on a trained checkpoint and a CSV of its pictures.

    python -m tools.grammar_cost --checkpoint checkpoints --csv test.csv

Prints the CPU flags, then per batch size: ms per decoding step with the grammar, of which
inside its logits processor, that share, and the step without the grammar.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

import data
import grammar
import hardware
import inference
import settings
from settings import setting


@dataclass
class Arguments:
    checkpoint: str = setting("checkpoints", "a run folder or a checkpoint")
    csv: str = setting("test.csv", "pictures to read (image_path,dsl)")
    dtype: str = setting("auto", "auto, float32, bfloat16")
    batch1_pictures: int = setting(8, "pictures read one at a time")
    repeats: int = setting(2, "timings: the fastest of this many")


class Timed(LogitsProcessor):
    """A processor, the time spent in it added up."""

    seconds = 0.0
    calls = 0

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, input_ids, scores):
        start = time.perf_counter()
        scores = self.processor(input_ids, scores)
        Timed.seconds += time.perf_counter() - start
        Timed.calls += 1
        return scores


def read_timed(reader, features, batch: int, constrained: bool) -> tuple[float, float, int]:
    """(wall seconds, seconds in the grammar, decoding steps) of reading `features`."""
    Timed.seconds, Timed.calls = 0.0, 0
    begin = time.perf_counter()
    reader.read_features(features, batch, constrained)
    return time.perf_counter() - begin, Timed.seconds, Timed.calls


def main(args: Arguments):
    make = grammar.logits_processor
    grammar.logits_processor = lambda *a, **k: Timed(make(*a, **k))  # every processor model.generate makes, timed
    reader = inference.load(args.checkpoint, "cpu", args.dtype)
    print(f"{hardware.describe(torch.device('cpu'))}; DSL {reader.language.name}")
    rows = data.read_dataset(args.csv, language=reader.language)[0][:128]
    features = reader.vision.encode([row.image_path for row in rows])
    reader.read_features(features[:8])  # warm: the grammar compiles once
    print("| batch | step with the grammar (ms) | in the grammar (ms) | share | step without (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for batch, chunk in ((1, features[:args.batch1_pictures]), (128, features)):
        wall, inside, steps = min(read_timed(reader, chunk, batch, True) for _ in range(args.repeats))
        free, _, _ = min(read_timed(reader, chunk, batch, False) for _ in range(args.repeats))
        print(f"| {batch} | {1000 * wall / steps:.2f} | {1000 * inside / steps:.3f} | {inside / wall:.1%} | "
              f"{1000 * free / steps:.2f} |")  # the same texts, so the same number of steps


if __name__ == "__main__":
    (arguments,) = settings.parse(sys.argv[1:], Arguments, program="python -m tools.grammar_cost")
    main(arguments)
