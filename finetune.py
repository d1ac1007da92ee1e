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
from tqdm import tqdm

import checkpoint
import data
import files
import hardware
import language_model
import languages
import settings
from checkpoint import CheckpointError
from cost import RunCost
from model import IGNORE, DiagramReader, ModelConfig, packed_sizes, picture_loss, picture_targets, with_examples
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
    batch_size: int = setting(16, "images per micro-batch and process")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step: the effective batch is "
                                                  "batch_size x this x processes")
    projector_warmup_epochs: int = setting(10, "epochs the projector first trains alone on the quadrant loss: "
                                              "cheap, no LLM")
    projector_warmup_lr: float = setting(2e-3, "peak learning rate of that stage (AdamW, cosine)")
    projector_warmup_batch_size: int = setting(128, "pictures per step of that stage")
    lr: float = setting(1.41e-3, "peak learning rate of the LoRA adapters")
    projector_lr: float = setting(1.41e-3, "peak learning rate of the projector and the new token embeddings")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup_steps: int = setting(10, "linear warm-up steps, then cosine decay")
    min_lr_ratio: float = setting(0.1, "the cosine ends at this fraction of the peak")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: no clipping)")
    seed: int = setting(0, "seeds the split, the data order and the initial weights")
    eval_every: int = setting(125, "steps between validations (also at every epoch end); 0: epoch ends only")
    eval_samples: int = setting(256, "validation images read at those runs (the loss is over all at epoch ends)")
    save_every: int = setting(125, "steps between step checkpoints; 0: epoch checkpoints only")
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

@dataclass
class Run:
    """What the training loop carries from step to step."""

    training: TrainConfig
    accelerator: Accelerator
    reader: DiagramReader  # the network: saved, validated
    prepared: torch.nn.Module  # the same network as accelerate prepared it (DDP-wrapped on several GPUs): trained
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    log: RunLog
    cost: RunCost
    started: float  # time.time() when the run began (earlier for a resumed run: its minutes so far)
    steps_per_epoch: int

    @property
    def images_per_step(self) -> int:
        return images_per_step(self.training, self.accelerator.num_processes)

    def minutes(self) -> float:
        return (time.time() - self.started) / 60


@dataclass
class Split:
    """The training and validation rows, and their cached vision features [N, T, D]."""

    train: list[data.Row]
    val: list[data.Row]
    train_features: torch.Tensor
    val_features: torch.Tensor


def main(config: ModelConfig, training: TrainConfig) -> int:
    accelerator, dtype, peak_gflops = set_up(config, training)
    cost = RunCost(peak_gflops)  # times each phase from here
    train_rows, val_rows = split_data(training, languages.load(config.dsl))
    data_identity = checkpoint.data_identity(training.data_csv, training.seed)  # what decides the split and order
    lock = checkpoint.hold(training.output_dir) if accelerator.is_main_process else None  # noqa: F841 (held)
    accelerator.wait_for_everyone()  # the folder tidied (hold) before any process lists its checkpoints
    resume_from, saved, resumed_state = find_resume_point(config, training, data_identity)
    cost.train_flops = saved.get("train_flops", 0)
    steps_per_epoch = count_steps_per_epoch(training, len(train_rows), accelerator.num_processes, config.num_shots)
    total_steps = steps_per_epoch * training.epochs

    reader = load_model(config, training, dtype, resume_from)
    split = encode_images(reader, train_rows, val_rows, accelerator, cost)
    if not resume_from:
        reader.projector.set_feature_statistics(split.train_features)
        reader.examples = [(data.load_image(r.image_path), r.dsl) for r in train_rows[:config.num_shots]]
        warm_up_projector(reader, split, training, cost, accelerator)
    optimizer, scheduler = make_optimizer(reader, training, total_steps)
    prepared, optimizer, scheduler = accelerator.prepare(reader, optimizer, scheduler)
    step, started = restore(resumed_state, saved, optimizer, scheduler, accelerator)
    hardware.reset_peak_memory(accelerator.device)  # the steps' peak memory is logged, not loading's
    log = RunLog(training, {**asdict(config), **asdict(training)}, saved.get("wandb_id"),
                 accelerator.is_main_process, resume_step=step)
    run = Run(training, accelerator, reader, prepared, optimizer, scheduler, log, cost, started, steps_per_epoch)
    accelerator.print(f"{len(train_rows)} training and {len(val_rows)} validation images; {steps_per_epoch} steps "
                      f"per epoch, {total_steps} in all" + (f"; resuming from {resume_from} at step {step}"
                                                            if resume_from else ""))
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=not accelerator.is_main_process)
    with StopRequested() as stop, bar:  # the bar closed, an error starts its own line
        while step < total_steps:
            # One optimizer step: forward, backward and update over this process's micro-batches.
            batches = training_batches(run, split, step)
            loss, seconds = train_step(run, batches)
            step += 1
            if not math.isfinite(loss):
                return stop_on_nan(step, loss, training, bar, accelerator)
            log_step(run, step, loss, seconds, batches)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", s_per_step=f"{seconds:.2f}")
            # Validate and save: the main process does; the others wait for it at the next step.
            end_of_epoch = step % steps_per_epoch == 0
            scores = None
            if accelerator.is_main_process and (end_of_epoch or (training.eval_every
                                                                 and step % training.eval_every == 0)):
                scores = validate(run, split, step, bar, loss_over_all=end_of_epoch)
            name = (f"epoch-{step // steps_per_epoch:02d}" if end_of_epoch else f"step-{step:07d}"
                    if (training.save_every and step % training.save_every == 0) or stop.requested else None)
            if name and accelerator.is_main_process:
                save(run, name, step, scores, data_identity)
            if stop.requested:
                bar.close()
                accelerator.print(f"stopped at step {step}; continue with --resume auto "
                                  f"(--output_dir {training.output_dir})", file=sys.stderr)
                return 130
    log_cost(run, split, total_steps)
    log.finish()
    return 0


def log_cost(run: Run, split: Split, total_steps: int):
    """The run's cost, phase by phase, printed and logged."""
    # The peak timed again, the faster timing kept: another job slowing the first would flatter every share.
    dtype = next(p.dtype for p in run.reader.llm.parameters() if not p.requires_grad)  # the frozen LLM's
    run.cost.peak_gflops = max(run.cost.peak_gflops, hardware.peak_gflops(
        dtype, run.accelerator.device, lambda: language_model.mlp_shape(run.reader.config.llm)))
    images_seen = total_steps * run.images_per_step
    run.log.cost({"step": total_steps, "images_seen": images_seen, "train_flops": run.cost.train_flops,
                  "cost": run.cost.table()})
    run.accelerator.print(f"done in {run.minutes():.1f} minutes; checkpoints in {run.training.output_dir}\n"
                          f"cost: {images_seen} images seen by the LLM, {run.cost.train_flops / 1e12:.1f} TFLOP of "
                          f"training (steps and warm-up); CLIP encoded {len(split.train) + len(split.val)} images\n"
                          f"{run.cost.report()}")


# ---------------------------------------------------------------------------- its parts

def set_up(config: ModelConfig, training: TrainConfig) -> tuple[Accelerator, torch.dtype, float]:
    """The device, the precision (measured when auto), the matmul peak in it, and the seeds."""
    device = hardware.pick_device(training.device)
    try:
        dtype, why = hardware.choose_dtype(training.dtype, device, lambda: language_model.mlp_shape(config.llm))
    except ValueError as error:  # an unknown --dtype
        raise SettingsError(str(error)) from None
    mixed_precision = hardware.mixed_precision_for(dtype, training.mixed_precision)
    if mixed_precision == "fp16" and device.type != "cuda":
        raise SettingsError("FP16 training (--dtype float16 / --mixed_precision fp16) needs a CUDA GPU; on a CPU "
                            "use --dtype auto (or float32, bfloat16) and --mixed_precision no")
    try:
        language_model.check_layers(config.llm, config.llm_layers)
    except ValueError as error:
        raise SettingsError(str(error)) from None
    if training.load_in_4bit and device.type != "cuda":
        raise SettingsError("--load_in_4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run on "
                            f"this {device.type}; train without it (the full base in --dtype)")
    if training.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise SettingsError("--load_in_4bit needs the bitsandbytes package: pip install bitsandbytes")
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
    accelerator.print(f"{hardware.describe(accelerator.device)}\n{why}; mixed precision {mixed_precision}")
    # Timed before the seeds are set: the timing draws random matrices.
    peak = hardware.peak_gflops(hardware.DTYPES[dtype], device, lambda: language_model.mlp_shape(config.llm))
    set_seed(training.seed)
    return accelerator, hardware.DTYPES[dtype], peak


def images_per_step(training: TrainConfig, processes: int) -> int:
    return training.batch_size * training.gradient_accumulation_steps * processes


def find_resume_point(config: ModelConfig, training: TrainConfig, data_identity: dict):
    """(checkpoint, its state.json, its training state) that --resume names, or (None, {}, None)
    to start afresh; a checkpoint that does not fit is refused before any model loads."""
    resume_from = checkpoint.resume_point(training.output_dir, training.resume, config, data_identity)
    if resume_from is None:
        return None, {}, None
    return resume_from, checkpoint.read_state(resume_from), checkpoint.load_training_state(resume_from)


def count_steps_per_epoch(training: TrainConfig, train_rows: int, processes: int, num_shots: int) -> int:
    """Optimizer steps in one epoch, or a DataError where the rows are too few for one."""
    if train_rows // images_per_step(training, processes) == 0 or train_rows <= num_shots:
        raise data.DataError(f"{training.data_csv}: {train_rows} training rows are too few for batch size "
                             f"{training.batch_size} x {training.gradient_accumulation_steps} accumulation step(s) x "
                             f"{processes} process(es) and {num_shots} shots")
    return train_rows // images_per_step(training, processes)


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


def encode_images(reader: DiagramReader, train_rows, val_rows, accelerator, cost: RunCost) -> Split:
    """The vision encoder is frozen: its features are computed once per image and kept in memory."""
    reader.vision.to(accelerator.device)
    started = time.perf_counter()
    with tqdm(total=len(train_rows) + len(val_rows), desc="CLIP features", unit="img",
              disable=not accelerator.is_main_process) as bar:
        split = Split(train_rows, val_rows, reader.vision.encode([r.image_path for r in train_rows], progress=bar),
                      reader.vision.encode([r.image_path for r in val_rows], progress=bar))
    cost.add("CLIP features", (len(train_rows) + len(val_rows)) * reader.vision.flops_per_image(),
             time.perf_counter() - started)
    return split


def warm_up_projector(reader: DiagramReader, split: Split, training: TrainConfig, cost: RunCost, accelerator):
    """LLaVA's first stage, with the picture loss as its signal: the projector and its head
    alone, on the cached features, before the LLM sees an image."""
    projector = reader.projector
    if not training.projector_warmup_epochs or projector.quadrant_head is None:
        return
    targets = picture_targets(reader.language, [row.dsl for row in split.train])
    batch_size = training.projector_warmup_batch_size
    optimizer = torch.optim.AdamW(projector.parameters(), lr=training.projector_warmup_lr)
    total = math.ceil(len(split.train) / batch_size) * training.projector_warmup_epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    generator = torch.Generator().manual_seed(training.seed)
    projector.to(accelerator.device).train()
    for _ in tqdm(range(training.projector_warmup_epochs), desc="projector warm-up", unit="epoch",
                  disable=not accelerator.is_main_process):
        order = torch.randperm(len(split.train), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            with cost.count("projector warm-up", shape=(len(batch),)):
                tokens = projector(split.train_features[batch].to(accelerator.device))
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


def restore(resumed_state: dict | None, saved: dict, optimizer, scheduler, accelerator) -> tuple[int, float]:
    """(step, start time) of a new run, or of a resumed one with its optimizer, scheduler,
    gradient scaler and random states as they were (the model's weights came with it).
    resumed_state: checkpoint.load_training_state; saved: the checkpoint's state.json."""
    if resumed_state is None:
        return 0, time.time()
    optimizer.load_state_dict(resumed_state["optimizer"])
    scheduler.load_state_dict(resumed_state["scheduler"])
    if accelerator.scaler is not None and resumed_state.get("scaler"):
        accelerator.scaler.load_state_dict(resumed_state["scaler"])
    checkpoint.set_rng_states(resumed_state["rng"])
    return saved["step"], time.time() - 60 * saved["minutes"]


def epoch_order(num_train: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch: a function of seed and epoch only, so a resumed run
    sees the same batches as an uninterrupted one."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(num_train, generator=generator).tolist()


def training_batches(run: Run, split: Split, step: int) -> list[dict]:
    """This process's micro-batches of optimizer step `step`: target images in the epoch's
    order, each after num_shots other training images shown solved."""
    training, accelerator, shots_per_image = run.training, run.accelerator, run.reader.config.num_shots
    epoch, batch_in_epoch = divmod(step, run.steps_per_epoch)
    order = epoch_order(len(split.train), training.seed, epoch)
    rng = random.Random(f"{training.seed}:{step}:{accelerator.process_index}")
    batches = []
    for micro in range(training.gradient_accumulation_steps):
        first = (((batch_in_epoch * training.gradient_accumulation_steps + micro) * accelerator.num_processes
                  + accelerator.process_index) * training.batch_size)
        indices = order[first:first + training.batch_size]
        shots = []
        for i in indices:
            others = rng.sample(range(len(split.train) - 1), shots_per_image)
            shots.append([c + (c >= i) for c in others])  # skip the target itself
        features = torch.stack([split.train_features[s + [i]] for s, i in zip(shots, indices)])
        batch = run.reader.collate(features, [[split.train[j].dsl for j in s] for s in shots],
                                   [split.train[i].dsl for i in indices])
        batches.append({k: v.to(accelerator.device) for k, v in batch.items()})
    return batches


def train_step(run: Run, batches: list[dict]) -> tuple[float, float]:
    """One optimizer step over one or more micro-batches: (loss, seconds), its FLOPs added to
    run.cost. Each micro-batch's loss is weighted by its share of the target tokens, so the
    gradient is the one of a single batch holding them all. A non-finite loss is returned
    before the update."""
    accelerator, model, optimizer = run.accelerator, run.prepared, run.optimizer
    started = time.perf_counter()
    model.train()
    targets = [int((batch["labels"] != IGNORE).sum()) for batch in batches]
    loss_value = 0.0
    sizes = tuple(packed_sizes(b["attention_mask"], b["labels"]) for b in batches)
    with run.cost.count("training steps", sizes, accelerator.num_processes):
        for i, (batch, count) in enumerate(zip(batches, targets)):
            # Processes synchronise gradients once, after the last micro-batch.
            with accelerator.no_sync(model) if i < len(batches) - 1 else contextlib.nullcontext():
                with accelerator.autocast():
                    loss = model(**batch) * (count / sum(targets))
                loss_value += accelerator.reduce(loss.detach(), reduction="mean").item()
                if not math.isfinite(loss_value):
                    return loss_value, time.perf_counter() - started
                accelerator.backward(loss)
        if run.training.grad_clip:
            accelerator.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                        run.training.grad_clip)
        optimizer.step()  # under fp16, the gradient scaler skips steps with inf/nan gradients
        run.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    hardware.synchronize(accelerator.device)
    return loss_value, time.perf_counter() - started


def log_step(run: Run, step: int, loss: float, seconds: float, batches: list[dict]):
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    run.log.step({"step": step, "epoch": step / run.steps_per_epoch, "loss": loss,
                  "lr": run.scheduler.get_last_lr()[0], "step_seconds": seconds, "tokens_per_second": tokens / seconds,
                  "minutes": run.minutes(), "images_seen": step * run.images_per_step,
                  "train_flops": run.cost.train_flops,
                  "peak_memory_gib": hardware.peak_memory_gib(run.accelerator.device)})  # since loading


@torch.no_grad()
def validate(run: Run, split: Split, step: int, bar, loss_over_all: bool = False) -> dict:
    """Loss, exact match and the DSL's own scores on the first eval_samples validation images
    (the loss on all of them with loss_over_all), logged with a few predictions. Full test
    scores are inference.py's job."""
    reader, batch_size, autocast = run.reader, run.training.batch_size, run.accelerator.autocast
    reader.eval()
    example_features, example_dsls = reader.prompt_examples()
    n = min(run.training.eval_samples, len(split.val))
    n_loss = len(split.val) if loss_over_all else n
    total_loss = 0.0
    for start in range(0, n_loss, batch_size):
        end = min(start + batch_size, n_loss)
        batch = reader.collate(with_examples(example_features, split.val_features[start:end]),
                               [example_dsls] * (end - start), [r.dsl for r in split.val[start:end]])
        batch.pop("picture_labels", None)  # the validation loss is the DSL's alone, comparable across settings
        with run.cost.count("validation", ("loss", packed_sizes(batch["attention_mask"], batch["labels"]))):
            with autocast():
                loss = reader(**{k: v.to(run.accelerator.device) for k, v in batch.items()})
            total_loss += loss.item() * (end - start)
    with run.cost.count_calls("validation", *reader.computing_parts()), autocast():  # each call's shape counted once
        predictions, _ = reader.read_features(split.val_features[:n])
    references = [r.dsl for r in split.val[:n]]
    scores = reader.language.score(predictions, references)
    scores.pop("by_count", None)
    scores["loss"] = total_loss / n_loss
    run.log.validation(step, scores, [(r.image_path, p, r.dsl) for r, p in zip(split.val[:8], predictions)],
                       reader.language)
    f1s = "".join(f", {name[:-3].replace('_', ' ')} F1 {value:.3f}" for name, value in scores.items()
                  if name.endswith("_f1"))  # the DSL's own: element F1, node F1, ...
    bar.write(f"step {step}: val loss {scores['loss']:.4f}, exact match {scores['exact_match']:.3f} on "
              f"{n} images{f1s}, character error rate {scores['cer']:.3f}")
    for prediction, reference in list(zip(predictions, references))[:4]:
        same = reader.language.canonical_or_raw(prediction) == reader.language.canonical(reference)
        bar.write(f"  {'ok ' if same else 'BAD'} {' '.join(prediction.split())}")
    return scores


def save(run: Run, name: str, step: int, scores: dict | None, data_identity: dict):
    """Checkpoint `name`: the model, its state.json (step, validation scores, minutes, cost,
    settings, data_identity) and what --resume needs; older step checkpoints pruned."""
    accelerator, training = run.accelerator, run.training
    state = {"step": step, "minutes": run.minutes(), "validation": scores, "wandb_id": run.log.run_id,
             "train_flops": run.cost.train_flops, "train": asdict(training), "data": data_identity}
    resume_state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                    "rng": checkpoint.rng_states()}  # values torch.load(weights_only=True) reads back
    folder = checkpoint.save(Path(training.output_dir), name, run.reader, state, resume_state)
    checkpoint.prune(folder.parent, training.keep_step_checkpoints)
    if name.startswith("epoch-"):
        run.log.checkpoint(folder)


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
