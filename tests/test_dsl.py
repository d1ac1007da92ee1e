"""The DSL contract of docs/SPEC.md: canonical text, lenient whitespace, strict content, metrics."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dsl

ALL = list(dsl.all_diagrams())
diagrams = st.sampled_from(ALL)
blank = st.text(alphabet=" \t", max_size=3)


def test_vocabulary_and_counts():
    assert len(dsl.DSL_TOKENS) == 12 and len(set(dsl.DSL_TOKENS)) == 12
    assert len(ALL) == len(set(ALL)) == dsl.NUM_DIAGRAMS == 9999


def test_every_diagram_round_trips():
    for diagram in ALL:
        text = dsl.to_text(diagram)
        assert dsl.parse(text) == diagram
        assert dsl.to_text(dsl.parse(text)) == text


def test_canonical_text_matches_spec():
    diagram = dsl.Diagram((dsl.Element("Small", "Triangle", "BottomLeft"),
                           dsl.Element("Medium", "Square", "TopRight"),
                           dsl.Element("Large", "Circle", "TopLeft")))
    assert dsl.to_text(diagram) == ("<StartDiagram>\n"
                                   "  <Large> <Circle> <TopLeft>\n"
                                   "  <Medium> <Square> <TopRight>\n"
                                   "  <Small> <Triangle> <BottomLeft>\n"
                                   "<EndDiagram>\n")


@given(diagrams, st.randoms(use_true_random=False), blank, blank, st.sampled_from(["\n", "\r\n", "\n\n", "\n \t\n"]))
def test_parser_is_lenient_about_whitespace_and_order(diagram, rnd, indent, gap, newline):
    lines = [f"{indent}<{e.size}>{gap} <{e.shape}>\t<{e.position}>{gap}" for e in diagram.elements]
    rnd.shuffle(lines)
    text = newline.join([gap + dsl.START] + lines + [dsl.END + gap])
    assert dsl.parse(text) == diagram
    assert dsl.to_text(dsl.parse(text)) == dsl.to_text(diagram)


BAD_LINES = {
    "unknown token": "  <Huge> <Circle> <TopLeft>",
    "unknown shape": "  <Large> <Hexagon> <TopLeft>",
    "missing position": "  <Large> <Circle>",
    "missing size": "  <Circle> <TopLeft>",
    "loose text": "  a circle",
}


@settings(max_examples=60)
@given(diagrams, st.sampled_from(sorted(BAD_LINES)), st.data())
def test_parser_names_the_line_of_a_bad_element(diagram, kind, data):
    lines = dsl.to_text(diagram).splitlines()
    where = data.draw(st.integers(1, len(lines) - 1), label="insert before line")
    lines.insert(where, BAD_LINES[kind])
    with pytest.raises(dsl.DSLParseError) as error:
        dsl.parse("\n".join(lines) + "\n")
    assert error.value.line == where + 1
    assert str(error.value).startswith(f"line {where + 1}: ")
    assert "expected" in str(error.value)


@given(diagrams)
def test_two_elements_at_one_position_is_an_error(diagram):
    lines = dsl.to_text(diagram).splitlines()
    first = diagram.elements[0]
    lines.insert(len(lines) - 1, f"  <Small> <Square> <{first.position}>")
    with pytest.raises(dsl.DSLParseError, match=rf"line {len(lines) - 1}: two elements at <{first.position}>"):
        dsl.parse("\n".join(lines))


@pytest.mark.parametrize("text, line, message", [
    ("", 1, "expected <StartDiagram>"),
    ("<StartDiagram>\n<EndDiagram>\n", 2, "empty diagram"),
    ("Here it is:\n<StartDiagram>\n  <Large> <Circle> <TopLeft>\n<EndDiagram>\n", 1, "expected <StartDiagram>"),
    ("<StartDiagram>\n  <Large> <Circle> <TopLeft>\n<EndDiagram>\nDone.\n", 4, "nothing after <EndDiagram>"),
    ("<StartDiagram>\n  <Large> <Circle> <TopLeft>\n", 2, "expected an element or <EndDiagram>"),
    ("<StartDiagram>\n  <Large> <Circle> <TopLeft>\n  <Small>\n", 3, "incomplete element"),
])
def test_parser_rejects_text_outside_markers_and_empty_diagrams(text, line, message):
    with pytest.raises(dsl.DSLParseError, match=message) as error:
        dsl.parse(text)
    assert error.value.line == line


def test_tags_need_no_spaces_between_them():
    assert dsl.parse("<StartDiagram><Large><Circle><TopLeft><EndDiagram>") == dsl.Diagram(
        (dsl.Element("Large", "Circle", "TopLeft"),))


def test_quadrant_classes_name_each_quadrant_empty_or_its_size_and_shape():
    pairs = [(size, shape) for size in dsl.SIZES for shape in dsl.SHAPES]
    classes = {dsl.quadrant_classes(dsl.Diagram((dsl.Element(size, shape, "TopRight"),)))[1] for size, shape in pairs}
    assert classes == set(range(1, dsl.QUADRANT_CLASSES))  # one class for each pair
    diagram = dsl.parse("<StartDiagram><Small><Triangle><TopRight><Large><Circle><BottomRight><EndDiagram>")
    labels = dsl.quadrant_classes(diagram)
    assert labels[0] == labels[2] == 0  # TopLeft and BottomLeft are empty
    assert labels[1] == 1 + pairs.index(("Small", "Triangle")) and labels[3] == 1 + pairs.index(("Large", "Circle"))


def test_sampler_covers_every_element_count():
    rng = random.Random(0)
    counts = {len(dsl.sample_diagram(rng)) for _ in range(200)}
    assert counts == {1, 2, 3, 4}


def test_metrics():
    reference = dsl.to_text(dsl.Diagram((dsl.Element("Large", "Circle", "TopLeft"),
                                        dsl.Element("Small", "Square", "BottomRight"))))
    one_wrong = reference.replace("<Small> <Square>", "<Small> <Triangle>")
    single = dsl.to_text(dsl.Diagram((dsl.Element("Medium", "Triangle", "TopRight"),)))
    scores = dsl.score([reference, one_wrong, "not a diagram", single], [reference, reference, reference, single])
    assert scores["n"] == 4
    assert scores["exact_match"] == 0.5
    assert scores["valid_rate"] == 0.75
    # true positives 2 + 1 + 0 + 1 = 4; predicted 2 + 2 + 0 + 1 = 5; reference 2 + 2 + 2 + 1 = 7
    assert scores["element_precision"] == pytest.approx(4 / 5)
    assert scores["element_recall"] == pytest.approx(4 / 7)
    assert scores["element_f1"] == pytest.approx(2 * (4 / 5) * (4 / 7) / (4 / 5 + 4 / 7))
    assert sorted(scores["by_count"]) == [1, 2]
    assert scores["by_count"][1]["exact_match"] == 1.0
    assert scores["by_count"][2]["n"] == 3 and scores["by_count"][2]["exact_match"] == pytest.approx(1 / 3)


def test_the_grammar_accepts_every_diagram_tag_by_tag():
    for diagram in dsl.all_diagrams():
        tags = dsl.to_tags(diagram)
        for i, tag in enumerate(tags):
            assert tag in dsl.next_tags(tags[:i]), (tags, i)
        assert dsl.next_tags(tags) == []
        assert dsl.parse("".join(tags)) == diagram


def test_any_walk_through_the_grammar_is_a_valid_diagram():
    rng = random.Random(0)
    seen = set()
    for _ in range(2000):
        tags = []
        while allowed := dsl.next_tags(tags):
            tags.append(rng.choice(allowed))
        seen.add(dsl.parse("".join(tags)))  # raises if the grammar let an invalid text through
    assert len(seen) > 500  # many different diagrams, not one path


def test_the_position_first_grammar_accepts_every_diagram_and_reads_back_in_order():
    for diagram in dsl.all_diagrams():
        tags = dsl.to_tags(diagram, position_first=True)
        for i, tag in enumerate(tags):
            assert tag in dsl.next_tags(tags[:i], position_first=True), (tags, i)
        assert dsl.next_tags(tags, position_first=True) == []
        assert dsl.parse(dsl.from_position_first("".join(tags))) == diagram


def test_any_walk_through_the_position_first_grammar_is_a_valid_diagram():
    rng = random.Random(1)
    for _ in range(1000):
        tags = []
        while allowed := dsl.next_tags(tags, position_first=True):
            tags.append(rng.choice(allowed))
        dsl.parse(dsl.from_position_first("".join(tags)))  # raises if the grammar let an invalid text through
    assert dsl.from_position_first("<StartDiagram><TopLeft><Large>") == "<StartDiagram><TopLeft><Large>"  # left as is
