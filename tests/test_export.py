"""export.py: a standalone folder that transformers loads and read.py reads without this repo's code,
written whole or not at all, its card scored by read.py itself and naming no local path."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

import checkpoint
import damage
import data
import dsl
import export
import files
import inference
import languages
import looks
import model
import read_exported
from conftest import ROOT
from killing import kill_at_random_points
from model import DiagramReader
from test_finetune import run_script, tiny_args


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def error_lines(stderr):
    return [line for line in stderr.splitlines() if "error" in line.lower()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llm, tiny_clip, tiny_dataset):
    """A tiny one-shot run with image position embeddings, exported with scores for its card."""
    run_dir = tmp_path_factory.mktemp("run")
    result = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, run_dir, "--num_shots", "1",
                                                  "--image_positions", "true"))
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
    assert card.startswith("---\n") and "pipeline_tag: image-text-to-text" in card
    assert "library_name: transformers" in card and "exact match" in card and "measured 20" in card
    assert "read by `read.py`" in card and "follows the DSL's grammar" in card
    config = json.loads((out / "reader_config.json").read_text())
    assert len(config["examples"]) == 1 and (out / config["examples"][0]["image"]).is_file()


def test_the_export_names_no_local_path(exported, tiny_llm, tiny_clip, tiny_dataset, tmp_path_factory):
    """The LLM was a local folder and the CLIP a local config file: the card and reader_config.json
    name them by their names alone, and base_model (a hub id) is left out."""
    run_dir, out = exported
    paths = {str(p) for place in (run_dir, tiny_llm, tiny_clip, tiny_dataset, tmp_path_factory.getbasetemp())
             for p in (Path(place), Path(place).resolve())}
    for file in out.rglob("*"):
        if file.is_file():
            content = file.read_bytes()
            assert not [p for p in paths if p.encode() in content], file
    assert "base_model" not in (out / "README.md").read_text()
    trained_with = json.loads((out / "reader_config.json").read_text())["trained_with"]
    assert trained_with["llm"] == Path(tiny_llm).name and trained_with["clip_model"] == Path(tiny_clip).name
    assert "lora_dropout" not in trained_with  # how training ran is not what the model is


def test_base_model_is_a_hub_id_or_nothing(tmp_path):
    assert export.hub_id("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert export.hub_id("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert export.hub_id(str(tmp_path)) is None and export.hub_id("llama3.1-8b-shape") is None
    assert export.local_name(str(tmp_path / "gone" / "model.gguf")) == "model.gguf"  # moved or not, a path


def readings(output):
    """(picture, DSL) of each `# PICTURE` block that read.py or inference.py printed."""
    blocks = output.split("# ")[1:]
    return [(block.split("\n", 1)[0].split(" (")[0], block.split("\n", 1)[1].strip()) for block in blocks]


def read_both(run_dir, out, pictures, folder):
    """What inference.py (grammar decoding, its default; the model alone, as read.py reads) and the
    export's read.py, run in a folder of its own with nothing of the repo importable, read in the pictures."""
    expected = run_script("inference.py", "--checkpoint", str(run_dir), "--dtype", "float32", "--ink_margin", "0",
                          "--find_canvas", "false", *pictures)
    assert expected.returncode == 0, expected.stderr[-2000:]
    script = folder / "read.py"
    script.write_text((out / "read.py").read_text())
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = run_script(str(script), str(out), *pictures, cwd=folder, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    # read.py, and the grammar.py, looks.py and DSL module it loads from the folder, import no module of the repo.
    for code in (script, out / "grammar.py", out / "looks.py", *(out / "dsl").glob("*.py")):
        imports = [line.split()[1] for line in code.read_text().splitlines() if line.startswith(("import ", "from "))]
        assert {name.split(".")[0] for name in imports} <= {
            "__future__", "json", "re", "sys", "pathlib", "importlib", "functools", "dataclasses", "hashlib",
            "random", "itertools", "collections", "math", "argparse", "open_clip", "torch", "PIL", "numpy",
            "safetensors", "transformers", "xgrammar"}, code
    return readings(result.stdout), readings(expected.stdout)


def test_read_py_reads_like_inference_py_without_the_repo(exported, tiny_dataset, tmp_path):
    """On test.csv, picture by picture; the card's score is read.py's."""
    run_dir, out = exported
    rows = data.read_dataset(tiny_dataset / "test.csv")[0]
    pictures = [str(row.image_path) for row in rows]
    read, expected = read_both(run_dir, out, pictures, tmp_path)
    assert read == expected and [path for path, _ in read] == pictures
    assert all(dsl.is_valid(text) and dsl.canonical(text).strip() == text for _, text in read)
    scores = dsl.score([text for _, text in read], [row.dsl for row in rows])
    assert f"exact match {scores['exact_match']:.4f}" in (out / "README.md").read_text()


def test_read_py_reads_pooled_features_and_text_targets_like_inference_py(tiny_llm, tiny_clip, tiny_dataset,
                                                                          tmp_path):
    """The other paths: CLIP's pooled embedding (every block exported), text written without
    the grammar, and the scanned look (the repo's looks.py, copied into the folder), a sheet on
    a desk among the pictures."""
    run_dir, out = tmp_path / "run", tmp_path / "exported"
    result = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, run_dir, "--image_features",
                                                  "pooled", "--quadrant_loss", "0", "--projector_warmup_epochs", "0",
                                                  "--target_format", "text", "--image_look", "scanned"))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_script("export.py", str(run_dir), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "looks.py").read_text() == (ROOT / "looks.py").read_text()
    pictures = [str(p) for p in sorted((tiny_dataset / "images").glob("test_*.png"))]
    sheet = Image.open(pictures[0]).convert("RGB")
    sheet = damage.on_a_surface(sheet.resize((224, 224)), 0.8, (60, 40, 30))
    assert looks.find_sheet(sheet) is not None
    sheet.save(tmp_path / "sheet.png")
    pictures.append(str(tmp_path / "sheet.png"))
    read, expected = read_both(run_dir, out, pictures, tmp_path)
    assert read == expected and len(read) == len(pictures)


def test_read_py_called_wrong_is_one_line_and_status_2(exported, tmp_path):
    _, out = exported
    script = tmp_path / "read.py"
    script.write_text((out / "read.py").read_text())
    not_a_picture = tmp_path / "notes.png"
    not_a_picture.write_text("not a picture")
    for arguments, said in (((), "usage: python read.py"), ((str(tmp_path), "x.png"), "not a folder that export.py"),
                            ((str(out), str(not_a_picture), str(tmp_path / "gone.png")), "cannot be opened")):
        result = run_script(str(script), *arguments, cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and all(said in line for line in lines), result.stderr[-2000:]
        assert len(lines) == max(1, len(arguments) - 1) and not result.stdout


def test_read_py_reads_the_dsl_with_its_own_module_and_grammar(exported):
    """The export carries the DSL: its module and grammar file as the repo has them, and read.py's
    canonical form is the DSL's, valid or not."""
    _, out = exported
    assert (out / "dsl" / "dsl.py").read_bytes() == (ROOT / "dsl.py").read_bytes()
    assert (out / "dsl" / "diagram.lark").read_bytes() == (ROOT / "grammars" / "diagram.lark").read_bytes()
    assert (out / "grammar.py").read_bytes() == (ROOT / "grammar.py").read_bytes()
    reader, diagram = read_exported.Reader(out), languages.load("diagram")
    texts = ["", "hello", "<StartDiagram><EndDiagram>", "<StartDiagram> <Large> <Circle> <TopLeft>",
             "<StartDiagram>\n<Small> <Square> <BottomRight>\n <Large><Circle><TopLeft>\n<EndDiagram>\n",
             "<StartDiagram><Large><Circle><TopLeft><Small><Square><TopLeft><EndDiagram>",
             "<StartDiagram><Large><Circle><TopLeft><EndDiagram> more", "<StartDiagram><Large><Circle><Top><EndDiagram>",
             "<StartDiagram><Large><TopLeft><Circle><EndDiagram>", "<StartDiagram><Huge><Circle><TopLeft><EndDiagram>",
             "<StartDiagram><Large><Circle><TopLeft><EndDiagram>"]
    for text in texts:
        assert reader.canonical(text) == diagram.canonical_or_raw(text), text


def test_export_refuses_a_folder_that_is_not_empty_and_a_checkpoint_that_is_not_one(exported, tmp_path):
    run_dir, out = exported
    result = run_script("export.py", str(run_dir), str(out))
    assert result.returncode == 2 and "not an empty folder" in result.stderr and "Traceback" not in result.stderr
    result = run_script("export.py", str(tmp_path / "nothing"), str(tmp_path / "new"))
    assert result.returncode == 2 and "no checkpoint at" in result.stderr and not (tmp_path / "new").exists()


def test_a_bad_eval_csv_is_one_line_and_status_2_with_nothing_written(exported, tmp_path):
    run_dir, _ = exported
    bad = tmp_path / "bad.csv"
    bad.write_text("path,text\nx.png,<StartDiagram>\n")
    result = run_script("export.py", str(run_dir), str(tmp_path / "out"), "--eval_csv", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(error_lines(result.stderr)) == 1 and "bad.csv" in error_lines(result.stderr)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]


def test_a_full_disk_is_one_line_and_status_1_with_nothing_left(exported, tmp_path):
    """The projector's write (after the LLM's) finds the disk full."""
    run_dir, _ = exported
    out = tmp_path / "out"
    script = f"""
import errno, runpy, sys
import safetensors.torch
save_file = safetensors.torch.save_file
def full(tensors, filename, *args, **kwargs):
    if str(filename).endswith("projector.safetensors"):
        raise OSError(errno.ENOSPC, "No space left on device")
    return save_file(tensors, filename, *args, **kwargs)
safetensors.torch.save_file = full
sys.argv = ["export.py", {str(run_dir)!r}, {str(out)!r}]
runpy.run_path("export.py", run_name="__main__")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("export.py: error: the disk is full: could not write ")
    assert not list(tmp_path.iterdir())


def test_a_killed_export_leaves_the_whole_export_or_nothing(exported, tiny_dataset, tmp_path):
    """export() killed at 20 random points, in a child forked from a loaded checkpoint: OUT_DIR is
    the whole export or absent (a hidden temporary folder aside), and exporting again works."""
    run_dir, whole = exported
    folder = checkpoint.find(run_dir)[0]
    reader = DiagramReader.from_pretrained(folder, merge_adapter=True)
    state = checkpoint.read_state(folder)
    args = export.Arguments(eval_csv=str(tiny_dataset / "test.csv"))
    rows = data.read_dataset(args.eval_csv)[0]
    out = tmp_path / "reader"
    outcomes = []

    def export_once():
        export.export(reader, state, out, args, rows)

    def write():
        export_once()

    def is_whole():
        config = json.loads((out / "reader_config.json").read_text())
        return listing(out) == listing(whole) and config == json.loads((whole / "reader_config.json").read_text())

    def check(_):
        assert {p.name for p in tmp_path.iterdir()} <= {"reader", files.TEMPORARY + "reader"}
        outcomes.append(out.exists())
        if out.exists():
            assert is_whole()
        elif outcomes.count(False) == 1:  # once, over what the kill left: a new export into the same OUT_DIR
            export_once()
            assert is_whole() and [p.name for p in tmp_path.iterdir()] == ["reader"]

    kill_at_random_points(write, check, kills=20, seed=0, before=lambda: shutil.rmtree(out, ignore_errors=True))
    assert False in outcomes, "some kills should land inside the export"


def test_push_to_hub_offline_is_one_line(exported, tmp_path):
    run_dir, _ = exported
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = run_script("export.py", str(run_dir), str(tmp_path / "out"), "--push_to_hub", "someone/reader",
                        env=environment)
    assert result.returncode == 1 and (tmp_path / "out" / "read.py").is_file()
    assert "a private repository" in result.stdout
    lines = [line for line in result.stderr.splitlines() if "could not upload" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr and "--private" in lines[0]


@pytest.mark.parametrize("private", [True, False])
def test_push_to_hub_says_whether_the_repository_is_private(private, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    class Hub:
        def create_repo(self, repo_id, **options):
            calls.append(("create_repo", repo_id, options))

        def upload_folder(self, **options):
            calls.append(("upload_folder", options["repo_id"], options))

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    assert export.push(tmp_path, "someone/reader", private) == 0
    assert calls[0] == ("create_repo", "someone/reader", {"private": private, "exist_ok": True})
    said = capsys.readouterr().out
    assert f"a {'private' if private else 'public'} repository" in said


def test_reading_from_python_reads_as_inference_py_does(exported, tiny_dataset):
    """From Python: from_pretrained on the run's best pointer, then inference.read."""
    run_dir, _ = exported
    predictions = run_dir / "predictions.csv"
    result = run_script("inference.py", "--checkpoint", str(run_dir), "--dtype", "float32", "--csv",
                        str(tiny_dataset / "test.csv"), "--out", str(predictions))
    assert result.returncode == 0, result.stderr[-2000:]
    with open(predictions, newline="") as f:
        expected = [(row["dsl"], row["confidence"], row["agreement"]) for row in csv.DictReader(f)]
    reader = DiagramReader.from_pretrained(run_dir / "best", merge_adapter=True)
    readings = inference.read(reader, [row.image_path for row in data.read_dataset(tiny_dataset / "test.csv")[0]],
                              batch_size=64)  # inference.py's batch: the same padding, the same numbers
    assert [(r.dsl, f"{r.confidence:.4f}", f"{r.agreement:.2f}") for r in readings] == expected


@pytest.mark.parametrize("kind", model.PROJECTORS)
def test_read_py_projects_as_the_projector_does(kind):
    """read.py's own projector arithmetic against model.Projector, for every kind."""
    torch.manual_seed(0)
    projector = model.Projector(kind, (16, 32), 24, head=(2, 10), positions=True, patch_merge=2)
    for parameter in projector.parameters():
        torch.nn.init.normal_(parameter)  # positions and the norm start at 0 and 1: make them count
    projector.set_feature_statistics(torch.randn(16, 16, 32))
    features = torch.randn(3, 16, 32)  # the encoder's: a 4 x 4 grid of patches, merged 2 x 2 by both
    weights = {k: v for k, v in projector.state_dict().items() if not k.startswith("quadrant_head")}
    with torch.no_grad():
        assert torch.allclose(read_exported.project(features, weights, 2), projector(features), atol=1e-5)
