"""Fine-tune the projector, the LoRA adapters and the new token embeddings.

    python finetune.py                                    # the embedded CPU configuration (the defaults)
    python finetune.py --epochs 1 --lr 5e-4               # any setting from the command line
    python finetune.py configs/llama3-8b.yaml             # a config file (flags after it override it)
    python finetune.py configs/llama3-8b.yaml --help      # every setting, its value in force and meaning
    accelerate launch finetune.py configs/llama3-8b.yaml  # data-parallel on several GPUs
    python finetune.py --resume auto                      # continue a stopped run where it stopped

Reads data.csv (a tenth of its diagrams, with all their pictures, held out to validate on),
logs to output_dir/log.jsonl and Weights & Biases (offline when not logged in), and writes
checkpoints to output_dir (checkpoint.py).
The model's settings are model.ModelConfig; the training's are TrainConfig below.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import checkpoint
import data
import files
import hardware
import language_model
import languages
import settings
from model import IGNORE, CheckpointError, DiagramReader, ModelConfig, picture_loss, picture_targets, with_examples
from settings import SettingsError, check, setting
from tracking import RunLog


@dataclass
class TrainConfig:
    data_csv: str = setting("data.csv", "training pool: image_path,dsl (docs/SPEC.md)")
    output_dir: str = setting("checkpoints", "checkpoints, log.jsonl, curves.png and wandb/ go here")
    val_fraction: float = setting(0.1, "share of data_csv held out for validation")
    skip_bad_rows: bool = setting(False, "train on the good rows of a CSV with bad ones, instead of stopping")
    device: str = setting("auto", "auto (cuda when there is one), cpu, cuda, cuda:1, ...")
    dtype: str = setting("auto", "the frozen LLM's weights: auto (the fastest safe one here, timed), "
                                 "float32, bfloat16, float16")
    mixed_precision: str = setting("auto", "autocast: auto (fp16 and a gradient scaler for float16 weights, "
                                           "else no), no, fp16, bf16")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, "
                                                  "more time a step")
    load_in_4bit: bool = setting(False, "QLoRA: the frozen LLM's linear layers in 4-bit NF4, computing in "
                                        "--dtype (CUDA only)")
    epochs: int = setting(1, "passes over the training images: varied images teach more than repeated ones")
    batch_size: int = setting(8, "images per micro-batch and process")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step: the effective batch is "
                                                  "batch_size x this x processes")
    projector_warmup_epochs: int = setting(10, "epochs the projector first trains alone on the quadrant loss: "
                                              "cheap, no LLM")
    projector_warmup_lr: float = setting(2e-3, "peak learning rate of that stage (AdamW, cosine)")
    projector_warmup_batch_size: int = setting(128, "pictures per step of that stage")
    lr: float = setting(1e-3, "peak learning rate of the LoRA adapters")
    projector_lr: float = setting(1e-3, "peak learning rate of the projector and the new token embeddings")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup_steps: int = setting(20, "linear warm-up steps, then cosine decay")
    min_lr_ratio: float = setting(0.1, "the cosine ends at this fraction of the peak")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: no clipping)")
    seed: int = setting(0, "seeds the split, the data order and the initial weights")
    eval_every: int = setting(250, "steps between validations (also at every epoch end); 0: epoch ends only")
    eval_samples: int = setting(256, "validation images read at those runs (the loss is over all at epoch ends)")
    save_every: int = setting(250, "steps between step checkpoints; 0: epoch checkpoints only")
    keep_step_checkpoints: int = setting(2, "latest step checkpoints kept, besides the best (0: each until the "
                                            "next save)")
    resume: str = setting("", "auto (output_dir's latest checkpoint, if any), a run folder or a checkpoint")
    wandb_project: str = setting("diagram-reader", "Weights & Biases project")
    wandb_mode: str = setting("auto", "auto (WANDB_MODE, else online if logged in, else offline), online, "
                                      "offline, disabled")

    def __post_init__(self):
        """Each setting's range, checked when the settings are parsed: before data or models load."""
        check(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "a share between 0 and 1")
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "eval_samples",
                     "projector_warmup_batch_size"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "at least 1")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_step_checkpoints", "projector_warmup_epochs"):
            check(getattr(self, name) >= 0, name, getattr(self, name), "0 or more")
        for name in ("lr", "projector_lr", "projector_warmup_lr"):
            check(0 < getattr(self, name) < math.inf, name, getattr(self, name),
                  "a learning rate above 0 (1e-3 is usual)")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "0 or more")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "a fraction from 0 to 1")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "a norm, or 0 for no clipping")
        check(self.dtype in ("auto", *hardware.DTYPES), "dtype", self.dtype, f"auto, {', '.join(hardware.DTYPES)}")
        check(self.mixed_precision in ("auto", "no", "fp16", "bf16"), "mixed_precision", self.mixed_precision,
              "auto, no, fp16 or bf16")
        check(self.wandb_mode in ("auto", "online", "offline", "disabled"), "wandb_mode", self.wandb_mode,
              "auto, online, offline or disabled")


def parse_configs(argv: list[str], *extra) -> tuple:
    """(ModelConfig, TrainConfig, *extra dataclasses) from an optional config file (YAML or
    JSON: new defaults) followed by flags. --help shows each value in force and its meaning."""
    return settings.parse(argv, ModelConfig, TrainConfig, *extra)


# ---------------------------------------------------------------------------- the run, in order

def main(config: ModelConfig, training: TrainConfig) -> int:
    accelerator, dtype = set_up(config, training)
    train_rows, val_rows = split_data(training, languages.load(config.dsl))
    data_identity = checkpoint.data_identity(training.data_csv, training.seed)  # what decides the split and order
    lock = checkpoint.hold(training.output_dir) if accelerator.is_main_process else None  # noqa: F841 (held)
    accelerator.wait_for_everyone()  # the folder tidied (hold) before any process lists its checkpoints
    resume_from = checkpoint.resume_point(training.output_dir, training.resume, config, data_identity)
    resumed_state = checkpoint.load_training_state(resume_from) if resume_from else None  # refused before loading
    steps_per_epoch = len(train_rows) // (training.batch_size * training.gradient_accumulation_steps
                                          * accelerator.num_processes)
    if steps_per_epoch == 0 or len(train_rows) <= config.num_shots:
        raise data.DataError(f"{training.data_csv}: {len(train_rows)} training rows are too few for batch size "
                             f"{training.batch_size} x {training.gradient_accumulation_steps} accumulation step(s) x "
                             f"{accelerator.num_processes} process(es) and {config.num_shots} shots")
    total_steps = steps_per_epoch * training.epochs
    images_per_step = training.batch_size * training.gradient_accumulation_steps * accelerator.num_processes

    reader = load_model(config, training, dtype, resume_from)
    train_features, val_features = encode_images(reader, train_rows, val_rows, accelerator)
    cost = RunCost(checkpoint.read_state(resume_from).get("train_flops", 0) if resume_from else 0)
    if not resume_from:
        reader.projector.set_feature_statistics(train_features)
        reader.examples = [(data.load_image(r.image_path), r.dsl) for r in train_rows[:config.num_shots]]
        warm_up_projector(reader, train_rows, train_features, training, cost, accelerator)
    optimizer, scheduler = make_optimizer(reader, training, total_steps)
    model, optimizer, scheduler = accelerator.prepare(reader, optimizer, scheduler)  # model: what trains
    step, start = restore(resume_from, resumed_state, optimizer, scheduler, accelerator)
    hardware.reset_peak_memory(accelerator.device)  # the steps' peak memory is logged, not loading's
    log = RunLog(Path(training.output_dir), {**asdict(config), **asdict(training)}, training.wandb_project,
                 training.wandb_mode, checkpoint.read_state(resume_from)["wandb_id"] if resume_from else None,
                 accelerator.is_main_process, resume_step=step)
    accelerator.print(f"{len(train_rows)} training and {len(val_rows)} validation images; {steps_per_epoch} steps "
                      f"per epoch, {total_steps} in all" + (f"; resuming from {resume_from} at step {step}"
                                                            if resume_from else ""))
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step",
               disable=not accelerator.is_main_process)
    with StopRequested() as stop, bar:  # the bar closed, an error starts its own line
        while step < total_steps:
            batches = training_batches(reader, train_rows, train_features, step, steps_per_epoch, training, accelerator)
            with cost.count(tuple(tuple(b["input_ids"].shape) for b in batches), accelerator.num_processes):
                loss, seconds = train_step(model, batches, optimizer, scheduler, accelerator, training.grad_clip)
            step += 1
            if not math.isfinite(loss):
                return stop_on_nan(step, loss, training, bar, accelerator)
            tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            record = {"step": step, "epoch": step / steps_per_epoch, "loss": loss, "lr": scheduler.get_last_lr()[0],
                      "step_seconds": seconds, "tokens_per_second": tokens / seconds,
                      "minutes": (time.time() - start) / 60,
                      "images_seen": step * images_per_step,
                      "train_flops": cost.train_flops,
                      "peak_memory_gib": hardware.peak_memory_gib(accelerator.device)}  # since loading
            log.step(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", s_per_step=f"{seconds:.2f}")
            end_of_epoch = step % steps_per_epoch == 0
            scores = None
            # The main process validates and saves; the others wait for it at the next step.
            validation_due = (training.eval_every and step % training.eval_every == 0) or end_of_epoch
            if accelerator.is_main_process and validation_due:
                scores = validate(reader, val_rows, val_features, training, accelerator, log, step, bar,
                                  loss_over_all=end_of_epoch)
            name = (f"epoch-{step // steps_per_epoch:02d}" if end_of_epoch else f"step-{step:07d}"
                    if (training.save_every and step % training.save_every == 0) or stop.requested else None)
            if name and accelerator.is_main_process:
                state = {"step": step, "minutes": (time.time() - start) / 60, "validation": scores,
                         "wandb_id": log.run_id, "train_flops": cost.train_flops, "train": asdict(training),
                         "data": data_identity}
                save(name, reader, state, training_state(optimizer, scheduler, accelerator), training, log)
            if stop.requested:
                bar.close()
                accelerator.print(f"stopped at step {step}; continue with --resume auto "
                                  f"(--output_dir {training.output_dir})", file=sys.stderr)
                return 130
    bar.close()
    log.finish()
    encoded, clip_flops = len(train_rows) + len(val_rows), reader.vision.flops_per_image()
    accelerator.print(f"done in {(time.time() - start) / 60:.1f} minutes; checkpoints in {training.output_dir}\n"
                      f"cost: {total_steps * images_per_step} images seen by the LLM, {cost.train_flops / 1e12:.1f} "
                      f"TFLOP of training steps; CLIP encoded {encoded} images at {clip_flops / 1e9:.2f} GFLOP each "
                      f"({encoded * clip_flops / 1e12:.1f} TFLOP)")
    return 0


# ---------------------------------------------------------------------------- its parts

def set_up(config: ModelConfig, training: TrainConfig) -> tuple[Accelerator, torch.dtype]:
    """The device, the precision (measured when auto) and the seeds."""
    device = hardware.pick_device(training.device)
    try:
        dtype, why = hardware.choose_dtype(training.dtype, device, lambda: language_model.mlp_shape(config.llm))
    except ValueError as error:  # an unknown --dtype
        raise SettingsError(str(error)) from None
    mixed_precision = hardware.mixed_precision_for(dtype, training.mixed_precision)
    if mixed_precision == "fp16" and device.type != "cuda":
        raise SettingsError("FP16 training (--dtype float16 / --mixed_precision fp16) needs a CUDA GPU; on a CPU "
                            "use --dtype auto (or float32, bfloat16) and --mixed_precision no")
    if config.llm_layers and config.llm_layers > (depth := language_model.llm_config(config.llm).num_hidden_layers):
        raise SettingsError(f"--llm_layers {config.llm_layers}: {config.llm} has {depth} layers")
    if training.load_in_4bit and device.type != "cuda":
        raise SettingsError("--load_in_4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run on "
                            f"this {device.type}; train without it (the full base in --dtype)")
    if training.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise SettingsError("--load_in_4bit needs the bitsandbytes package: pip install bitsandbytes")
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
    accelerator.print(f"{hardware.describe(accelerator.device)}\n{why}; mixed precision {mixed_precision}")
    set_seed(training.seed)
    return accelerator, hardware.DTYPES[dtype]


def load_model(config: ModelConfig, training: TrainConfig, dtype: torch.dtype, resume_from=None) -> DiagramReader:
    """A new model, or the one a checkpoint holds, with the memory savers asked for."""
    reader = (DiagramReader.from_pretrained(resume_from, dtype, trainable=True, load_in_4bit=training.load_in_4bit)
              if resume_from else DiagramReader.build(config, dtype, training.load_in_4bit))
    if training.gradient_checkpointing:
        reader.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return reader.use_attention_for(hardware.pick_device(training.device))


def split_data(training: TrainConfig, language: languages.Language) -> tuple[list[data.Row], list[data.Row]]:
    """Every row checked before any model loads; a fixed, seeded split that holds out
    diagrams, not rows: every picture of a validation diagram is in validation, so its
    exact match (which picks the best checkpoint) scores reading, not remembering."""
    rows, skipped = data.read_dataset(training.data_csv, training.skip_bad_rows, language)
    if skipped:
        print(f"skipping {skipped} bad rows of {training.data_csv} (--skip_bad_rows)", file=sys.stderr)
    diagram_of = {row.dsl: language.canonical(row.dsl) for row in rows}  # one canonical text a diagram
    rows_per_diagram: dict[str, int] = {}
    for row in rows:
        rows_per_diagram[diagram_of[row.dsl]] = rows_per_diagram.get(diagram_of[row.dsl], 0) + 1
    if len(rows_per_diagram) < 2:
        raise data.DataError(f"{training.data_csv}: all {len(rows)} rows show one diagram; validation holds out "
                             "whole diagrams, so it needs at least two different ones")
    rng = random.Random(training.seed)
    rng.shuffle(rows)  # both parts in a random order: validation reads its first eval_samples
    diagrams = sorted(rows_per_diagram)
    rng.shuffle(diagrams)  # each diagram as likely as any other, however many rows it has
    num_val = max(1, round(len(rows) * training.val_fraction))
    val_diagrams, num_val_rows = set(), 0
    for diagram in diagrams[:-1]:  # the last one stays for training, whatever the fraction
        if num_val_rows >= num_val:
            break
        val_diagrams.add(diagram)
        num_val_rows += rows_per_diagram[diagram]
    return ([r for r in rows if diagram_of[r.dsl] not in val_diagrams],
            [r for r in rows if diagram_of[r.dsl] in val_diagrams])


def encode_images(reader: DiagramReader, train_rows, val_rows, accelerator):
    """The vision encoder is frozen: its features are computed once per image and kept in memory."""
    reader.vision.to(accelerator.device)
    with tqdm(total=len(train_rows) + len(val_rows), desc="CLIP features", unit="img",
              disable=not accelerator.is_main_process) as bar:
        return (reader.vision.encode([r.image_path for r in train_rows], progress=bar),
                reader.vision.encode([r.image_path for r in val_rows], progress=bar))


def warm_up_projector(reader, train_rows, train_features, training: TrainConfig, cost: RunCost, accelerator):
    """LLaVA's first stage, with the quadrant loss as its signal: the projector and its
    quadrant head alone, on the cached features, before the LLM sees an image."""
    projector = reader.projector
    if not training.projector_warmup_epochs or projector.quadrant_head is None:
        return
    targets = picture_targets(reader.language, [row.dsl for row in train_rows])
    batch_size = 128
    optimizer = torch.optim.AdamW(projector.parameters(), lr=training.projector_warmup_lr)
    total = math.ceil(len(train_rows) / batch_size) * training.projector_warmup_epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    generator = torch.Generator().manual_seed(training.seed)
    projector.to(accelerator.device).train()
    for _ in tqdm(range(training.projector_warmup_epochs), desc="projector warm-up", unit="epoch",
                  disable=not accelerator.is_main_process):
        order = torch.randperm(len(train_rows), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            with cost.count(("projector warm-up", len(batch))):
                tokens = projector(train_features[batch].to(accelerator.device))
                picture_loss(projector, tokens, targets[batch].to(accelerator.device)).backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)


def make_optimizer(reader: DiagramReader, training: TrainConfig, total_steps: int):
    """AdamW with two learning rates; linear warm-up, then cosine decay to min_lr_ratio of the peak."""
    lora, rest = reader.trainable_parameters()
    optimizer = torch.optim.AdamW([{"params": lora, "lr": training.lr}, {"params": rest, "lr": training.projector_lr}],
                                  weight_decay=training.weight_decay)

    def factor(step: int) -> float:
        if step < training.warmup_steps:
            return (step + 1) / training.warmup_steps
        progress = min(1.0, (step - training.warmup_steps) / max(1, total_steps - training.warmup_steps))
        return training.min_lr_ratio + (1 - training.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def restore(resume_from, resumed_state: dict | None, optimizer, scheduler, accelerator) -> tuple[int, float]:
    """(step, start time) of a new run, or of a resumed one with its optimizer, scheduler,
    gradient scaler and random states as they were (the model's weights came with it;
    `resumed_state` is its checkpoint.load_training_state)."""
    if not resume_from:
        return 0, time.time()
    optimizer.load_state_dict(resumed_state["optimizer"])
    scheduler.load_state_dict(resumed_state["scheduler"])
    if accelerator.scaler is not None and resumed_state.get("scaler"):
        accelerator.scaler.load_state_dict(resumed_state["scaler"])
    checkpoint.set_rng_states(resumed_state["rng"])
    saved = checkpoint.read_state(resume_from)
    return saved["step"], time.time() - 60 * saved["minutes"]


def epoch_order(num_train: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch: a function of seed and epoch only, so a resumed run
    sees the same batches as an uninterrupted one."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(num_train, generator=generator).tolist()


def training_batches(reader, train_rows, train_features, step, steps_per_epoch, training: TrainConfig,
                     accelerator) -> list[dict]:
    """This process's micro-batches of optimizer step `step`: target images in the epoch's
    order, each after num_shots other training images shown solved."""
    epoch, batch_in_epoch = divmod(step, steps_per_epoch)
    order = epoch_order(len(train_rows), training.seed, epoch)
    rng = random.Random(f"{training.seed}:{step}:{accelerator.process_index}")
    batches = []
    for micro in range(training.gradient_accumulation_steps):
        first = (((batch_in_epoch * training.gradient_accumulation_steps + micro) * accelerator.num_processes
                  + accelerator.process_index) * training.batch_size)
        indices = order[first:first + training.batch_size]
        shots = []
        for i in indices:
            others = rng.sample(range(len(train_rows) - 1), reader.config.num_shots)
            shots.append([c + (c >= i) for c in others])  # skip the target itself
        images = torch.stack([train_features[s + [i]] for s, i in zip(shots, indices)])
        batch = reader.collate(images, [[train_rows[j].dsl for j in s] for s in shots],
                               [train_rows[i].dsl for i in indices])
        batches.append({k: v.to(accelerator.device) for k, v in batch.items()})
    return batches


def train_step(model, batches: list[dict], optimizer, scheduler, accelerator, grad_clip: float) -> tuple[float, float]:
    """One optimizer step over one or more micro-batches: (loss, seconds). Each micro-batch's
    loss is weighted by its share of the target tokens, so the gradient is the one of a
    single batch holding them all. A non-finite loss is returned before the update."""
    started = time.perf_counter()
    model.train()
    targets = [int((batch["labels"] != IGNORE).sum()) for batch in batches]
    loss_value = 0.0
    for i, (batch, count) in enumerate(zip(batches, targets)):
        # Processes synchronise gradients once, after the last micro-batch.
        with accelerator.no_sync(model) if i < len(batches) - 1 else contextlib.nullcontext():
            with accelerator.autocast():
                loss = model(**batch) * (count / sum(targets))
            loss_value += accelerator.reduce(loss.detach(), reduction="mean").item()
            if not math.isfinite(loss_value):
                return loss_value, time.perf_counter() - started
            accelerator.backward(loss)
    if grad_clip:
        accelerator.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    optimizer.step()  # under fp16, the gradient scaler skips steps with inf/nan gradients
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    hardware.synchronize(accelerator.device)
    return loss_value, time.perf_counter() - started


@torch.no_grad()
def validate(reader: DiagramReader, val_rows, val_features, training: TrainConfig, accelerator, log: RunLog,
             step: int, bar, loss_over_all: bool = False) -> dict:
    """Loss, exact match and element F1 on the first eval_samples validation images (the
    loss on all of them with loss_over_all), logged with a few predictions. Full test
    scores are inference.py's job."""
    reader.eval()
    example_features, example_dsls = reader.prompt_examples()
    n = min(training.eval_samples, len(val_rows))
    n_loss = len(val_rows) if loss_over_all else n
    total_loss = 0.0
    for start in range(0, n_loss, training.batch_size):
        end = min(start + training.batch_size, n_loss)
        batch = reader.collate(with_examples(example_features, val_features[start:end]),
                               [example_dsls] * (end - start), [r.dsl for r in val_rows[start:end]])
        batch.pop("quadrants", None)  # the validation loss is the DSL's alone, comparable across settings
        with accelerator.autocast():
            total_loss += reader(**{k: v.to(accelerator.device) for k, v in batch.items()}).item() * (end - start)
    with accelerator.autocast():
        predictions, _ = reader.read(val_features[:n])
    references = [r.dsl for r in val_rows[:n]]
    scores = reader.language.score(predictions, references)
    scores.pop("by_count", None)
    scores["loss"] = total_loss / n_loss
    samples = [(r.image_path, p, r.dsl) for r, p in zip(val_rows[:8], predictions)]
    log.validation(step, scores, samples, reader.language)
    f1s = "".join(f", {name[:-3].replace('_', ' ')} F1 {value:.3f}" for name, value in scores.items()
                  if name.endswith("_f1"))  # the DSL's own: element F1, node F1, ...
    bar.write(f"step {step}: val loss {scores['loss']:.4f}, exact match {scores['exact_match']:.3f} on "
              f"{n} images{f1s}, character error rate {scores['cer']:.3f}")
    for prediction, reference in list(zip(predictions, references))[:4]:
        same = reader.language.canonical_or_raw(prediction) == reader.language.canonical(reference)
        bar.write(f"  {'ok ' if same else 'BAD'} {' '.join(prediction.split())}")
    return scores


def training_state(optimizer, scheduler, accelerator) -> dict:
    """What --resume needs beside the model, in values torch.load(weights_only=True) reads back."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "rng": checkpoint.rng_states()}


def save(name: str, reader: DiagramReader, state: dict, resume_state: dict, training: TrainConfig, log: RunLog):
    """A checkpoint of the model, its `state` (state.json) and what --resume needs; older
    step checkpoints pruned."""
    folder = checkpoint.save(Path(training.output_dir), name, reader, state, resume_state)
    checkpoint.prune(folder.parent, training.keep_step_checkpoints)
    if name.startswith("epoch-"):
        log.checkpoint(folder)


class RunCost:
    """What a run costs in numbers no machine changes: the FLOPs of its training steps, counted
    by torch's FlopCounterMode (as benchmark.py counts a step). A step's count depends only on
    its batches' shapes, so each shape is counted once, on the first step that has it."""

    def __init__(self, train_flops: int = 0):
        self.train_flops, self.by_shape = train_flops, {}

    @contextlib.contextmanager
    def count(self, shape: tuple, processes: int = 1):
        """Add the FLOPs of the work inside, whose cost `shape` determines."""
        if shape in self.by_shape:
            yield
        else:
            with FlopCounterMode(display=False) as counter:
                yield
            self.by_shape[shape] = counter.get_total_flops() * processes
        self.train_flops += self.by_shape[shape]


def stop_on_nan(step: int, loss: float, training: TrainConfig, bar, accelerator) -> int:
    bar.close()
    last = checkpoint.folders(training.output_dir)
    accelerator.print(f"finetune.py: error: step {step}: the loss is {loss}; stopping. The last good checkpoint "
                      f"is {last[-1] if last else 'none (none saved yet)'}. Try a lower --lr / --projector_lr, "
                      "or --dtype float32.", file=sys.stderr)
    return 1


class StopRequested:
    """The first Ctrl-C asks the loop to save and stop after the current step; a second one
    stops at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: saving a checkpoint after this step (press again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


if __name__ == "__main__":
    model_config, train_config = parse_configs(sys.argv[1:])
    try:
        sys.exit(main(model_config, train_config))
    except (data.DataError, CheckpointError, SettingsError) as error:
        print(f"finetune.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except files.DiskFull as error:  # raised after the half-written files were removed
        print(f"finetune.py: error: {error}", file=sys.stderr)
        sys.exit(1)
