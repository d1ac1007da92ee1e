"""A DSL is a plug-in (languages.py): one the repo has never seen trains and reads through the
public scripts, under its grammar; free text trains and is scored by character error rate."""

import json

import pytest
from PIL import Image

import data
import dsl
import language_model
import languages
from conftest import ROOT
from test_finetune import run_script, tiny_args

# A DSL of a user's own, whole: a grammar file and a canonicaliser, nothing else.
COLOUR_DSL = '''
NAME = "colour"
GRAMMAR = "colour.ebnf"
COLOURS = ("red", "green", "blue")


def canonical(text):
    word = text.strip().lower()
    if word not in COLOURS:
        raise ValueError(f"not a colour: {text!r}")
    return word
'''
COLOUR_GRAMMAR = 'root ::= "red" | "green" | "blue"\n'
RGB = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def colour_dataset(folder, targets) -> str:
    """Pictures filled with a colour; `targets` turns a colour name into its CSV text."""
    (folder / "images").mkdir(parents=True)
    for name, rows in (("data.csv", 24), ("test.csv", 6)):
        lines = []
        for i in range(rows):
            colour = list(RGB)[i % 3]
            Image.new("RGB", (64, 64), RGB[colour]).save(folder / "images" / f"{name[:4]}{i}.png")
            lines.append([f"images/{name[:4]}{i}.png", targets(colour)])
        data.write_csv(folder / name, lines)
    return folder


def train_and_evaluate(tiny_llm, tiny_clip, dataset, run_dir, dsl_name):
    result = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, dataset, run_dir, "--dsl", dsl_name,
                                                  "--quadrant_loss", "0"))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_script("inference.py", "--checkpoint", str(run_dir), "--csv", str(dataset / "test.csv"), "--eval",
                        "--dtype", "float32", "--reliability_png", str(run_dir / "reliability.png"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_dsl_of_your_own_trains_and_reads_under_its_grammar(tmp_path, tiny_llm, tiny_clip):
    (tmp_path / "colour.py").write_text(COLOUR_DSL)
    (tmp_path / "colour.ebnf").write_text(COLOUR_GRAMMAR)
    dataset = colour_dataset(tmp_path / "data", lambda colour: colour)
    run_dir = tmp_path / "run"
    scores = train_and_evaluate(tiny_llm, tiny_clip, dataset, run_dir, str(tmp_path / "colour.py"))
    # A tiny random LLM writes whatever; the grammar lets it write nothing but a colour.
    assert scores["n"] == 6 and scores["valid_rate"] == 1.0
    assert json.loads((run_dir / "epoch-01" / "config.json").read_text())["dsl"] == str(tmp_path / "colour.py")


def test_free_text_trains_and_is_scored_by_character_error_rate(tmp_path, tiny_llm, tiny_clip):
    dataset = colour_dataset(tmp_path / "data", lambda colour: f"a picture all in {colour}")
    scores = train_and_evaluate(tiny_llm, tiny_clip, dataset, tmp_path / "run", "text")
    assert scores["n"] == 6 and {"exact_match", "cer", "valid_rate"} <= set(scores)
    assert 0 <= scores["cer"] and scores["valid_rate"] == 1.0  # any text is valid free text


def test_scores_count_exact_matches_and_character_errors():
    text = languages.load("text")
    scores = text.score(["a red  picture\n", "a blu picture", ""], ["a red picture", "a blue picture", "xy"])
    # Canonical free text: lines stripped at their ends (inner spaces count).
    assert scores["exact_match"] == pytest.approx(0 / 3)
    assert scores["cer"] == pytest.approx((1 + 1 + 2) / (13 + 14 + 2))
    assert languages.edit_distance("kitten", "sitting") == 3 and languages.edit_distance("", "abc") == 3
    diagram = languages.load("diagram")
    scores = diagram.score(["<StartDiagram><Large><Circle><TopLeft><EndDiagram>", "not a diagram"],
                           [dsl.LONGEST, "<StartDiagram> <Small> <Square> <BottomRight> <EndDiagram>"])
    assert scores["valid_rate"] == 0.5 and scores["exact_match"] == 0 and "element_f1" in scores


def test_loading_a_dsl_says_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        languages.load(str(tmp_path / "missing.py"))
    (tmp_path / "half.py").write_text("NAME = 'half'\n")
    with pytest.raises(ValueError, match="canonical"):
        languages.load(str(tmp_path / "half.py"))
    with pytest.raises(ValueError, match="diagram, mermaid, text"):
        languages.load("no_such_dsl_module")


def test_the_diagram_dsl_targets_are_its_tags_one_token_each(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": language_model.new_tokens(dsl.TOKENS)})
    diagram = languages.load("diagram")
    for shape in list(dsl.all_diagrams())[::97]:
        text = dsl.to_text(shape)
        ids = tokenizer(diagram.target(text), add_special_tokens=False).input_ids
        assert ids == tokenizer.convert_tokens_to_ids(dsl.to_tags(shape))


def test_mermaid_trains_exports_and_reads_the_same_in_read_py_and_on_the_page(tmp_path, tiny_llm, tiny_clip):
    """Mermaid by the same code: create_images.py --dsl mermaid, finetune.py, export.py; read.py reads
    the export under the DSL's grammar as inference.py does, and the page draws a reading."""
    import app
    import inference
    from test_export import read_both

    data_dir = tmp_path / "data"
    result = run_script("create_images.py", "--dsl", "mermaid", "--num_samples", "24", "--num_test", "4",
                        "--size", "64", "--out_dir", str(data_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir, out = tmp_path / "run", tmp_path / "export"
    result = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, data_dir, run_dir, "--dsl", "mermaid",
                                                  "--quadrant_loss", "0", "--projector_warmup_epochs", "0"))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_script("export.py", str(run_dir), str(out), "--eval_csv", str(data_dir / "test.csv"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "dsl" / "mermaid.py").is_file() and (out / "dsl" / "mermaid.ebnf").is_file()
    rows = data.read_dataset(data_dir / "test.csv", language=languages.load("mermaid"))[0]
    read, expected = read_both(run_dir, out, [str(row.image_path) for row in rows], tmp_path)
    assert read == expected

    reader = inference.load(run_dir, "cpu", "float32")
    text, drawn, confidence, agreement, verdict = app.read(reader, 0.9, str(rows[0].image_path))
    assert text == read[0][1] and drawn.size == (448, 224) and agreement is None and 0 <= confidence <= 1


def test_the_example_plug_in_is_whole():
    example = languages.load(str(ROOT / "example_dsl.py"))
    assert example.canonical(" Red\n") == "red" and not example.is_valid("purple")
    assert example.grammar_file.is_file() and example.tokens == () and example.part("END") is None


def test_mermaid_s_picture_loss_names_the_nodes_a_picture_shows(tiny_llm, tiny_clip):
    """A DSL whose text does not say where its parts are (Mermaid) teaches the projector which of
    them the picture shows: one balanced binary cross-entropy a class, from the most telling token."""
    import random

    import torch

    import mermaid
    import model
    from conftest import tiny_config

    reader = model.DiagramReader.build(tiny_config(tiny_llm, tiny_clip, dsl="mermaid", quadrant_loss=1.0)).eval()
    rng = random.Random(0)
    texts = [mermaid.text_of(mermaid.sample(rng)) for _ in range(2)]
    features = torch.randn(2, 1, *reader.vision.feature_shape)
    batch = reader.collate(features, [[], []], texts)
    shown = batch["picture_labels"]
    assert shown.shape == (2, mermaid.CONTENT_CLASSES)
    assert shown.sum(1).tolist() == [len(mermaid.parse(t).nodes) for t in texts]  # one class a node
    loss = reader(**batch)
    loss.backward()
    assert torch.isfinite(loss) and reader.projector.quadrant_head.weight.grad.abs().sum() > 0
    without = dict(batch, picture_labels=None)
    assert reader(**without) < loss  # the picture loss adds to the DSL's
