"""A training run's folder: checkpoints written whole or not at all, found again, resumed.

    output_dir/
      epoch-01/, step-0000250/  the model (DiagramReader.save_pretrained), state.json (step, validation
                                scores, training settings) and training_state.pt (optimizer, scheduler,
                                gradient scaler, random states: what --resume needs)
      best                      the name of the checkpoint with the highest validation exact match
      log.jsonl, curves.png, wandb/
      run.lock                  held (flock) by the run training into this folder, while it lives

The model's own files are written and read by model.DiagramReader's save/load pair;
this module adds what a run keeps beside them, and is the one place that lists,
picks (the `best` pointer included), checks, writes and resumes checkpoints. Every write
goes through files.py: a checkpoint is whole or absent, whenever the process is killed,
and `tidy` puts back what a kill between the two renames of a save left aside.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import files

MODEL_FILES = ("config.json", "base_models.json", "projector.safetensors", "adapter/adapter_config.json",
               "adapter/adapter_model.safetensors")
# What base_models.json records about the base models, and how an error names each fact.
IDENTITY_NAMES = {"clip_fingerprint": "CLIP weights", "feature_shape": "CLIP feature shape",
                  "llm_hidden_size": "LLM hidden size", "vocab_size": "vocabulary size",
                  "llm_fingerprint": "LLM weights"}


class CheckpointError(Exception):
    """A checkpoint that is incomplete or was made for another model."""


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file, or a CheckpointError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable JSON file ({error})") from None


def model_folder(path: str | Path) -> Path:
    """The complete checkpoint that `path` names (find's rules), or a CheckpointError
    listing what it lacks."""
    folder, _ = find(path)
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not a complete checkpoint: missing {', '.join(missing)}")
    return folder


@contextlib.contextmanager
def loading(what: str | None):
    """A failure to load `what`, a base model a checkpoint needs, as a CheckpointError naming
    it; with None (a new model, no checkpoint) the error goes through as it is."""
    try:
        yield
    except (OSError, RuntimeError, ValueError) as error:
        if what is None:
            raise
        raise CheckpointError(f"cannot load {what}: {error}") from None


def check_same_models(saved: dict, loaded: dict, source: str):
    """Compare the facts a checkpoint recorded about its base models (base_models.json) with
    those of `source`, a base model as loaded now."""
    for key, value in loaded.items():
        if key not in saved:
            continue  # a fact this checkpoint did not record
        expected = saved[key]
        # Checksums: loose enough for the same weights in another precision (bf16 vs fp32).
        same = (abs(expected - value) <= 1e-4 * abs(expected) if isinstance(value, float) else expected == value)
        if not same:
            raise CheckpointError(f"this checkpoint was made for another base model: its {IDENTITY_NAMES[key]} is "
                                  f"{expected}, but {source} as loaded here has {value}")


def save(run_dir: Path, name: str, reader, state: dict, training_state: dict) -> Path:
    """Write checkpoint `name` whole or not at all (files.replacing_folder: a temporary folder,
    synced, renamed into place): a crash or a kill leaves the earlier checkpoints whole, an
    older `name` included. `state` (JSON) must hold the step; training_state is torch-saved
    and must hold only what torch.load(weights_only=True) reads back (see rng_states)."""
    folder = run_dir / name
    with files.replacing_folder(folder) as temporary:
        reader.save_pretrained(temporary)
        torch.save(training_state, temporary / "training_state.pt")
        (temporary / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    _update_best(run_dir)
    return folder


def tidy(run_dir: str | Path):
    """Put back a checkpoint that a kill between a save's two renames left as `.old-NAME`,
    and remove half-written `.tmp-*` ones (files.recover), unless a training run holds the
    folder: its `.tmp-*` is a save in progress. A folder we may not write is left as it is."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any(p.name.startswith((files.TEMPORARY, files.OLD)) for p in run_dir.iterdir()):
        return
    lock = None
    try:
        if (run_dir / "run.lock").exists():
            lock = os.open(run_dir / "run.lock", os.O_RDONLY)
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)  # BlockingIOError while a run holds it
        files.recover(run_dir)
    except (BlockingIOError, PermissionError):
        pass  # a live run's save in progress, or someone else's folder that we may only read
    finally:
        if lock is not None:
            os.close(lock)


def read_state(folder: Path) -> dict:
    return read_json(Path(folder) / "state.json")


def folders(run_dir: str | Path) -> list[Path]:
    """A run folder's complete checkpoints (epoch-NN, step-NNNNNNN), oldest first by step."""
    found = [p for p in Path(run_dir).glob("*")
             if p.name.startswith(("epoch-", "step-")) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: (read_state(p)["step"], p.name))


def best(run_dir: str | Path) -> Path | None:
    """The checkpoint the `best` pointer names, if it is still there."""
    pointer = Path(run_dir) / "best"
    if pointer.is_file() and (folder := Path(run_dir) / pointer.read_text().strip()).is_dir():
        return folder
    return None


def _update_best(run_dir: Path):
    """Point `best` at the checkpoint with the highest validation exact match (the later one
    of equals); checkpoints saved without a validation at their step are not candidates."""
    states = [(read_state(p), p.name) for p in folders(run_dir)]
    scored = [(state["validation"]["exact_match"], state["step"], name) for state, name in states
              if state.get("validation")]
    if scored:
        files.write_text(run_dir / "best", max(scored)[2] + "\n")


def prune(run_dir: Path, keep_step_checkpoints: int):
    """Delete all but the last `keep_step_checkpoints` step checkpoints, never the best one nor
    the run's latest checkpoint: the one --resume auto continues from (with 0, that of a Ctrl-C)."""
    found = folders(run_dir)
    steps = [p for p in found if p.name.startswith("step-")]
    kept = set(steps[len(steps) - keep_step_checkpoints:] if keep_step_checkpoints else []) | {found[-1], best(run_dir)}
    for old in steps:
        if old not in kept:
            # Renamed first: a kill during the deletion leaves a `.tmp-*` (tidy removes it), never
            # a half-deleted folder whose state.json still says it is whole.
            doomed = old.with_name(files.TEMPORARY + old.name)
            old.rename(doomed)
            files.sync_folder(run_dir)
            shutil.rmtree(doomed)


def find(path: str | Path) -> tuple[Path, str]:
    """(checkpoint folder, which one and why) for a checkpoint folder itself, a run folder or its `best` pointer:
    the run's best checkpoint, else its latest epoch, else its latest step checkpoint."""
    path = Path(path)
    if path.name == "best" and path.is_file():  # the pointer itself: "checkpoints/best"
        path = path.parent
    if (path / "config.json").is_file():
        return path, "as given"
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: the folder does not exist")
    tidy(path)
    if (chosen := best(path)) is not None:
        state = read_state(chosen)
        return chosen, f"the run's best: validation exact match {state['validation']['exact_match']:.3f} at " \
                       f"step {state['step']}"
    found = folders(path)
    epochs = [p for p in found if p.name.startswith("epoch-")]
    if found:
        return (epochs or found)[-1], "the run's latest " + ("epoch" if epochs else "step checkpoint")
    raise CheckpointError(f"no checkpoint in {path}: expected a config.json there, or epoch-*/step-* folders")


def hold(run_dir: str | Path):
    """Hold run_dir for this training run, and tidy it: another run started into the same
    folder while this one is alive is refused. The lock is the OS's (flock) and ends with the process,
    however it ends, so a killed run leaves nothing that blocks the next. Keep the returned
    file open for the run's lifetime."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / "run.lock", "a+")  # the file stays; the OS lock ends with its holder
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise CheckpointError(f"{run_dir} is in use by another training run (pid {holder}); wait for it to "
                              "end, or pick another --output_dir") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    files.recover(run_dir)  # the holder alone writes here: what a killed save left is put back now
    return lock


def resume_point(output_dir: str, resume: str, config, data: dict) -> Path | None:
    """The checkpoint --resume names, checked to fit `config` and `data` (data_identity): None
    to start afresh, which is refused where output_dir already holds a run (it would be
    overwritten). The main process calls it once it holds output_dir (hold tidies it)."""
    run = Path(output_dir if resume in ("auto", "") else resume)
    tidy(run)
    found = [run] if (run / "training_state.pt").is_file() else \
        [p for p in folders(run) if (p / "training_state.pt").is_file()]
    if resume and found:
        check_resumable(found[-1], config)
        check_same_data(found[-1], data)
        return found[-1]
    if resume not in ("auto", ""):
        raise CheckpointError(f"--resume {resume}: no checkpoint with a training state there")
    if earlier := folders(output_dir):
        raise CheckpointError(f"{output_dir} already holds a run (latest: {earlier[-1].name}); continue it with "
                              "--resume auto, or pick another --output_dir (or delete it)")
    return None  # a first run


def check_resumable(folder: Path, config):
    """Refuse to resume a checkpoint made with other model settings, naming them."""
    # Settings added since the checkpoint was made take their defaults.
    saved = asdict(type(config).from_dict(read_json(folder / "config.json")))
    differ = [f"{k}: {saved[k]!r} there, {v!r} here" for k, v in asdict(config).items() if saved[k] != v]
    if differ:
        raise CheckpointError(f"cannot resume from {folder}: it was made for another model ("
                              + "; ".join(differ) + "). Resume with the same model settings, or start a new "
                              "--output_dir.")


def data_identity(data_csv: str | Path, seed: int) -> dict:
    """What decides which rows train and which validate, and their order: recorded in every
    checkpoint's state.json, compared on --resume."""
    return {"seed": seed, "data_csv": str(Path(data_csv).resolve()),
            "data_csv_sha256": hashlib.sha256(Path(data_csv).read_bytes()).hexdigest()}


def check_same_data(folder: Path, data: dict):
    """Refuse to resume on another split or order of the data: another --seed, --data_csv, or
    a CSV whose content changed would move rows between training and validation."""
    saved = read_state(folder).get("data", {})  # checkpoints that predate the record: unchecked
    differ = [("--data_csv content (SHA-256)" if key == "data_csv_sha256" else "--" + key, saved[key], value)
              for key, value in data.items() if key in saved and saved[key] != value]
    if differ:
        flag = differ[0][0].split()[0]
        raise CheckpointError(f"cannot resume from {folder}: the run was made with another split of the data ("
                              + "; ".join(f"{name}: {old!r} there, {new!r} here" for name, old, new in differ)
                              + f"). Resume with the old {flag}, or start a new --output_dir.")


def load_training_state(folder: Path) -> dict:
    """The optimizer, scheduler, gradient scaler and random states, read as tensors and plain
    values only: a file holding other Python objects is refused, since unpickling them could
    run any code (a run folder from someone else)."""
    path = Path(folder) / "training_state.pt"
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = found.group(1) if found else "an object other than tensors, numbers, strings, lists and dicts"
        raise CheckpointError(f"{path}: refused: it holds {what}, and loading that could run code. A checkpoint "
                              "saved before training states held tensors and plain values only (numpy's random "
                              "state as an array) cannot be resumed: start a new --output_dir") from None


def rng_states() -> dict:
    """The random states, as values torch.load(weights_only=True) reads: numpy's array as a
    tensor, python's as a tuple of ints."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict):
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
