"""How much memory a configuration's training step needs at full depth, from a few layers.

    python -m tools.memory configs/llama3-8b.yaml --llm llama3.1-8b-shape --dtype bfloat16 --mixed_precision no
    python -m tools.memory configs/llama3-8b.yaml --llm llama3.1-8b-shape --gradient_checkpointing

Runs check.py (one training step, in a fresh process each time) with the first 1, 2 and 4
decoder layers of the configured LLM at full width, reads each step's peak memory (GPU:
allocated; CPU: the process's peak resident size), and extends the straight line through
them to the LLM's full depth: every layer adds the same weights and activations.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

import finetune
import language_model

LAYERS = (1, 2, 4)


def peak_gib(argv: list[str], layers: int) -> float:
    result = subprocess.run([sys.executable, "-m", "tools.check", *argv, "--llm_layers", str(layers)],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    found = re.search(r"peak memory .*? ([0-9.]+) GiB", result.stdout)
    if result.returncode or not found:
        sys.exit(f"memory.py: check.py with {layers} layer(s) failed:\n{(result.stdout + result.stderr)[-2000:]}")
    return float(found.group(1))


def main(argv: list[str]):
    config, _ = finetune.parse_configs(argv)  # the settings, checked before the long runs
    depth = language_model.llm_config(config.llm).num_hidden_layers
    peaks = [peak_gib(argv, n) for n in LAYERS]
    per_layer, base = np.polyfit(LAYERS, peaks, 1)
    print(f"{'layers':>8} {'peak GiB':>10}")
    for n, peak in zip(LAYERS, peaks):
        print(f"{n:>8} {peak:>10.2f}   measured")
    print(f"{depth:>8} {base + per_layer * depth:>10.2f}   extrapolated: {base:.2f} GiB + {per_layer:.3f} GiB a layer")


if __name__ == "__main__":
    main(sys.argv[1:])
