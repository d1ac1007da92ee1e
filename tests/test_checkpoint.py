"""checkpoint.py and the run log on a tiny model: a checkpoint is whole or absent whenever
the save is killed, a training state holds only what loads without running code, and a
resume on another split of the data is refused."""

import json
import random
import shutil

import numpy as np
import pytest
import torch

import checkpoint
import files
import model
import tracking
from conftest import tiny_config
from killing import kill_at_random_points

OLD_STATE = {"step": 5, "minutes": 1.0, "validation": {"exact_match": 0.5}, "version": "old"}
NEW_STATE = {**OLD_STATE, "version": "new"}
RESUME_STATE = {"optimizer": {"state": {0: {"exp_avg": torch.ones(4)}}}, "rng": {"torch": torch.get_rng_state()}}


def snapshot(folder):
    """Every file of a checkpoint, by its path inside it: two equal snapshots are the same checkpoint."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((files.TEMPORARY, files.OLD)))


@pytest.fixture(scope="module")
def reader(tiny_llm, tiny_clip):
    torch.manual_seed(0)
    return model.DiagramReader.build(tiny_config(tiny_llm, tiny_clip))


@pytest.fixture(scope="module")
def data_csv(tiny_dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("csv") / "data.csv"
    shutil.copy(tiny_dataset / "data.csv", path)
    return path


@pytest.fixture(scope="module")
def saved_run(reader, data_csv, tmp_path_factory):
    """A run folder holding epoch-01 (step 5, the best) and step-0000003, with the whole new
    epoch-01 kept aside for comparison."""
    data = checkpoint.data_identity(data_csv, seed=0)
    run_dir = tmp_path_factory.mktemp("saved_run") / "run"
    new = tmp_path_factory.mktemp("new") / "run"
    checkpoint.save(new, "epoch-01", reader, {**NEW_STATE, "data": data}, RESUME_STATE)
    checkpoint.save(run_dir, "step-0000003", reader, {**OLD_STATE, "step": 3, "validation": None, "data": data},
                    RESUME_STATE)
    checkpoint.save(run_dir, "epoch-01", reader, {**OLD_STATE, "data": data}, RESUME_STATE)
    return run_dir, new / "epoch-01", data


def test_a_killed_save_leaves_the_old_checkpoint_or_the_new_one(saved_run, reader, tmp_path):
    template, new, data = saved_run
    run_dir = tmp_path / "run"
    old, new = snapshot(template / "epoch-01"), snapshot(new)
    seen = set()

    def lay_old():
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(template, run_dir)

    def write():
        checkpoint.save(run_dir, "epoch-01", reader, {**NEW_STATE, "data": data}, RESUME_STATE)

    def check(_):
        found, _ = checkpoint.find(run_dir)  # tidies the folder first
        assert found == run_dir / "epoch-01" and snapshot(found) in (old, new)
        assert checkpoint.resume_point(str(run_dir), "auto", reader.config, data) == found
        assert not leftovers(run_dir)
        assert snapshot(run_dir / "step-0000003") == snapshot(template / "step-0000003")
        seen.add(checkpoint.read_state(found)["version"])

    kill_at_random_points(write, check, kills=20, seed=3, before=lay_old)
    assert seen == {"old", "new"}, "the kills should land both before and after the rename"


def test_a_kill_between_the_two_renames_is_put_back(saved_run, tmp_path):
    template, _, data = saved_run
    run_dir = tmp_path / "run"
    shutil.copytree(template, run_dir)
    (run_dir / "epoch-01").rename(run_dir / ".old-epoch-01")  # the old one moved aside, the new one not yet in
    (run_dir / ".tmp-step-0000009").mkdir()  # and a half-written save
    assert checkpoint.folders(run_dir) == [run_dir / "step-0000003"]
    assert checkpoint.find(run_dir)[0] == run_dir / "epoch-01"
    assert not leftovers(run_dir)


def test_a_held_run_folder_is_not_tidied_by_a_reader(saved_run, tmp_path):
    template, _, _ = saved_run
    run_dir = tmp_path / "run"
    shutil.copytree(template, run_dir)
    lock = checkpoint.hold(run_dir)
    (run_dir / ".tmp-step-0000009").mkdir()  # the save in progress of the run that holds it
    checkpoint.find(run_dir)
    assert leftovers(run_dir) == [".tmp-step-0000009"]
    lock.close()
    checkpoint.find(run_dir)
    assert not leftovers(run_dir)


def test_keeping_no_step_checkpoints_keeps_the_latest_checkpoint(saved_run, reader, tmp_path):
    template, _, data = saved_run
    run_dir = tmp_path / "run"
    shutil.copytree(template, run_dir)
    interrupted = {**OLD_STATE, "step": 7, "validation": None, "data": data}
    checkpoint.save(run_dir, "step-0000007", reader, interrupted, {})  # a Ctrl-C's
    checkpoint.prune(run_dir, 0)
    assert [p.name for p in checkpoint.folders(run_dir)] == ["epoch-01", "step-0000007"]  # step 3 went
    checkpoint.save(run_dir, "epoch-02", reader, {**interrupted, "step": 10}, {})
    checkpoint.prune(run_dir, 0)
    assert [p.name for p in checkpoint.folders(run_dir)] == ["epoch-01", "epoch-02"]
    assert not leftovers(run_dir)


def test_random_states_survive_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # numpy caches a second gaussian: part of its state
    torch.save({"rng": checkpoint.rng_states()}, tmp_path / "training_state.pt")
    expected = random.random(), np.random.normal(), np.random.randint(1 << 30), torch.rand(3)
    checkpoint.set_rng_states(checkpoint.load_training_state(tmp_path)["rng"])
    again = random.random(), np.random.normal(), np.random.randint(1 << 30), torch.rand(3)
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])


class Smuggled:
    """An object whose unpickling would run code: here, create a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_training_state_that_smuggles_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"optimizer": {}, "rng": Smuggled(marker)}, tmp_path / "training_state.pt")
    with pytest.raises(checkpoint.CheckpointError, match="refused: it holds io.open, and loading that could run code"):
        checkpoint.load_training_state(tmp_path)
    assert not marker.exists()
    torch.load(tmp_path / "training_state.pt", weights_only=False)  # what the refusal prevents
    assert marker.exists()


def test_a_training_state_of_an_older_save_is_refused_saying_why(tmp_path):
    torch.save({"rng": {"numpy": np.random.get_state()}}, tmp_path / "training_state.pt")  # numpy arrays
    with pytest.raises(checkpoint.CheckpointError) as refused:
        checkpoint.load_training_state(tmp_path)
    message = str(refused.value)
    assert "numpy" in message and "start a new --output_dir" in message and "\n" not in message


@pytest.mark.parametrize("change, named", [("seed", "--seed"), ("data_csv", "--data_csv"),
                                           ("content", "--data_csv content (SHA-256)")])
def test_resume_refuses_another_split_of_the_data(change, named, saved_run, reader, data_csv, tmp_path):
    template, _, data = saved_run
    if change == "seed":
        here = checkpoint.data_identity(data_csv, seed=1)
    elif change == "data_csv":
        shutil.copy(data_csv, tmp_path / "data.csv")  # the same rows, but their images are looked up elsewhere
        here = checkpoint.data_identity(tmp_path / "data.csv", seed=0)
    else:
        (tmp_path / "data.csv").write_text(data_csv.read_text() + data_csv.read_text().splitlines()[1] + "\n")
        here = {**checkpoint.data_identity(tmp_path / "data.csv", seed=0), "data_csv": data["data_csv"]}
    with pytest.raises(checkpoint.CheckpointError) as refused:
        checkpoint.resume_point(str(template), "auto", reader.config, here)
    message = str(refused.value)
    assert f"{named}: " in message and "another split of the data" in message
    assert f"Resume with the old {named.split()[0]}, or start a new --output_dir" in message
    assert checkpoint.resume_point(str(template), "auto", reader.config, data) == template / "epoch-01"


def test_a_killed_log_writer_leaves_a_prefix_of_its_records(tmp_path):
    log = tracking.LogFile(tmp_path / "log.jsonl")
    records = [{"step": i, "loss": 1 / (i + 1), "note": "x" * 2000} for i in range(300)]

    def write():
        for record in records:
            log.append(record)

    def check(_):
        written = log.records()  # a torn last line dropped with a warning; any other bad line raises
        assert written == records[:len(written)]

    kill_at_random_points(write, check, kills=20, seed=4, before=lambda: files.write_text(log.path, ""))


def test_a_torn_last_log_line_is_dropped_when_the_log_is_cut_back(tmp_path, capsys):
    log = tracking.LogFile(tmp_path / "log.jsonl")
    for step in range(1, 4):
        log.append({"step": step, "loss": 1.0})
    log.append({"eval": {"step": 3, "loss": 1.0}})
    log.path.write_text(log.path.read_text()[:-10])  # a kill inside the last write
    log.keep_until(2)
    assert capsys.readouterr().err.count("dropped a torn last line") == 1
    assert [json.loads(line) for line in log.path.read_text().splitlines()] == [{"step": 1, "loss": 1.0},
                                                                                  {"step": 2, "loss": 1.0}]
