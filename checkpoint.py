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
picks, writes and resumes checkpoints.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from model import CheckpointError, DiagramReader, ModelConfig, read_json


def save(run_dir: Path, name: str, reader: DiagramReader, state: dict, training_state: dict) -> Path:
    """Write checkpoint `name` into a temporary folder, then rename it into place: a crash
    during the save leaves the earlier checkpoints whole and no half-written one behind a
    real name. `state` (JSON) must hold the step; training_state is torch-saved."""
    folder = run_dir / name
    temporary = run_dir / f".tmp-{name}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    reader.save_pretrained(temporary)
    torch.save(training_state, temporary / "training_state.pt")
    (temporary / "state.json").write_text(json.dumps(state, indent=2) + "\n")  # last: marks it complete
    if folder.exists():  # the same step saved again after a resume
        old = run_dir / f".old-{name}"
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        temporary.rename(folder)
        shutil.rmtree(old)
    else:
        temporary.rename(folder)
    _update_best(run_dir)
    return folder


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
        temporary = run_dir / ".best"
        temporary.write_text(max(scored)[2] + "\n")
        os.replace(temporary, run_dir / "best")


def prune(run_dir: Path, keep_step_checkpoints: int):
    """Delete all but the last `keep_step_checkpoints` step checkpoints (never the best one)."""
    steps = [p for p in folders(run_dir) if p.name.startswith("step-")]
    for old in steps[:-keep_step_checkpoints or None]:
        if old != best(run_dir):
            shutil.rmtree(old)


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
    """Hold run_dir for this training run: another run started into the same folder while
    this one is alive is refused. The lock is the OS's (flock) and ends with the process,
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
    return lock


def resume_point(output_dir: str, resume: str, config: ModelConfig) -> Path | None:
    """The checkpoint --resume names, checked to fit `config`: None to start afresh, which
    is refused where output_dir already holds a run (it would be overwritten)."""
    run = Path(output_dir if resume in ("auto", "") else resume)
    found = [run] if (run / "training_state.pt").is_file() else \
        [p for p in folders(run) if (p / "training_state.pt").is_file()]
    if resume and found:
        check_resumable(found[-1], config)
        return found[-1]
    if resume not in ("auto", ""):
        raise CheckpointError(f"--resume {resume}: no checkpoint with a training state there")
    if earlier := folders(output_dir):
        raise CheckpointError(f"{output_dir} already holds a run (latest: {earlier[-1].name}); continue it with "
                              "--resume auto, or pick another --output_dir (or delete it)")
    return None  # a first run


def check_resumable(folder: Path, config: ModelConfig):
    """Refuse to resume a checkpoint made with other model settings, naming them."""
    # Settings added since the checkpoint was made take their defaults.
    saved = asdict(type(config).from_dict(read_json(folder / "config.json")))
    differ = [f"{k}: {saved[k]!r} there, {v!r} here" for k, v in asdict(config).items() if saved[k] != v]
    if differ:
        raise CheckpointError(f"cannot resume from {folder}: it was made for another model ("
                              + "; ".join(differ) + "). Resume with the same model settings, or start a new "
                              "--output_dir.")


def load_training_state(folder: Path) -> dict:
    return torch.load(folder / "training_state.pt", weights_only=False)


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
