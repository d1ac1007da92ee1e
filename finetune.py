"""Fine-tune the projector, the LoRA adapters and the new token embeddings.

    python finetune.py                                    # the embedded CPU configuration below
    python finetune.py --epochs 1 --lr 5e-4               # any hyperparameter from the command line
    python finetune.py configs/llama3-8b.yaml             # a config file (flags after it override it)
    accelerate launch finetune.py configs/llama3-8b.yaml  # data-parallel on several GPUs
    python finetune.py --resume auto                      # continue a stopped run where it stopped

Reads data.csv (90% train, 10% validation), logs to Weights & Biases (offline when
not logged in) and to output_dir/log.jsonl, and writes checkpoints to output_dir:
one per epoch (epoch-NN) and one every --save_every steps (step-NNNNNNN, the last
--keep_step_checkpoints kept), each written whole or not at all.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import HfArgumentParser

import data
import dsl
from model import (DTYPES, CheckpointError, DiagramReader, ModelConfig, VisionEncoder, checkpoint_folders,
                   read_checkpoint_config, with_examples)


@dataclass
class Hyperparameters:
    # data and output
    data_csv: str = "data.csv"
    output_dir: str = "checkpoints"
    val_fraction: float = 0.1
    skip_bad_rows: bool = False  # train on the good rows of a CSV with bad ones, instead of stopping
    # model (see model.ModelConfig)
    llm: str = "smollm2"  # the embedded SmolLM2-135M-Instruct; or a hub id, local folder, .gguf file
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "none"  # random weights (no hub here); laion2b_s34b_b79k where you have it
    clip_seed: int = 0
    image_features: str = "patches"
    # Block 1 of 12: with random weights deeper blocks add cost, not information (probed: equal).
    clip_layer: int = 1
    # 256 px makes ViT-B-32's patch grid 8 x 8, so each quadrant is exactly 4 x 4 patches;
    # merging 2 x 2 patches gives 16 image tokens. Measured: 0.58 exact after 675 steps with
    # 224 px and 49 tokens, 1.00 with this (and 1.15 s instead of 1.5 s a step).
    image_size: int = 256  # 0: the CLIP architecture's own (224)
    patch_merge: int = 2
    projector: str = "mlp2x_gelu"
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    num_shots: int = 0
    instruction: str = "Read the diagram."  # short: every prompt token costs time in every step
    # precision: weights of the frozen LLM, and accelerate's mixed precision (no, fp16, bf16)
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # optimisation
    epochs: int = 1  # of 7,200 images: varied images teach more than repeated ones
    batch_size: int = 8
    lr: float = 1e-3  # LoRA adapters
    projector_lr: float = 1e-3  # projector and new token embeddings
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay down to this fraction of the peak
    grad_clip: float = 1.0
    seed: int = 0
    # evaluation, logging, checkpoints
    eval_every: int = 200  # steps between validation runs (also at every epoch end); 0: epoch ends only
    eval_samples: int = 64  # validation images scored at those runs (loss over all of them at epoch ends)
    save_every: int = 200  # steps between step checkpoints; 0: epoch checkpoints only
    keep_step_checkpoints: int = 2
    resume: str = ""  # "auto" (output_dir's latest checkpoint, if any), a run folder or a checkpoint
    wandb_project: str = "diagram-reader"
    wandb_mode: str = "auto"  # auto: WANDB_MODE if set, else online when logged in, offline when not


def parse_hyperparameters(argv: list[str]) -> Hyperparameters:
    parser = HfArgumentParser(Hyperparameters)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):  # a config file sets new defaults
        values = yaml.safe_load(open(argv[0])) or {}
        unknown = set(values) - set(Hyperparameters.__dataclass_fields__)
        if unknown:
            parser.error(f"{argv[0]}: unknown hyperparameters {', '.join(sorted(unknown))}")
        parser.set_defaults(**values)
        argv = argv[1:]
    for action in parser._actions:  # --help shows each value in force, a config file's included
        if action.dest != "help":
            action.help = "%(default)s"
    (hp,) = parser.parse_args_into_dataclasses(argv)
    return hp


# ---------------------------------------------------------------------------- schedule and data order

def lr_lambda(hp: Hyperparameters, total_steps: int):
    """Linear warmup, then cosine decay to min_lr_ratio of the peak."""
    def factor(step: int) -> float:
        if step < hp.warmup_steps:
            return (step + 1) / hp.warmup_steps
        progress = min(1.0, (step - hp.warmup_steps) / max(1, total_steps - hp.warmup_steps))
        return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def epoch_order(num_train: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch: a function of seed and epoch only, so a resumed run
    sees the same batches as an uninterrupted one."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(num_train, generator=generator).tolist()


def pick_examples(index: int, num_train: int, num_shots: int, rng: random.Random) -> list[int]:
    """num_shots other training images to show solved before image `index`."""
    candidates = rng.sample(range(num_train - 1), num_shots)
    return [c + (c >= index) for c in candidates]  # skip the target itself


# ---------------------------------------------------------------------------- checkpoints

def save_checkpoint(folder: Path, reader: DiagramReader, examples, metadata: dict, training_state: dict):
    """Write a checkpoint into a temporary folder, then rename it into place: a crash during
    the save leaves the previous checkpoints whole and no half-written one behind a real name."""
    temporary = folder.parent / f".tmp-{folder.name}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    reader.save(temporary, examples, metadata)
    torch.save(training_state, temporary / "training_state.pt")
    if folder.exists():  # the same step saved again after a resume
        old = folder.parent / f".old-{folder.name}"
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        temporary.rename(folder)
        shutil.rmtree(old)
    else:
        temporary.rename(folder)


def resume_folder(hp: Hyperparameters) -> Path | None:
    """The checkpoint --resume names: None to start afresh."""
    if not hp.resume:
        return None
    run = Path(hp.output_dir if hp.resume == "auto" else hp.resume)
    if (run / "training_state.pt").is_file():
        return run
    found = [p for p in checkpoint_folders(run) if (p / "training_state.pt").is_file()]
    if found:
        return found[-1]
    if hp.resume == "auto":
        return None  # nothing to resume yet: a first run
    raise CheckpointError(f"--resume {hp.resume}: no checkpoint with a training state there")


def check_resumable(folder: Path, hp: Hyperparameters) -> dict:
    saved = read_checkpoint_config(folder)
    config = asdict(ModelConfig.from_hyperparameters(hp))
    differ = [f"{k}: {saved['model'].get(k)!r} there, {v!r} here" for k, v in config.items() if saved["model"].get(k) != v]
    if differ:
        raise CheckpointError(f"cannot resume from {folder}: it was made for another model ("
                              + "; ".join(differ) + "). Resume with the same model settings, or start a new "
                              "--output_dir.")
    return saved


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------------------- training

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


class SettingsError(Exception):
    """Hyperparameters this machine cannot run."""


def main(hp: Hyperparameters) -> int:
    if hp.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise SettingsError("--mixed_precision fp16 needs a CUDA GPU; on a CPU use --mixed_precision no "
                            "--dtype bfloat16 (or float32)")
    if hp.dtype not in DTYPES:
        raise SettingsError(f"--dtype must be one of {', '.join(DTYPES)}, not {hp.dtype!r}")
    accelerator = Accelerator(mixed_precision=hp.mixed_precision)
    random.seed(hp.seed)
    np.random.seed(hp.seed)
    torch.manual_seed(hp.seed)
    output_dir = Path(hp.output_dir)
    config = ModelConfig.from_hyperparameters(hp)

    # Everything that can be wrong with the input is found before any model loads.
    resume_from = resume_folder(hp)
    resumed = check_resumable(resume_from, hp) if resume_from else None
    if not resume_from and (earlier := checkpoint_folders(output_dir)):
        raise SettingsError(f"{output_dir} already holds a run (latest: {earlier[-1].name}); "
                            "continue it with --resume auto, or pick another --output_dir (or delete it)")
    rows, skipped = data.read_dataset(hp.data_csv, hp.skip_bad_rows)
    if skipped:
        accelerator.print(f"skipping {skipped} bad rows of {hp.data_csv} (--skip_bad_rows)")
    order = list(range(len(rows)))
    random.Random(hp.seed).shuffle(order)
    num_val = max(1, round(len(rows) * hp.val_fraction))
    train_rows = [rows[i] for i in order[num_val:]]
    val_rows = [rows[i] for i in order[:num_val]]
    steps_per_epoch = len(train_rows) // (hp.batch_size * accelerator.num_processes)
    if steps_per_epoch == 0 or len(train_rows) <= hp.num_shots:
        raise data.DataError(f"{hp.data_csv}: {len(train_rows)} training rows are too few for batch size "
                             f"{hp.batch_size} x {accelerator.num_processes} process(es) and {hp.num_shots} shots")
    total_steps = steps_per_epoch * hp.epochs
    accelerator.print(f"{len(train_rows)} training and {len(val_rows)} validation images from {hp.data_csv}")

    # The encoder is frozen: its features are computed once per image and kept in memory.
    vision = VisionEncoder(config).to(accelerator.device)
    with tqdm(total=len(rows), desc="CLIP features", unit="img", disable=not accelerator.is_main_process) as bar:
        train_features = vision.encode([r.image_path for r in train_rows], progress=bar)
        val_features = vision.encode([r.image_path for r in val_rows], progress=bar)
    metadata = {"clip_fingerprint": vision.fingerprint(), "feature_shape": list(vision.feature_shape)}
    del vision

    reader = DiagramReader.build(config, tuple(train_features.shape[1:]), DTYPES[hp.dtype])
    reader.projector.set_feature_statistics(train_features)
    lora_params, projector_params = reader.trainable_parameters()
    trainable = lora_params + projector_params
    optimizer = torch.optim.AdamW([{"params": lora_params, "lr": hp.lr},
                                   {"params": projector_params, "lr": hp.projector_lr}],
                                  weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hp, total_steps))
    model, optimizer, scheduler = accelerator.prepare(reader, optimizer, scheduler)
    accelerator.print(f"trainable parameters: {sum(p.numel() for p in trainable):,} "
                      f"(LoRA {sum(p.numel() for p in lora_params):,}); "
                      f"{steps_per_epoch} steps per epoch, {total_steps} in all")

    # Solved examples for the prompt at evaluation and inference: fixed, the first training rows.
    examples = [(data.load_image(r.image_path), r.dsl) for r in train_rows[:hp.num_shots]]
    example_features = train_features[:hp.num_shots]

    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / "log.jsonl"
    step, minutes_before, wandb_id = 0, 0.0, None
    if resume_from:
        state = torch.load(resume_from / "training_state.pt", weights_only=False)
        set_peft_model_state_dict(reader.llm, load_file(resume_from / "adapter" / "adapter_model.safetensors"))
        reader.projector.load_state_dict(load_file(resume_from / "projector.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        step, minutes_before, wandb_id = resumed["step"], state["minutes"], state.get("wandb_id")
        truncate_log(log_path, step, accelerator)
        accelerator.print(f"resuming from {resume_from} at step {step}")
    elif accelerator.is_main_process:
        log_path.unlink(missing_ok=True)

    run = init_wandb(hp, accelerator, wandb_id)
    start = time.time() - 60 * minutes_before

    def minutes():
        return (time.time() - start) / 60

    def save(name: str):
        if not accelerator.is_main_process:
            return
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                 "rng": rng_states(), "minutes": minutes(), "wandb_id": run.id}
        save_checkpoint(output_dir / name, reader, examples,
                        {**metadata, "step": step, "hyperparameters": asdict(hp)}, state)
        step_checkpoints = [p for p in checkpoint_folders(output_dir) if p.name.startswith("step-")]
        for old in step_checkpoints[:-hp.keep_step_checkpoints or None]:
            shutil.rmtree(old)

    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=not accelerator.is_main_process)
    with StopRequested() as stop:
        while step < total_steps:
            epoch, batch_in_epoch = divmod(step, steps_per_epoch)
            permutation = epoch_order(len(train_rows), hp.seed, epoch)
            first = (batch_in_epoch * accelerator.num_processes + accelerator.process_index) * hp.batch_size
            indices = permutation[first:first + hp.batch_size]
            shot_rng = random.Random(f"{hp.seed}:{step}:{accelerator.process_index}")
            shots = [pick_examples(i, len(train_rows), hp.num_shots, shot_rng) for i in indices]
            images = torch.stack([train_features[s + [i]] for s, i in zip(shots, indices)])
            batch = reader.collate(images, [[train_rows[j].dsl for j in s] for s in shots],
                                   [train_rows[i].dsl for i in indices])
            model.train()
            with accelerator.autocast():
                loss = model(**{k: v.to(accelerator.device) for k, v in batch.items()})
            loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
            if not math.isfinite(loss_value):
                bar.close()
                last = checkpoint_folders(output_dir)
                accelerator.print(f"finetune.py: error: step {step + 1}: the loss is {loss_value}; stopping. "
                                  f"The last good checkpoint is {last[-1] if last else 'none (none saved yet)'}. "
                                  "Try a lower --lr / --projector_lr, or --dtype float32.", file=sys.stderr)
                return 1
            accelerator.backward(loss)
            if hp.grad_clip:
                accelerator.clip_grad_norm_(trainable, hp.grad_clip)
            optimizer.step()  # under fp16, the gradient scaler skips steps with inf/nan gradients
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            record = {"step": step, "epoch": step / steps_per_epoch, "loss": loss_value,
                      "lr": scheduler.get_last_lr()[0], "minutes": minutes()}
            append_log(log_path, record, accelerator)
            run.log(record, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", epoch=f"{record['epoch']:.2f}")

            end_of_epoch = step % steps_per_epoch == 0
            if (hp.eval_every and step % hp.eval_every == 0) or end_of_epoch:
                scores = evaluate(reader, val_features, val_rows, example_features, examples, hp, accelerator,
                                  loss_over_all=end_of_epoch)
                samples = scores.pop("samples")
                scores.update(step=step, minutes=minutes())
                append_log(log_path, {"eval": scores}, accelerator)
                run.log({f"val/{k}": v for k, v in scores.items() if k != "step"}, step=step)
                bar.write(f"step {step}: val loss {scores['loss']:.4f}, exact match {scores['exact_match']:.3f} "
                          f"on {scores['n']} images, element F1 {scores['element_f1']:.3f}")
                for prediction, reference in samples:
                    bar.write(f"  {'ok ' if prediction == reference else 'BAD'} {' '.join(prediction.split())}")
            if end_of_epoch:
                save(f"epoch-{step // steps_per_epoch:02d}")
            elif (hp.save_every and step % hp.save_every == 0) or stop.requested:
                save(f"step-{step:07d}")
            if stop.requested:
                bar.close()
                accelerator.print(f"stopped at step {step}; continue with --resume auto "
                                  f"(--output_dir {output_dir})", file=sys.stderr)
                return 130
    bar.close()
    run.finish()
    accelerator.print(f"done in {minutes():.1f} minutes; checkpoints in {output_dir}")
    return 0


@torch.no_grad()
def evaluate(reader, val_features, val_rows, example_features, examples, hp, accelerator,
             loss_over_all: bool = False) -> dict:
    """Loss, exact match and element F1 on the first eval_samples validation images (the
    loss on all of them with loss_over_all). Full test scores are inference.py's job."""
    reader.eval()
    device = accelerator.device
    example_dsls = [text for _, text in examples]

    def images_for(start, end):
        return with_examples(example_features, val_features[start:end])

    n = min(hp.eval_samples, len(val_rows))
    n_loss = len(val_rows) if loss_over_all else n
    total_loss = 0.0
    for start in range(0, n_loss, hp.batch_size):
        end = min(start + hp.batch_size, n_loss)
        batch = reader.collate(images_for(start, end), [example_dsls] * (end - start),
                               [r.dsl for r in val_rows[start:end]])
        with accelerator.autocast():
            total_loss += reader(**{k: v.to(device) for k, v in batch.items()}).item() * (end - start)
    predictions = []
    for start in range(0, n, 2 * hp.batch_size):
        end = min(start + 2 * hp.batch_size, n)
        with accelerator.autocast():
            predictions += reader.generate(images_for(start, end).to(device), [example_dsls] * (end - start))
    references = [r.dsl for r in val_rows[:n]]
    scores = dsl.evaluate(predictions, references)
    scores.pop("by_count")
    scores["loss"] = total_loss / n_loss
    scores["samples"] = [(dsl.canonical(p), r) for p, r in zip(predictions[:4], references)]
    return scores


def append_log(path: Path, record: dict, accelerator):
    if accelerator.is_main_process:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int, accelerator):
    """Drop the records of steps after `step`: a resumed run logs them again."""
    if not accelerator.is_main_process or not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and (json.loads(line).get("step") or json.loads(line)["eval"]["step"]) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def init_wandb(hp: Hyperparameters, accelerator, run_id: str | None = None):
    """A W&B run that never blocks: WANDB_MODE if set, else online when logged in, offline when not."""
    import wandb

    mode = hp.wandb_mode
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
    if not accelerator.is_main_process:
        mode = "disabled"
    return wandb.init(project=hp.wandb_project, config=asdict(hp), mode=mode, dir=hp.output_dir,
                      id=run_id, resume="allow" if run_id else None)


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


if __name__ == "__main__":
    hyperparameters = parse_hyperparameters(sys.argv[1:])
    try:
        sys.exit(main(hyperparameters))
    except (data.DataError, CheckpointError, SettingsError) as error:
        print(f"finetune.py: error: {error}", file=sys.stderr)
        sys.exit(2)
