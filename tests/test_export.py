"""export.py: a standalone folder that transformers loads and read.py reads without this repo's code."""

import csv
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import data
import dsl
import model
import read_exported
from model import DiagramReader
from test_finetune import run_script, tiny_args


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llm, tiny_clip, tiny_dataset):
    """A tiny one-shot run with image position embeddings and position-first targets, exported
    with scores for its card."""
    run_dir = tmp_path_factory.mktemp("run")
    result = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, run_dir, "--num_shots", "1",
                                                  "--image_positions", "true",
                                                  "--target_format", "tags_position_first"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path_factory.mktemp("export") / "reader"
    result = run_script("export.py", str(run_dir), str(out), "--eval_csv", str(tiny_dataset / "test.csv"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, out


def test_the_llm_loads_with_transformers_alone_with_the_dsl_tokens(exported):
    _, out = exported
    llm = AutoModelForCausalLM.from_pretrained(out / "llm")
    tokenizer = AutoTokenizer.from_pretrained(out / "llm")
    assert llm.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert all(len(tokenizer(tag, add_special_tokens=False).input_ids) == 1 for tag in dsl.DSL_TOKENS)
    assert list((out / "llm").glob("*.safetensors")) and not list(out.rglob("adapter_config.json"))


def test_the_card_has_hub_front_matter_and_the_measured_scores(exported):
    _, out = exported
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: image-text-to-text" in card and "base_model:" in card
    assert "library_name: transformers" in card and "exact match" in card and "measured 20" in card
    config = json.loads((out / "reader_config.json").read_text())
    assert len(config["examples"]) == 1 and (out / config["examples"][0]["image"]).is_file()


def test_read_py_reads_like_inference_py_without_the_repo(exported, tiny_dataset, tmp_path):
    run_dir, out = exported
    pictures = [str(p) for p in sorted((tiny_dataset / "images").glob("test_*.png"))]
    expected = run_script("inference.py", "--checkpoint", str(run_dir), "--dtype", "float32", "--constrained",
                          "false", *pictures)
    assert expected.returncode == 0, expected.stderr[-2000:]
    # In a folder of its own, with nothing of the repo importable: only the five libraries.
    script = tmp_path / "read.py"
    script.write_text((out / "read.py").read_text())
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = run_script(str(script), str(out), *pictures, cwd=tmp_path, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    imports = [line.split()[1] for line in script.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert {name.split(".")[0] for name in imports} <= {"json", "re", "sys", "pathlib", "open_clip", "torch", "PIL",
                                                        "safetensors", "transformers"}

    def readings(output):
        blocks = output.split("# ")[1:]
        return {block.split("\n", 1)[0].split(" (")[0]: dsl.canonical(block.split("\n", 1)[1]).strip() for block in blocks}

    assert readings(result.stdout) == readings(expected.stdout)
    assert len(readings(result.stdout)) == len(pictures)


def test_export_refuses_a_folder_that_is_not_empty_and_a_checkpoint_that_is_not_one(exported, tmp_path):
    run_dir, out = exported
    result = run_script("export.py", str(run_dir), str(out))
    assert result.returncode == 2 and "not an empty folder" in result.stderr and "Traceback" not in result.stderr
    result = run_script("export.py", str(tmp_path / "nothing"), str(tmp_path / "new"))
    assert result.returncode == 2 and "no checkpoint at" in result.stderr and not (tmp_path / "new").exists()


def test_push_to_hub_offline_is_one_line(exported, tmp_path):
    run_dir, _ = exported
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = run_script("export.py", str(run_dir), str(tmp_path / "out"), "--push_to_hub", "someone/reader",
                        env=environment)
    assert result.returncode == 1 and (tmp_path / "out" / "read.py").is_file()
    lines = [line for line in result.stderr.splitlines() if "could not upload" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr


def test_read_images_from_python_reads_as_inference_py_does(exported, tiny_dataset):
    """The README's three lines: from_pretrained on the run's best pointer, then read_images."""
    run_dir, _ = exported
    predictions = run_dir / "predictions.csv"
    result = run_script("inference.py", "--checkpoint", str(run_dir), "--dtype", "float32", "--csv",
                        str(tiny_dataset / "test.csv"), "--out", str(predictions))
    assert result.returncode == 0, result.stderr[-2000:]
    with open(predictions, newline="") as f:
        expected = [(row["dsl"], row["confidence"], row["agreement"]) for row in csv.DictReader(f)]
    reader = DiagramReader.from_pretrained(run_dir / "best", merge=True)
    readings = reader.read_images([row.image_path for row in data.read_dataset(tiny_dataset / "test.csv")[0]],
                                  batch_size=64)  # inference.py's batch: the same padding, the same numbers
    assert [(r.dsl, f"{r.confidence:.4f}", f"{r.agreement:.2f}") for r in readings] == expected


@pytest.mark.parametrize("kind", model.PROJECTORS)
def test_read_py_projects_as_the_projector_does(kind):
    """read.py's own projector arithmetic against model.Projector, for every kind."""
    torch.manual_seed(0)
    projector = model.Projector(kind, (4, 4 * 32), 24, quadrant_head=True, positions=True, patches_per_token=4)
    for parameter in projector.parameters():
        torch.nn.init.normal_(parameter)  # positions and the norm start at 0 and 1: make them count
    projector.set_feature_statistics(torch.randn(16, 4, 4 * 32))
    features = torch.randn(4, 4 * 32)
    weights = {k: v for k, v in projector.state_dict().items() if not k.startswith("quadrant_head")}
    with torch.no_grad():
        assert torch.allclose(read_exported.project(features, weights), projector(features[None])[0], atol=1e-5)
