"""mermaid.py: the flowchart subset's text, its sampler on a grid, its drawing, its grammar and
its plug-in parts."""

import random
import re
import subprocess
import sys

import pytest

import languages
import mermaid
from conftest import ROOT
from mermaid import Chart, Node


def test_the_subset_has_four_shapes_and_at_least_twenty_words():
    assert set(mermaid.SHAPES) == {"box", "rounded", "diamond", "circle"}
    assert len(set(mermaid.LABELS)) == len(mermaid.LABELS) >= 20


def test_sampled_charts_parse_back_to_themselves():
    rng = random.Random(0)
    for _ in range(300):
        chart, cells = mermaid.sample(rng)
        assert mermaid.parse(mermaid.to_text(chart)) == chart
        assert len(cells) == len(chart.nodes) == len(set(cells)) and 2 <= len(chart.nodes) <= mermaid.MAX_NODES


def test_the_text_names_nodes_in_reading_order_and_every_node_has_an_edge():
    rng = random.Random(1)
    for _ in range(300):
        chart, cells = mermaid.sample(rng)
        assert cells == sorted(cells)  # row by row, left to right: node A first
        assert {i for edge in chart.edges for i in edge} == set(range(len(chart.nodes)))


def test_the_direction_can_be_read_off_the_arrows():
    rng = random.Random(2)
    for _ in range(300):
        chart, cells = mermaid.sample(rng)
        steps = [(cells[b][0] - cells[a][0], cells[b][1] - cells[a][1]) for a, b in chart.edges]  # (down, right)
        if chart.direction == "TD":
            assert all(down > 0 and abs(right) <= down for down, right in steps)
            assert any(abs(right) < down for down, right in steps)
        else:
            assert all(right > 0 and abs(down) <= right for down, right in steps)
            assert any(abs(down) < right for down, right in steps)


def test_no_arrow_crosses_another_node_or_arrow():
    rng = random.Random(3)
    for _ in range(300):
        chart, cells = mermaid.sample(rng)
        points = [(c, r) for r, c in cells]
        for a, b in chart.edges:
            for k, centre in enumerate(points):
                if k not in (a, b):
                    assert not mermaid.segment_hits_box(points[a], points[b], centre, mermaid.NODE_HALF)
        for (a, b), (c, d) in zip(chart.edges, chart.edges[1:]):
            assert not mermaid.segments_cross(points[a], points[b], points[c], points[d])


def test_canonical_text_ignores_ids_line_order_and_whitespace():
    written = "flowchart TD\n  start((Start)) --> x{Check}\r\n\n  x --> y[Load]\n  %% a comment\n"
    shuffled = "flowchart   TD\nB[Load]\nA{Check}\nC((Start))\nA-->B\nC --> A"
    assert mermaid.canonical(written) == mermaid.canonical(shuffled) == (
        "flowchart TD\n    A{Check}\n    B[Load]\n    C((Start))\n    A --> B\n    C --> A\n")
    assert mermaid.canonical("flowchart LR\n  A[Load] --> B[Save]") != mermaid.canonical(
        "flowchart TD\n  A[Load] --> B[Save]")


@pytest.mark.parametrize("text", ["", "not a chart", "flowchart TD\nA[Banana]", "flowchart TD\nA[Load] --> B"])
def test_canonical_refuses_text_that_does_not_parse(text):
    with pytest.raises(mermaid.ParseError):
        mermaid.canonical(text)
    assert issubclass(mermaid.ParseError, ValueError) and not languages.load("mermaid").is_valid(text)


@pytest.mark.parametrize("text, says", [
    ("graph TD\nA[Load]", "line 1: expected `flowchart TD`"),
    ("flowchart TD\nA[Banana]", "line 2: 'Banana' is not a label"),
    ("flowchart TD\nA[Load]\nB[Load]\nA --> B", "Load name more than one node"),
    ("flowchart TD\nA[Load] --> B", "B: used but never given a shape"),
    ("flowchart TD\nA[Load", "expected a node"),
    ("flowchart TD\nA[Load}", "the brackets do not match"),
    ("flowchart TD\nA[Load)", "the brackets do not match"),
    ("flowchart TD\nA[Load]\nA --> A", "line 3: an edge from A to itself"),
    ("flowchart TD\nA[Load] --> B[Save]\nA --> B", "line 3: the edge A --> B is given twice"),
    ("flowchart TD\nA[Load]\nA(Load)", "A is declared twice"),
])
def test_bad_text_is_an_error_naming_the_line(text, says):
    with pytest.raises(mermaid.ParseError, match=says):
        mermaid.parse(text)


def test_scores_count_nodes_and_edges_by_their_labels():
    reference = "flowchart TD\nA[Load] --> B{Check}\nB --> C((End))"
    renamed = "flowchart TD\nx{Check} --> y((End))\nz[Load] --> x"
    one_wrong = "flowchart TD\nA[Load] --> B(Check)\nA --> C((End))"  # Check's shape, and one edge
    scores = mermaid.score([renamed, one_wrong, "not a chart"], [reference] * 3)
    assert scores["exact_match"] == pytest.approx(1 / 3) and scores["valid_rate"] == pytest.approx(2 / 3)
    assert scores["node_precision"] == pytest.approx(5 / 6) and scores["node_recall"] == pytest.approx(5 / 9)
    assert scores["edge_precision"] == pytest.approx(3 / 4) and scores["edge_recall"] == pytest.approx(3 / 6)
    # errors by kind: the second reading has the direction, the count and the labels right, not the shapes
    parts = ("direction", "node_count", "labels", "shapes", "nodes", "edges")
    assert [scores[f"{part}_right"] for part in parts] == pytest.approx([2 / 3, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3])


def test_the_drawing_is_a_function_of_chart_cells_style_and_seed():
    chart, cells = mermaid.sample(random.Random(4))
    style = mermaid.random_style(random.Random(5))
    first = mermaid.draw_chart(chart, cells, 224, style, random.Random(6))
    assert first.tobytes() == mermaid.draw_chart(chart, cells, 224, style, random.Random(6)).tobytes()
    assert first.size == (224, 224) and first.getpixel((0, 0)) == style.background
    other = Chart(chart.direction, (Node("Approve", "circle"),) + chart.nodes[1:], chart.edges)
    assert mermaid.draw_chart(other, cells, 224, style, random.Random(6)).tobytes() != first.tobytes()


def test_every_label_fits_inside_its_node_in_every_shape():
    cell = (mermaid.SIZE * (1 - 2 * mermaid.MARGIN)) / mermaid.GRID
    half = (mermaid.NODE_HALF[0] * cell * 0.95, mermaid.NODE_HALF[1] * cell * 0.95)
    for label in mermaid.LABELS:
        for shape in mermaid.SHAPES:
            font = mermaid.fitting_font(label, shape, round(0.2 * cell * 1.15), half, 4)
            assert font.size >= 10 and font.getlength(label) < 2 * half[0], (label, shape, font.size)


# ---------------------------------------------------------------------------- the plug-in's parts

def test_it_is_a_plug_in_with_the_data_hooks():
    language = languages.load("mermaid")
    assert mermaid.NAME == "mermaid" and language.grammar_file.is_file() and language.tokens == ()
    for hook in ("sample", "text_of", "draw", "held_out", "picture", "canonical", "score"):
        assert callable(language.part(hook)), hook


def test_longest_is_the_longest_text_a_sampled_chart_can_have():
    assert mermaid.most_edges() == mermaid.MAX_EDGES
    longest = mermaid.parse(mermaid.LONGEST)
    assert len(longest.nodes) == mermaid.MAX_NODES and len(longest.edges) == mermaid.MAX_EDGES
    rng = random.Random(7)
    texts = [mermaid.text_of(mermaid.sample(rng)) for _ in range(2000)]
    assert max(map(len, texts)) <= len(mermaid.LONGEST)
    assert max(len(mermaid.parse(text).edges) for text in texts) == mermaid.MAX_EDGES  # reached, not only bound


def test_a_fifth_of_charts_are_held_out_by_their_canonical_text():
    rng = random.Random(8)
    texts = [mermaid.text_of(mermaid.sample(rng)) for _ in range(3000)]
    assert 0.17 < sum(map(mermaid.held_out, texts)) / len(texts) < 0.23
    for text in texts[:200]:  # the same chart, its lines in another order and other ids, is decided alike
        lines = text.strip().split("\n")
        renamed = re.sub(r"\b([A-F])\b", lambda m: "n" + m.group(1).lower(), "\n".join([lines[0]] + lines[:0:-1]))
        assert mermaid.held_out(renamed) == mermaid.held_out(text)


def test_the_data_hooks_draw_a_sampled_chart_and_its_text():
    item = mermaid.sample(random.Random(9))
    assert mermaid.text_of(item) == mermaid.to_text(item[0])
    nominal = mermaid.draw(item, 96, random.Random(1), augment=False)
    assert nominal.size == (96, 96) and nominal.getpixel((0, 0)) == mermaid.NOMINAL.background
    assert nominal.tobytes() == mermaid.draw(item, 96, random.Random(2), augment=False).tobytes()
    styled = [mermaid.draw(item, 96, random.Random(seed), augment=True) for seed in range(5)]
    assert len({picture.tobytes() for picture in styled}) == 5
    page = mermaid.picture(mermaid.text_of(item), 128)
    assert page.size == (128, 128) and len(page.getcolors(1 << 16)) > 1


# ---------------------------------------------------------------------------- the grammar

def test_the_grammar_names_the_labels_and_bounds_of_the_module():
    grammar = languages.load("mermaid").grammar_file.read_text()
    assert set(re.findall(r'"(\w+)"', grammar.split("label ::=")[1])) == set(mermaid.LABELS)
    assert f"node{{2,{mermaid.MAX_NODES}}}" in grammar and f"edge{{1,{mermaid.MAX_EDGES}}}" in grammar


def test_the_grammar_accepts_every_sampled_text_token_by_token_and_nothing_broken(smollm2_tokenizer_dir):
    """Over the real SmolLM2 tokenizer, as constrained decoding runs it: each sampled text (stripped),
    then the end-of-text token, ends the grammar; broken texts are refused on the way."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer)).compile_grammar(
        languages.load("mermaid").grammar_file.read_text())

    def accepted(text: str) -> bool:
        matcher = xgr.GrammarMatcher(compiled)
        tokens = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        return all(matcher.accept_token(token) for token in tokens) and matcher.is_terminated()

    rng = random.Random(10)
    texts = [mermaid.text_of(mermaid.sample(rng)).strip() for _ in range(300)] + [mermaid.LONGEST.strip()]
    assert all(map(accepted, texts))
    good = "flowchart TD\n    A[Load]\n    B{Check}\n    A --> B"
    assert accepted(good)
    for broken in (good.replace("Check", "Banana"), good.replace("-->", "--->"), good.replace("flowchart TD", "flowchart"),
                   good + "\n", good.replace("    A[", "  A["), good.replace("A --> B", "A[Load] --> B"),
                   good.replace("flowchart TD\n    A[Load]", "flowchart TD"),  # one node
                   "flowchart LR\n" + "\n".join(f"    {chr(65 + i)}[{w}]" for i, w in enumerate(mermaid.LABELS[:7]))
                   + "\n    A --> B"):  # seven nodes
        assert not accepted(broken), broken


def test_mermaid_py_draws_a_chart_file_and_samples_charts(tmp_path):
    chart = tmp_path / "chart.mmd"
    chart.write_text("flowchart LR\n  A([Start]) --> B\n")
    bad = subprocess.run([sys.executable, str(ROOT / "mermaid.py"), str(chart), "-o", str(tmp_path / "x.png")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("mermaid.py: error:") and "Traceback" not in bad.stderr
    chart.write_text("flowchart LR\n  A((Start)) --> B{Check}\n  B --> C[Load]\n  B --> D[End]\n")
    good = subprocess.run([sys.executable, str(ROOT / "mermaid.py"), str(chart), "-o", str(tmp_path / "x.png")],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "x.png").stat().st_size > 0
    sampled = subprocess.run([sys.executable, str(ROOT / "mermaid.py"), "--sample", "3"], capture_output=True,
                             text=True)
    charts = sampled.stdout.split("flowchart")[1:]
    assert len(charts) == 3 and all(mermaid.parse("flowchart" + text) for text in charts)
