"""The LLM side alone, for Mermaid: image tokens that say everything a chart holds, built from
its text instead of CLIP, trained and validated by finetune.py's own code.

    python -m tools.llm_probe configs/mermaid.yaml --data_csv mermaid/data.csv --output_dir llm-probe

Image token i (a patch_merge x patch_merge block of the patch grid) stands for node i in
reading order: the sum of a fixed random code for its label, one for its shape, one for each
node its arrows point to, and one for the chart's direction; a token with no node holds an
"empty" code. That is what a perfect vision side would hand the projector, in a form it has to
learn to decode (the codes are random, as CLIP's features are to it). Where the LLM learns to
write the charts from these tokens within the pictures a whole run sees, the vision side is
what a whole run lacks (tools/vision_probe.py measures that side alone). The scores are
finetune.py's validations, in the run's log.jsonl.
"""

from __future__ import annotations

import math
import sys

import torch

import data
import finetune
import mermaid
from model import merged_shape

CODE_SEED = 1234  # the codes are one fixed set, whatever the run's seed
NOISE = 0.1  # a little noise, so that no feature is constant over the pictures


def oracle_features(texts: list[str], feature_shape: tuple[int, int], merge: int, seed: int) -> torch.Tensor:
    """[N, T, D] features that name each chart's nodes, their arrows and its direction."""
    tokens, width = feature_shape
    merged_tokens, _ = merged_shape(feature_shape, merge)
    side, cells = math.isqrt(tokens), math.isqrt(merged_tokens)
    if mermaid.MAX_NODES > merged_tokens:
        raise ValueError(f"{merged_tokens} image tokens cannot hold {mermaid.MAX_NODES} nodes")
    names = ([f"label {label}" for label in mermaid.LABELS] + [f"shape {shape}" for shape in mermaid.SHAPES]
             + [f"to {j}" for j in range(mermaid.MAX_NODES)] + [f"direction {d}" for d in mermaid.DIRECTIONS]
             + ["empty"])
    codes = dict(zip(names, torch.randn(len(names), width, generator=torch.Generator().manual_seed(CODE_SEED))))
    noise = torch.Generator().manual_seed(seed)
    features = torch.zeros(len(texts), side, side, width)
    for n, text in enumerate(texts):
        chart = mermaid.parse(text)
        for i in range(merged_tokens):
            code = codes[f"direction {chart.direction}"].clone()
            if i < len(chart.nodes):
                code += codes[f"label {chart.nodes[i].label}"] + codes[f"shape {chart.nodes[i].shape}"]
                code += sum((codes[f"to {b}"] for a, b in chart.edges if a == i), torch.zeros(width))
            else:
                code += codes["empty"]
            row, column = divmod(i, cells)  # merge_patches' order: block by block, row by row
            features[n, row * merge:(row + 1) * merge, column * merge:(column + 1) * merge] = code
    features += NOISE * torch.randn(features.shape, generator=noise)
    return features.flatten(1, 2)


def encode_from_text(reader, train_rows, val_rows, accelerator, cost) -> finetune.Split:
    """finetune.encode_images' stand-in: the oracle's features, no CLIP."""
    shape, merge = reader.vision.feature_shape, reader.config.patch_merge
    return finetune.Split(train_rows, val_rows,
                          oracle_features([row.dsl for row in train_rows], shape, merge, seed=0),
                          oracle_features([row.dsl for row in val_rows], shape, merge, seed=1))


if __name__ == "__main__":
    model_config, train_config = finetune.parse_configs(sys.argv[1:])
    if model_config.dsl != "mermaid":
        sys.exit(f"llm_probe.py: error: the oracle's tokens are Mermaid's; --dsl is {model_config.dsl}")
    finetune.encode_images = encode_from_text
    try:
        sys.exit(finetune.main(model_config, train_config))
    except data.DataError as error:
        print(f"llm_probe.py: error: {error}", file=sys.stderr)
        sys.exit(2)
