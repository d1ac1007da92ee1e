"""Speed and memory of the training step and of generation, printed as numbers.

    python benchmark.py                        # the embedded default on this machine
    python benchmark.py --batch_size 16 --dtype float32
    python benchmark.py configs/llama3-8b.yaml --steps 5   # the reference configuration (GPU)

Uses random image features of the right shape (the CLIP encoder is frozen and its
features are cached during training, so it is not part of a step) and real DSL
targets; the LLM, projector and LoRA are the real ones.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time

import torch
from accelerate import Accelerator

import dsl
from finetune import parse_hyperparameters
from model import DTYPES, DiagramReader, ModelConfig, VisionEncoder


def main():
    argv = sys.argv[1:]
    steps = 10
    if "--steps" in argv:
        i = argv.index("--steps")
        steps = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    hp = parse_hyperparameters(argv)
    accelerator = Accelerator(mixed_precision=hp.mixed_precision)
    config = ModelConfig.from_hyperparameters(hp)
    feature_shape = VisionEncoder(config).feature_shape
    reader = DiagramReader.build(config, feature_shape, DTYPES[hp.dtype])
    lora, rest = reader.trainable_parameters()
    optimizer = torch.optim.AdamW([{"params": lora, "lr": hp.lr}, {"params": rest, "lr": hp.projector_lr}])
    model, optimizer = accelerator.prepare(reader, optimizer)
    device = accelerator.device

    rng = random.Random(0)
    n_images = hp.num_shots + 1

    def batch():
        texts = [[dsl.to_text(dsl.sample_diagram(rng)) for _ in range(n_images)] for _ in range(hp.batch_size)]
        images = torch.randn(hp.batch_size, n_images, *feature_shape)
        b = reader.collate(images, [t[:-1] for t in texts], [t[-1] for t in texts])
        return {k: v.to(device) for k, v in b.items()}

    def train_step():
        model.train()
        b = batch()
        with accelerator.autocast():
            loss = model(**b)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return b["input_ids"].shape[1]

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    train_step()  # warm-up
    synchronize()
    start = time.perf_counter()
    lengths = [train_step() for _ in range(steps)]
    synchronize()
    step_seconds = (time.perf_counter() - start) / steps

    reader.eval()
    texts = [[dsl.to_text(dsl.sample_diagram(rng)) for _ in range(hp.num_shots)] for _ in range(hp.batch_size * 2)]
    images = torch.randn(len(texts), n_images, *feature_shape).to(device)
    with accelerator.autocast():
        reader.generate(images[:2], texts[:2])  # warm-up
        synchronize()
        start = time.perf_counter()
        reader.generate(images, texts)
        synchronize()
    generate_seconds = (time.perf_counter() - start) / len(texts)

    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "llm": hp.llm, "dtype": hp.dtype, "mixed_precision": hp.mixed_precision,
        "batch_size": hp.batch_size, "sequence_length": sum(lengths) / len(lengths),
        "train_step_seconds": round(step_seconds, 3),
        "train_samples_per_second": round(hp.batch_size / step_seconds, 2),
        "generate_seconds_per_image": round(generate_seconds, 4),
        "peak_cpu_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
