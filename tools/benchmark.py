"""Speed of the training step and of generation on this machine, as ratios measured in one run.

    python -m tools.benchmark                                  # the embedded default, dtype auto
    python -m tools.benchmark --dtype float32 --steps 5        # any finetune.py setting, and the ones below
    python -m tools.benchmark configs/llama3-8b.yaml --steps 5 # the reference configuration (GPU)
    python -m tools.benchmark --vs_trainer true                # and the same step through transformers' Trainer

Prints this machine's matmul peak in the dtype in use (a large square matmul), the
training step's FLOPs (counted by torch's FlopCounterMode over one real step), the
achieved FLOP/s and its share of that peak, tokens per step, a validation forward pass
(no gradients) against the step, and generation speed at batch 1 and batch 32 on the same
images. Uses random image features of the right shape (the CLIP encoder is frozen and its
features are cached during training, so it is not part of a step) and real DSL targets;
the LLM, projector and LoRA are the real ones, and the step is finetune.train_step itself.
The last line is one JSON object.

With --vs_trainer, the same model, adapter and batches also train through the usual way:
transformers' Trainer with the LLM's own loss (logits at every position of padded rows, as
a LLaVA-style model built on transformers computes them) and PEFT's own trainable tokens,
and the ratio of the two step times is printed.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import dsl
import finetune
from cost import RunCost
import hardware
import language_model
from model import IGNORE, DiagramReader
from settings import setting


@dataclass
class BenchmarkConfig:
    steps: int = setting(10, "training steps timed (each batch first run once untimed)")
    generate_images: int = setting(32, "images read at batch 1 and then at batch 32")
    vs_trainer: bool = setting(False, "also time the same steps through transformers' Trainer, and print the ratio")


def random_batch(reader: DiagramReader, batch_size: int, rng: random.Random, device) -> dict:
    n_images = reader.config.num_shots + 1
    texts = [[dsl.to_text(dsl.sample_diagram(rng)) for _ in range(n_images)] for _ in range(batch_size)]
    features = torch.randn(batch_size, n_images, *reader.vision.feature_shape)
    batch = reader.collate(features, [t[:-1] for t in texts], [t[-1] for t in texts])
    return {k: v.to(device) for k, v in batch.items()}


class UsualForward(torch.nn.Module):
    """The forward pass of a LLaVA-style model on transformers: the image tokens spliced into
    the embeddings, then the LLM's own loss over logits at every position."""

    def __init__(self, reader: DiagramReader):
        super().__init__()
        self.reader = reader

    def forward(self, input_ids, attention_mask, labels, features, picture_labels=None):
        embeddings = self.reader.embed(input_ids, self.reader.projector(features))
        return {"loss": self.reader.llm(inputs_embeds=embeddings, attention_mask=attention_mask, labels=labels).loss}


def trainer_step_seconds(reader: DiagramReader, batches: list[dict], training, device) -> float:
    """The median step time of transformers' Trainer (PEFT's LoRA, AdamW, cosine schedule,
    clipping: its defaults where ours has no counterpart) on the same batches, the first
    one not counted."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Clock(TrainerCallback):
        def __init__(self):
            self.seconds = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            hardware.synchronize(device)
            self.seconds.append(time.perf_counter() - self.started)

    # Each picture's row without its padding; the collator pads a batch again, on the left as ours does.
    samples = [{k: v[i][-int(batch["attention_mask"][i].sum()):] if v.dim() == 2 and k != "picture_labels" else v[i]
                for k, v in batch.items()} for batch in batches for i in range(len(batch["input_ids"]))]
    padding = {"input_ids": reader.tokenizer.pad_token_id, "attention_mask": 0, "labels": IGNORE}

    def collate(rows: list[dict]) -> dict:
        length = max(len(row["input_ids"]) for row in rows)
        return {k: torch.stack([F.pad(row[k], (length - len(row[k]), 0), value=padding[k]) if k in padding
                                else row[k] for row in rows]) for k in rows[0]}

    clock = Clock()
    with tempfile.TemporaryDirectory() as output_dir:
        arguments = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=training.batch_size,
                                      max_steps=len(batches), learning_rate=training.lr,
                                      weight_decay=training.weight_decay, warmup_steps=training.warmup_steps,
                                      lr_scheduler_type="cosine", max_grad_norm=training.grad_clip or 1e9,
                                      report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                      remove_unused_columns=False, use_cpu=device.type == "cpu",
                                      dataloader_pin_memory=False)
        trainer = Trainer(model=UsualForward(reader), args=arguments, train_dataset=samples, callbacks=[clock],
                          data_collator=collate)
        trainer.train()
    seconds = sorted(clock.seconds[1:])
    return seconds[len(seconds) // 2]


def main(argv: list[str]) -> dict:
    config, training, bench = finetune.parse_configs(argv, BenchmarkConfig)
    accelerator, dtype, _ = finetune.set_up(config, training)
    device = accelerator.device
    reader = finetune.load_model(config, training, dtype)
    optimizer, scheduler = finetune.make_optimizer(reader, training, total_steps=bench.steps + 1)
    prepared, optimizer, scheduler = accelerator.prepare(reader, optimizer, scheduler)
    run = finetune.Run(training, accelerator, reader, prepared, optimizer, scheduler, log=None,
                       cost=RunCost(), started=time.time(), steps_per_epoch=bench.steps + 1)
    rng = random.Random(0)
    timed = [random_batch(reader, training.batch_size, rng, device) for _ in range(bench.steps)]
    step_flops = []
    for batch in timed:  # a warm-up pass, which counts each batch size's FLOPs (counting slows a step)
        before = run.cost.train_flops
        finetune.train_step(run, [batch])
        step_flops.append(run.cost.train_flops - before)
    hardware.reset_peak_memory(device)
    seconds = [finetune.train_step(run, [batch])[1] for batch in timed]
    step_seconds = statistics.median(seconds)  # the median: robust to a hiccup of the machine
    achieved = statistics.median(f / s for f, s in zip(step_flops, seconds)) / 1e9
    tokens = round(statistics.mean(int(b["attention_mask"].sum()) for b in timed))
    batch = timed[0]

    # Validation's loss is a forward pass without gradients: it should cost about a third of
    # a step (a slow path under no_grad once made it cost more than a whole step).
    batch.pop("picture_labels", None)
    with torch.no_grad(), accelerator.autocast():
        reader(**batch)
        started = time.perf_counter()
        for _ in range(3):
            reader(**batch)
        hardware.synchronize(device)
        validation_forward = (time.perf_counter() - started) / 3

    side = 8192 if device.type == "cuda" else 2048  # large enough to reach the machine's peak
    peak = hardware.matmul_gflops(dtype, side, side, side, device, seconds=0.5)
    hidden, intermediate = reader.llm.config.hidden_size, reader.llm.config.intermediate_size
    mlp = hardware.matmul_gflops(dtype, tokens, hidden, intermediate, device, seconds=0.3)

    reader.eval()
    features = torch.randn(bench.generate_images, *reader.vision.feature_shape)
    with accelerator.autocast():
        reader.read_features(features[:2], batch_size=2)  # warm-up
        started = time.perf_counter()
        reader.read_features(features, batch_size=1)
        batch1 = bench.generate_images / (time.perf_counter() - started)
        started = time.perf_counter()
        reader.read_features(features, batch_size=32)
        batch32 = bench.generate_images / (time.perf_counter() - started)

    result = {
        "device": hardware.describe(device), "llm": config.llm, "dtype": str(dtype).removeprefix("torch."),
        "batch_size": training.batch_size, "tokens_per_step": tokens,
        "train_step_seconds": round(step_seconds, 3), "train_step_gflop": round(statistics.mean(step_flops) / 1e9, 1),
        "train_step_gflops_per_s": round(achieved, 1),
        "matmul_peak_gflops_per_s": round(peak, 1), "mlp_matmul_gflops_per_s": round(mlp, 1),
        "train_step_share_of_peak": round(achieved / peak, 3),
        "train_tokens_per_second": round(tokens / step_seconds, 1),
        "validation_forward_seconds": round(validation_forward, 3),
        "validation_forward_over_train_step": round(validation_forward / step_seconds, 3),
        "generate_images_per_second_batch1": round(batch1, 2),
        "generate_images_per_second_batch32": round(batch32, 2),
        "generate_batch32_over_batch1": round(batch32 / batch1, 2),
        # GPU: allocated; CPU: the process's resident size (RSS)
        "peak_memory_gib": round(hardware.peak_memory_gib(device), 2),
    }
    if bench.vs_trainer:
        batches = [random_batch(reader, training.batch_size, rng, device) for _ in range(bench.steps + 1)]
        language_model.with_peft_s_own_rows(reader.llm)  # the usual way
        theirs = trainer_step_seconds(reader, batches, training, device)
        result["trainer_step_seconds"] = round(theirs, 3)
        result["trainer_over_ours_per_picture"] = round(theirs / step_seconds, 2)
    return result


if __name__ == "__main__":
    result = main(sys.argv[1:])
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))
