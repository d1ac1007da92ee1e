"""Check a configuration on this machine before a long run: one step of each part.

    python -m tools.check                             # the embedded default
    python -m tools.check configs/llama3-8b.yaml      # the reference configuration
    python -m tools.check --batch_size 16 --dtype float32

Prints the device (CPU flags, or GPU name and memory), the dtype and why, loads the
configured CLIP and LLM, runs one training step and one generation, and estimates the
configured run's time (its steps x the measured step time) and the step's peak memory.
Ends with one verdict line: "check: ok ..." (exit 0) or "check: FAILED: why" (exit 1).
"""

from __future__ import annotations

import csv
import random
import sys
import time
from pathlib import Path

import torch

from tools import benchmark
import finetune
from cost import RunCost
import hardware
import settings


def count_rows(csv_path: str) -> int | None:
    path = Path(csv_path)
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)  # the header off; rows not checked here


def check(argv: list[str]) -> str:
    config, training = finetune.parse_configs(argv)
    accelerator, dtype, _ = finetune.set_up(config, training)  # prints the device and the dtype's reason
    device = accelerator.device
    started = time.perf_counter()
    reader = finetune.load_model(config, training, dtype)
    print(f"loaded CLIP {config.clip_model} ({config.clip_pretrained}) and LLM {config.llm} in "
          f"{time.perf_counter() - started:.0f} s; image features {tuple(reader.vision.feature_shape)}")
    optimizer, scheduler = finetune.make_optimizer(reader, training, total_steps=10)
    prepared, optimizer, scheduler = accelerator.prepare(reader, optimizer, scheduler)
    run = finetune.Run(training, accelerator, reader, prepared, optimizer, scheduler, log=None,
                       cost=RunCost(), started=time.time(), steps_per_epoch=10)
    rng = random.Random(0)
    hardware.reset_peak_memory(device)
    seconds = []
    for _ in range(3):  # the first step warms up; the last two are timed
        loss, step_seconds = finetune.train_step(run, [benchmark.random_batch(reader, training.batch_size, rng, device)])
        seconds.append(step_seconds)
    step_seconds = min(seconds[1:])
    print(f"training step: batch {training.batch_size}, loss {loss:.3f}, {step_seconds:.2f} s; peak memory "
          f"{'allocated' if device.type == 'cuda' else 'of the process (RSS)'} {hardware.peak_memory_gib(device):.2f} GiB")
    with accelerator.autocast():
        started = time.perf_counter()
        texts, _ = reader.read_features(torch.randn(4, *reader.vision.feature_shape), batch_size=4)
    print(f"generation: 4 images in {time.perf_counter() - started:.2f} s, e.g. {' '.join(texts[0].split())}")

    rows = count_rows(training.data_csv)
    if rows is None:
        images = 1000
        estimate = f"no {training.data_csv} yet; per 1,000 training images and epoch"
    else:
        images = round(rows * (1 - training.val_fraction)) * training.epochs
        estimate = f"{training.data_csv}: {rows} rows, {training.epochs} epoch(s)"
    steps = images // (training.batch_size * accelerator.num_processes)
    minutes = steps * step_seconds / 60
    return f"check: ok: {estimate}: {steps} steps x {step_seconds:.2f} s = about {minutes:.1f} min of training"


if __name__ == "__main__":
    try:
        print(check(sys.argv[1:]))
    except settings.SettingsError as error:
        print(f"check: FAILED: {error}")
        sys.exit(1)
    except torch.OutOfMemoryError as error:
        print(f"check: FAILED: out of memory in one training step ({str(error).splitlines()[0]}); try a smaller "
              "--batch_size, --dtype float16/bfloat16, or a GPU with more memory")
        sys.exit(1)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"check: FAILED: cannot load or run the configured models: {str(error).splitlines()[0]}")
        sys.exit(1)
