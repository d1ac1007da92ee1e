"""finetune.py and inference.py end to end on tiny models: checkpoints, resume, errors."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import checkpoint
import finetune
import model
from conftest import ROOT


def tiny_args(tiny_llm, tiny_clip, dataset, output_dir, *extra):
    return ["--llm", tiny_llm, "--clip_model", tiny_clip, "--clip_layer", "-1", "--image_size", "64",
            "--patch_merge", "2", "--data_csv",
            str(dataset / "data.csv"), "--output_dir", str(output_dir), "--dtype", "float32",
            "--batch_size", "4", "--eval_every", "0", "--eval_samples", "4", "--wandb_mode", "disabled", *extra]


def run_script(script, *args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def run_tool(name, *args, timeout=300, **kwargs):
    """A tool as the README runs it: `python -m tools.NAME` from the repo's root."""
    return subprocess.run([sys.executable, "-m", f"tools.{name}", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kwargs)


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r and "eval" not in r]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llm, tiny_clip, tiny_dataset):
    """A two-epoch tiny run with a step checkpoint every 2 steps (5 steps per epoch)."""
    run_dir = tmp_path_factory.mktemp("run")
    result = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, run_dir, "--epochs", "2",
                                                  "--save_every", "2", "--num_shots", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_run_writes_epoch_and_step_checkpoints_in_peft_and_safetensors_format(trained_run):
    names = sorted(p.name for p in trained_run.iterdir())
    assert "epoch-01" in names and "epoch-02" in names
    steps = [n for n in names if n.startswith("step-")]
    assert steps == ["step-0000006", "step-0000008"]  # every 2 steps, the last 2 kept, epoch ends apart
    assert not [n for n in names if n.startswith(".")]  # no temporary folders left
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "projector.safetensors",
                 "tokenizer/tokenizer_config.json", "config.json", "training_state.pt", "examples/0.png"):
        assert (trained_run / "epoch-02" / name).is_file(), name
    saved = json.loads((trained_run / "epoch-02" / "state.json").read_text())
    config = json.loads((trained_run / "epoch-02" / "config.json").read_text())  # the model's settings
    assert saved["step"] == 10 and config["num_shots"] == 1
    log = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 11))
    assert [r["eval"]["step"] for r in log if "eval" in r] == [5, 10]  # validation at each epoch end
    # The last record: the run's cost, phase by phase, its work adding up to the whole.
    last = log[-1]
    assert last["step"] == 10 and last["train_flops"] == [r for r in log if "loss" in r][-1]["train_flops"] > 0
    phases = last["cost"]
    assert {"CLIP features", "training steps", "validation", "other", "in all"} <= set(phases)
    assert all(row["flops"] > 0 and 0 < row["share_of_peak"] for name, row in phases.items() if name != "other")
    assert sum(row["flops"] for name, row in phases.items() if name != "in all") == phases["in all"]["flops"]
    seconds = sum(row["seconds"] for name, row in phases.items() if name != "in all")
    assert abs(seconds - phases["in all"]["seconds"]) < 0.05


def test_a_new_run_does_not_overwrite_an_old_one(trained_run, tiny_llm, tiny_clip, tiny_dataset):
    result = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, trained_run))
    assert result.returncode == 2 and "already holds a run" in result.stderr and "--resume auto" in result.stderr
    assert json.loads((trained_run / "epoch-02" / "state.json").read_text())["step"] == 10


def test_inference_evaluates_a_csv_and_ends_with_json(trained_run, tiny_dataset, tmp_path):
    result = run_script("inference.py", "--checkpoint", str(trained_run), "--csv", str(tiny_dataset / "test.csv"),
                        "--eval", "--dtype", "float32", "--out", str(tmp_path / "p.csv"), "--render", str(tmp_path / "r"),
                        "--reliability_png", str(tmp_path / "reliability.png"), "--flag_below", "1.0")
    assert result.returncode == 0, result.stderr[-3000:]
    # Below 1.0 every reading is doubtful, each listed with its reasons.
    assert "6 doubtful of 6" in result.stderr and result.stderr.count("is below 1.0") == 6, result.stderr[-3000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["n"] == 6 and {"exact_match", "element_f1", "valid_rate", "by_count", "ece"} <= set(scores)
    assert "expected calibration error of the confidence" in result.stdout and 0 <= scores["ece"] <= 1
    assert Image.open(tmp_path / "reliability.png").size[0] > 100
    assert "epoch-02" in result.stderr  # the run folder's latest epoch
    assert len(list((tmp_path / "r").glob("*.png"))) == 6
    assert (tmp_path / "p.csv").read_text().startswith("image_path,dsl,valid")


def test_inference_on_a_full_disk_says_so_in_one_line_and_leaves_no_file(trained_run, tiny_dataset, full_disk):
    result = run_script("inference.py", "--checkpoint", str(trained_run), "--csv", str(tiny_dataset / "test.csv"),
                        "--dtype", "float32", "--out", str(full_disk / "predictions.csv"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("inference.py: error: the disk is full: could not write")
    assert "Traceback" not in result.stderr and sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_inference_reports_bad_image_paths_and_reads_the_rest(trained_run, tiny_dataset, tmp_path):
    (tmp_path / "notes.png").write_text("no image")
    good = sorted((tiny_dataset / "images").glob("test_*.png"))[0]
    result = run_script("inference.py", "--checkpoint", str(trained_run / "epoch-01"), "--dtype", "float32",
                        str(tmp_path / "missing.png"), str(good), str(tmp_path / "notes.png"))
    assert result.returncode == 1
    assert "missing.png: no such file" in result.stderr and "notes.png: not an image" in result.stderr
    assert "Traceback" not in result.stderr
    assert f"# {good}" in result.stdout and "epoch-01" in result.stderr


def test_inference_with_no_checkpoint_says_so(tiny_dataset, tmp_path):
    result = run_script("inference.py", "--checkpoint", str(tmp_path / "nothing"), "--csv", str(tiny_dataset / "test.csv"))
    assert result.returncode == 2 and "no checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_resume_refuses_a_checkpoint_of_another_model(trained_run, tiny_llm_untied, tiny_clip, tiny_dataset, tmp_path):
    result = run_script("finetune.py", *tiny_args(tiny_llm_untied, tiny_clip, tiny_dataset, tmp_path / "new",
                                                  "--resume", str(trained_run)))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "another model" in result.stderr and "llm:" in result.stderr and "num_shots" in result.stderr


@pytest.mark.parametrize("accumulation, total_steps", [(1, 30), (2, 12)])
def test_killed_run_resumes_on_the_same_trajectory(accumulation, total_steps, tiny_llm, tiny_clip, tiny_dataset,
                                                    tmp_path):
    """Killed at any moment (with accumulation, most moments are inside an optimizer step's
    cycle of micro-batches), the run resumes from its last checkpoint, which lies between
    optimizer steps, and repeats the unfinished step whole: the losses of an unbroken run."""
    args = ("--epochs", "6", "--save_every", "3", "--lora_dropout", "0.1", "--num_shots", "1",
            "--gradient_accumulation_steps", str(accumulation))
    straight = tmp_path / "straight"
    result = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, straight, *args))
    assert result.returncode == 0, result.stderr[-3000:]
    expected = losses(straight)
    assert len(expected) == total_steps

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(ROOT / "finetune.py"),
                                *tiny_args(tiny_llm, tiny_clip, tiny_dataset, killed, *args)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "step-0000003").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before_kill = losses(killed)
    assert 3 <= len(done_before_kill) < total_steps, "the kill came after the run had ended"

    result = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, killed, *args, "--resume", "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    resumed = losses(killed)
    assert [s for s, _ in resumed] == list(range(1, total_steps + 1))
    for (step, loss), (_, reference) in zip(resumed, expected):
        assert loss == pytest.approx(reference, rel=1e-5, abs=1e-6), f"step {step}"


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_whole(trained_run, tmp_path, monkeypatch):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    before = checkpoint.folders(run_dir)[-1]
    reader = model.DiagramReader.from_pretrained(before)
    saved = json.loads((before / "state.json").read_text())

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated crash in the middle of a save)")

    monkeypatch.setattr(torch, "save", crash)  # the adapter and projector are written, then the crash
    with pytest.raises(OSError):
        checkpoint.save(run_dir, "epoch-02", reader, {**saved, "step": 99}, {})
    assert checkpoint.folders(run_dir)[-1] == before
    assert json.loads((before / "state.json").read_text())["step"] == saved["step"]
    assert checkpoint.find(run_dir)[0] == run_dir / "epoch-02"
    model.DiagramReader.from_pretrained(run_dir / "epoch-02")  # still loads
    monkeypatch.undo()
    checkpoint.save(run_dir, "epoch-02", reader, {**saved, "step": 99}, {"x": 1})
    assert json.loads((run_dir / "epoch-02" / "state.json").read_text())["step"] == 99
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]


def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(tiny_llm, tiny_clip, tiny_dataset, tmp_path):
    result = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, tmp_path, "--epochs", "3",
                                                  "--lr", "1e30", "--projector_lr", "1e30", "--save_every", "1",
                                                  "--warmup_steps", "1", "--grad_clip", "0"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if "the loss is" in line][0]
    step = int(message.split("step ")[1].split(":")[0])
    assert step >= 2 and ("nan" in message or "inf" in message)
    assert f"step-{step - 1:07d}" in message  # the last good checkpoint: the step before


def test_ctrl_c_saves_a_step_checkpoint_kept_even_when_none_are(tiny_llm, tiny_clip, tiny_dataset, tmp_path):
    process = subprocess.Popen([sys.executable, str(ROOT / "finetune.py"),
                                *tiny_args(tiny_llm, tiny_clip, tiny_dataset, tmp_path, "--epochs", "50",
                                           "--save_every", "0", "--keep_step_checkpoints", "0",
                                           "--batch_size", "1")],  # ~20 steps an epoch: Ctrl-C lands inside one
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while (not (tmp_path / "log.jsonl").exists() or len(losses(tmp_path)) < 2) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "--resume auto" in stderr and "Traceback" not in stderr
    saved = checkpoint.folders(tmp_path)
    assert saved and saved[-1].name.startswith("step-")  # what --resume auto continues from
    step = json.loads((saved[-1] / "state.json").read_text())["step"]
    assert step == len(losses(tmp_path)) >= 2


def test_resume_refuses_another_seed_naming_it(trained_run, tiny_llm, tiny_clip, tiny_dataset):
    result = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, trained_run, "--epochs", "3",
                                                  "--save_every", "2", "--num_shots", "1", "--seed", "1",
                                                  "--resume", "auto"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("finetune.py: error: cannot resume") and "--seed: 0 there, 1 here" in error
    assert "Resume with the old --seed, or start a new --output_dir" in error
    assert checkpoint.read_state(trained_run / "epoch-02")["data"]["seed"] == 0


def test_a_torn_last_log_line_is_dropped_on_resume_with_one_warning(trained_run, tiny_llm, tiny_clip, tiny_dataset,
                                                                    tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    log = run_dir / "log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    assert "cost" in json.loads(lines[-1])  # the run's end: its cost, written after the last validation
    log.write_text("".join(lines[:-1])[:-20])  # a kill inside the write of the validation at step 10
    result = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, run_dir, "--epochs", "3",
                                                  "--save_every", "2", "--num_shots", "1", "--resume", "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("dropped a torn last line") == 1 and "resuming from" in result.stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 16))
    assert [r["eval"]["step"] for r in records if "eval" in r] == [5, 15]
    assert [r["step"] for r in records if "cost" in r] == [15]  # the resumed run's own, at its end


def test_a_full_disk_during_a_save_is_one_line_and_leaves_the_earlier_checkpoints_whole(
        tiny_llm, tiny_clip, tiny_dataset, tmp_path):
    """A real run whose second checkpoint meets a full disk (torch.save raising ENOSPC)."""
    args = tiny_args(tiny_llm, tiny_clip, tiny_dataset, tmp_path, "--epochs", "2", "--save_every", "0")
    full_disk_on_the_second_save = f"""
import errno, runpy, sys, torch
real_save, calls = torch.save, []
def save(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(*args, **kwargs)
torch.save = save
sys.argv = ["finetune.py", *{args!r}]
runpy.run_path("finetune.py", run_name="__main__")
"""
    result = subprocess.run([sys.executable, "-c", full_disk_on_the_second_save], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert errors[0].startswith("finetune.py: error: the disk is full: could not write") and "epoch-02" in errors[0]
    assert [p.name for p in checkpoint.folders(tmp_path)] == ["epoch-01"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    checkpoint.load_training_state(tmp_path / "epoch-01")
    model.DiagramReader.from_pretrained(tmp_path / "epoch-01")  # whole: it loads


def test_reference_configuration_parses_and_is_wired(tiny_llm_untied, tiny_clip, tiny_dataset, tmp_path):
    config, train = finetune.parse_configs([str(ROOT / "configs/llama3-8b.yaml")])
    assert (config.llm, config.clip_pretrained, train.dtype, train.mixed_precision) == (
        "meta-llama/Llama-3.1-8B", "laion2b_s34b_b79k", "float16", "fp16")
    assert (train.batch_size, train.epochs, train.lr, config.num_shots) == (4, 10, 5e-5, 1)
    assert (config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules) == (
        8, 32, 0.1, ["q_proj", "v_proj"])
    overridden_config, overridden = finetune.parse_configs([str(ROOT / "configs/llama3-8b.yaml"), "--epochs", "2"])
    assert overridden.epochs == 2 and overridden_config.llm == config.llm
    help_text = run_script("finetune.py", str(ROOT / "configs/llama3-8b.yaml"), "--help")
    assert help_text.returncode == 0 and "meta-llama/Llama-3.1-8B" in help_text.stdout
    # The reference path (1 shot, untied embeddings, batch 4) on a tiny Llama; FP16 needs a GPU, so FP32 here.
    result = run_script("finetune.py", str(ROOT / "configs/llama3-8b.yaml"),
                        *tiny_args(tiny_llm_untied, tiny_clip, tiny_dataset, tmp_path, "--epochs", "1",
                                   "--clip_pretrained", "none", "--mixed_precision", "no"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "epoch-01" / "config.json").read_text())["num_shots"] == 1


def test_unknown_key_in_a_config_file_is_an_error(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1e-4\nlearning_rate: 3\n")
    result = run_script("finetune.py", str(tmp_path / "c.yaml"))
    assert result.returncode == 2 and "learning_rate" in result.stderr


def test_offline_wandb_run_holds_the_prediction_table_and_the_checkpoint_artifact(
        tiny_llm, tiny_clip, tiny_dataset, tmp_path):
    result = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, tmp_path, "--epochs", "1",
                                                  "--wandb_mode", "offline"))
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    tables = list(run.glob("files/media/table/**/*.table.json"))
    assert tables, "no prediction table"  # of the 2 validation images (10% of 24)
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["image", "prediction drawn", "predicted", "reference", "exact"]
    assert len(table["data"]) == 2 and all(row[3].startswith("<StartDiagram>") for row in table["data"])
    records = next(run.glob("*.wandb")).read_bytes()
    run_id = run.name.rsplit("-", 1)[1]
    assert f"checkpoint-{run_id}".encode() in records and b"epoch-01" in records  # the artifact, for wandb sync
    assert (tmp_path / "curves.png").stat().st_size > 1000  # offline: the curves as a picture too


def test_best_pointer_names_the_best_validated_checkpoint_and_inference_says_so(trained_run, tiny_dataset):
    scored = {p.name: checkpoint.read_state(p)["validation"] for p in checkpoint.folders(trained_run)}
    assert scored["epoch-01"] and scored["epoch-02"] and scored["step-0000006"] is None
    best = (trained_run / "best").read_text().strip()
    assert best in ("epoch-01", "epoch-02")
    assert scored[best]["exact_match"] == max(s["exact_match"] for s in scored.values() if s)
    folder, why = checkpoint.find(trained_run)
    assert folder.name == best and "best" in why
    result = run_script("inference.py", "--checkpoint", str(trained_run), "--dtype", "float32",
                        str(sorted((tiny_dataset / "images").glob("test_*.png"))[0]))
    assert result.returncode == 0 and f"{best} (the run's best: validation exact match" in result.stderr


def test_check_runs_one_step_and_one_generation_and_estimates_the_run(tiny_llm, tiny_clip, tiny_dataset, tmp_path):
    args = tiny_args(tiny_llm, tiny_clip, tiny_dataset, tmp_path)
    result = run_tool("check", *args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert "threads, flags:" in result.stdout and "training step: batch 4" in result.stdout
    assert lines[-1].startswith("check: ok") and "24 rows" in lines[-1] and "5 steps x" in lines[-1]


def test_check_of_the_reference_configuration_on_a_cpu_says_a_gpu_is_needed():
    result = run_tool("check", str(ROOT / "configs/llama3-8b.yaml"), "--device", "cpu")
    assert result.returncode == 1
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("check: FAILED") and "needs a CUDA GPU" in last and "Traceback" not in result.stderr


def test_benchmark_prints_the_step_share_of_peak_and_generation_speeds(tiny_llm, tiny_clip, tiny_dataset, tmp_path):
    result = run_tool("benchmark", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, tmp_path), "--steps", "2",
                        "--generate_images", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["train_step_gflop"] > 0 and 0 < numbers["train_step_share_of_peak"] < 1.5
    assert numbers["generate_images_per_second_batch1"] > 0 and numbers["generate_batch32_over_batch1"] > 0
    assert numbers["tokens_per_step"] > 4 * 16
    assert 0 < numbers["validation_forward_over_train_step"] < 1.5


def test_robustness_damages_each_way_and_scores_each(trained_run, tiny_dataset, tmp_path):
    import numpy as np
    from PIL import Image

    import damage
    result = run_tool("robustness", "--checkpoint", str(trained_run), "--csv", str(tiny_dataset / "test.csv"),
                        "--num", "3", "--out_dir", str(tmp_path), "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(scores) == list(damage.CHECKS)
    assert all(s["n"] == 3 and s["valid_rate"] == 1.0 for s in scores.values())  # constrained decoding
    clean = np.asarray(Image.open(tmp_path / "clean" / "images" / "00000.png"))
    for kind in damage.CHECKS:
        if kind != "clean":
            damaged = np.asarray(Image.open(tmp_path / kind.replace(" ", "_") / "images" / "00000.png"))
            assert damaged.shape != clean.shape or not np.array_equal(damaged, clean), kind


def test_vision_probe_scores_every_set_and_its_head_learns(tiny_llm, tiny_clip, tiny_dataset, tmp_path):
    import damage

    def probe(epochs):
        result = run_tool("vision_probe", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, tmp_path),
                          "--test_csv", str(tiny_dataset / "test.csv"), "--projector_warmup_epochs", str(epochs),
                          "--projector_warmup_lr", "1e-2")
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    untrained, trained = probe(0), probe(100)
    assert list(trained) == ["training", "validation"] + [f"test: {kind}" for kind in damage.CHECKS]
    assert trained["test: clean"]["n"] == 6 and all(0 <= s["pictures"] <= s["parts"] <= 1 for s in trained.values())
    # The warm-up stage teaches the head: the training pictures' quadrants, learned by heart.
    assert trained["training"]["parts"] > max(0.9, untrained["training"]["parts"])


def test_gradient_accumulation_follows_the_big_batch_trajectory(tiny_llm, tiny_clip, tiny_dataset, tmp_path):
    """Batch 4 x 2 accumulation steps and batch 8 see the same images per optimizer step and,
    each micro-batch weighted by its share of the target tokens, the same gradient: the same
    losses up to float rounding (stated tolerance: rel 1e-4), the same steps and learning rates."""
    common = ("--epochs", "3", "--lora_dropout", "0", "--save_every", "0", "--num_shots", "1")
    big = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, tmp_path / "big", *common,
                                               "--batch_size", "8"))
    accumulated = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, tmp_path / "acc", *common,
                                                       "--batch_size", "4", "--gradient_accumulation_steps", "2"))
    assert big.returncode == 0 and accumulated.returncode == 0, accumulated.stderr[-3000:]
    records = {name: [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
               for name in ("big", "acc")}
    steps = {name: [(r["step"], r["lr"]) for r in rs if "loss" in r and "eval" not in r] for name, rs in records.items()}
    assert steps["big"] == steps["acc"] and len(steps["big"]) == 6  # 22 training images // 8 = 2 steps an epoch
    for (step, loss), (_, reference) in zip(losses(tmp_path / "acc"), losses(tmp_path / "big")):
        assert loss == pytest.approx(reference, rel=1e-4), f"step {step}"


def test_two_processes_train_log_and_checkpoint_once_and_resume(tiny_llm, tiny_clip, tiny_dataset, tmp_path):
    """Data-parallel through accelerate's launcher (torchrun underneath; on CPUs gloo): each
    process takes its share of every step, the main one alone logs, validates and saves."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "finetune.py")]
    args = tiny_args(tiny_llm, tiny_clip, tiny_dataset, tmp_path, "--device", "cpu", "--batch_size", "2")
    first = subprocess.run([*launch, *args, "--epochs", "1"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "5 steps per epoch" in first.stdout  # 22 images // (2 per process x 2 processes)
    resumed = subprocess.run([*launch, *args, "--epochs", "2", "--resume", "auto"], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert [s for s, _ in losses(tmp_path)] == list(range(1, 11))  # each step logged once
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["eval"]["step"] for r in records if "eval" in r] == [5, 10]
    assert sorted(p.name for p in tmp_path.glob("epoch-*")) == ["epoch-01", "epoch-02"]


def test_gradient_checkpointing_recomputes_the_layers_and_keeps_the_gradients(tiny_llm, tiny_clip):
    """With checkpointing, each decoder layer runs twice a step (forward, then again in the
    backward pass) and the gradients are the same."""
    from conftest import tiny_config

    def gradients(checkpointing: bool):
        torch.manual_seed(0)
        reader = finetune.load_model(tiny_config(tiny_llm, tiny_clip, lora_dropout=0.0),  # as finetune.py loads
                                     finetune.TrainConfig(gradient_checkpointing=checkpointing), torch.float32)
        reader.train()
        calls = []
        reader.llm.base_model.model.model.layers[0].input_layernorm.register_forward_pre_hook(
            lambda *_: calls.append(1))  # its first module: the recomputation may stop before the last
        features = torch.randn(2, 1, *reader.vision.feature_shape)
        targets = ["<StartDiagram> <Small> <Square> <TopLeft> <EndDiagram>"] * 2
        reader(**reader.collate(features, [[], []], targets)).backward()
        return len(calls), {n: p.grad.clone() for n, p in reader.named_parameters() if p.grad is not None}

    plain_calls, plain = gradients(False)
    checkpointed_calls, checkpointed = gradients(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)
    assert plain.keys() == checkpointed.keys() and any("lora_A" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_flag_trains_like_the_plain_run(tiny_llm, tiny_clip, tiny_dataset, tmp_path):
    common = ("--epochs", "1", "--save_every", "0", "--lora_dropout", "0")
    plain = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, tmp_path / "plain", *common))
    checkpointed = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, tmp_path / "ckpt", *common,
                                                        "--gradient_checkpointing"))
    assert plain.returncode == 0 and checkpointed.returncode == 0, checkpointed.stderr[-3000:]
    for (step, loss), (_, reference) in zip(losses(tmp_path / "ckpt"), losses(tmp_path / "plain")):
        assert loss == pytest.approx(reference, rel=1e-4), f"step {step}"


def test_load_in_4bit_on_a_cpu_refuses_in_one_line(tiny_llm, tiny_clip, tiny_dataset, tmp_path):
    result = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, tmp_path, "--load_in_4bit"))
    assert result.returncode == 2
    assert "--load_in_4bit (QLoRA) needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr
