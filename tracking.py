"""Where a training run's numbers go: output_dir/log.jsonl, Weights & Biases, and, when
W&B is not online, output_dir/curves.png, so a user without an account still sees the run.

At each validation W&B gets a table of sample predictions (the image, the prediction
drawn by the DSL's renderer, both DSL texts, exact or not); at each epoch the checkpoint is
logged as an artifact (uploaded when online, recorded for `wandb sync` when offline).
Its files are written through files.py: a kill tears at most log.jsonl's last line, which
is dropped on resume, and never leaves half of curves.png.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

import data
import files
from checkpoint import CheckpointError


class LogFile:
    """log.jsonl: one JSON record a line, each appended and synced on its own."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict):
        files.append_line(self.path, json.dumps(record))  # a full disk: a torn line at most, which records() drops

    def records(self) -> list[dict]:
        try:
            return files.read_jsonl(self.path, "finetune.py")
        except ValueError as error:  # a line torn in the middle: not a kill's doing
            raise CheckpointError(f"{error}; move {self.path} aside to continue without it") from None

    def keep_until(self, step: int):
        """Keep the records up to `step` (a resumed run logs the later ones again, and its own
        cost at its end); none at step 0."""
        kept = [r for r in self.records() if (r.get("step") or r.get("eval", {}).get("step", 0)) <= step
                and "cost" not in r] if step else []
        files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


class RunLog:
    def __init__(self, training, settings: dict, run_id: str | None, is_main_process: bool, resume_step: int = 0):
        """training: finetune.TrainConfig (output_dir, wandb_project, wandb_mode); settings: every
        setting of the run, for W&B; run_id: the W&B run a resumed run continues."""
        output_dir = Path(training.output_dir)
        self.output_dir, self.is_main = output_dir, is_main_process
        self.file = LogFile(output_dir / "log.jsonl")
        if is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.file.keep_until(resume_step)
        self.mode = _wandb_mode(training.wandb_mode) if is_main_process else "disabled"
        import wandb

        self.run = wandb.init(project=training.wandb_project, config=settings, mode=self.mode, dir=str(output_dir),
                              id=run_id, resume="allow" if run_id else None)

    @property
    def run_id(self) -> str:
        return self.run.id

    def step(self, record: dict):
        self._append(record)
        self.run.log(record, step=record["step"])

    def validation(self, step: int, scores: dict, samples: list[tuple[Path, str, str]], language):
        """scores: the DSL's overall scores and the loss; samples: (image, raw prediction, reference)."""
        self._append({"eval": {**scores, "step": step}})
        if not self.is_main:
            return
        self.run.log({f"val/{k}": v for k, v in scores.items()} | {"val/predictions": self._table(samples, language)}, step=step)
        if self.mode != "online":
            self._plot()

    def cost(self, record: dict):
        """The run's cost at its end (cost.RunCost.table, with the step it ended at)."""
        self._append(record)
        if self.is_main:
            self.run.summary.update({f"cost/{phase}/{k}": v for phase, row in record["cost"].items()
                                     for k, v in row.items()})

    def checkpoint(self, folder: Path):
        """Log a checkpoint folder as a W&B artifact (one artifact per run, a version per save)."""
        if self.mode != "disabled":
            import wandb

            artifact = wandb.Artifact(f"checkpoint-{self.run.id}", type="model")
            artifact.add_dir(str(folder))
            self.run.log_artifact(artifact, aliases=[folder.name, "latest"])

    def finish(self):
        self.run.finish()

    # -- the files

    def _append(self, record: dict):
        if self.is_main:
            self.file.append(record)

    def _table(self, samples, language):
        import wandb

        table = wandb.Table(columns=["image", "prediction drawn", "predicted", "reference", "exact"])
        render = language.part("picture")
        for image_path, prediction, reference in samples:
            image = data.load_image(image_path)
            valid = language.is_valid(prediction)
            drawn = render(prediction, image.width) if valid and render else Image.new("RGB", image.size, "white")
            predicted = language.canonical_or_raw(prediction)
            table.add_data(wandb.Image(image), wandb.Image(drawn), predicted, reference,
                           predicted == language.canonical(reference))
        return table

    def _plot(self):
        """curves.png: training loss, and validation loss and exact match, against the step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.file.records()
        steps = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [r["eval"] for r in records if "eval" in r]
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
        left.plot(*zip(*steps), lw=0.8, label="training")
        left.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="validation")
        left.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
        left.legend()
        right.plot([e["step"] for e in evals], [e["exact_match"] for e in evals], "o-", label="exact match")
        for name in [k for k in evals[0] if k.endswith("_f1")] if evals else []:  # the DSL's own scores
            right.plot([e["step"] for e in evals], [e[name] for e in evals], "s--", label=name.replace("_f1", " F1"))
        right.set(xlabel="step", ylim=(0, 1.02), title="validation")
        right.legend()
        figure.tight_layout()
        with files.replacing(self.output_dir / "curves.png") as temporary:
            figure.savefig(temporary, dpi=100)
        plt.close(figure)


def _wandb_mode(mode: str) -> str:
    """A W&B mode that never blocks: for "auto", WANDB_MODE if set, else online when logged
    in, offline when not."""
    if mode == "auto":
        return os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
    return mode


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
