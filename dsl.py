"""The diagram DSL, the repo's first plug-in (languages.py): vocabulary, parser, canonical
formatter, sampler and metrics. One source of truth for everything that reads or writes
diagrams (docs/SPEC.md):

    <StartDiagram>
      <Large> <Circle> <TopLeft>
      <Small> <Triangle> <BottomRight>
    <EndDiagram>

`to_text(parse(text))` is the canonical text. The parser is lenient about
whitespace (spaces, tabs, blank lines, CRLF, line breaks) and about the order of
elements, and strict about everything else; its errors name the line and what
was expected.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations, product
from math import comb

SIZES = ("Large", "Medium", "Small")
SHAPES = ("Circle", "Square", "Triangle")
POSITIONS = ("TopLeft", "TopRight", "BottomLeft", "BottomRight")  # also the canonical line order
# Where things are in a picture (docs/SPEC.md): each position is a quadrant of side q, given as
# its (column, row); each size is the side of an element's bounding box, as a share of q.
QUADRANT_OFFSET = {"TopLeft": (0, 0), "TopRight": (1, 0), "BottomLeft": (0, 1), "BottomRight": (1, 1)}
SIDE_FRACTION = {"Large": 0.80, "Medium": 0.55, "Small": 0.30}
START, END = "<StartDiagram>", "<EndDiagram>"

# The special tokens the language model learns: each tag becomes one token.
DSL_TOKENS = (START, END) + tuple(f"<{name}>" for name in SIZES + SHAPES + POSITIONS)

# The plug-in's declarations (languages.py).
NAME = "diagram"
GRAMMAR = "grammars/diagram.lark"  # the tags the model writes (to_target), in canonical order
TOKENS = DSL_TOKENS
DRAWING = "renderer"  # draw, picture and agreement: renderer.py, which imports this module

MAX_ELEMENTS = len(POSITIONS)
# Diagrams with k elements: choose k of the 4 positions, then a size and a shape for each.
NUM_DIAGRAMS_BY_COUNT = {k: comb(MAX_ELEMENTS, k) * (len(SIZES) * len(SHAPES)) ** k
                         for k in range(1, MAX_ELEMENTS + 1)}
NUM_DIAGRAMS = sum(NUM_DIAGRAMS_BY_COUNT.values())  # 9999


@dataclass(frozen=True, order=True)
class Element:
    size: str
    shape: str
    position: str

    def __post_init__(self):
        for value, allowed in ((self.size, SIZES), (self.shape, SHAPES), (self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Diagram:
    """1 to 4 elements, at most one per position, kept in canonical (position) order."""

    elements: tuple[Element, ...]

    def __post_init__(self):
        elements = tuple(sorted(self.elements, key=lambda e: POSITIONS.index(e.position)))
        if not 1 <= len(elements) <= MAX_ELEMENTS:
            raise ValueError(f"a diagram has 1 to {MAX_ELEMENTS} elements, not {len(elements)}")
        positions = [e.position for e in elements]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two elements at one position: {positions}")
        object.__setattr__(self, "elements", elements)

    def __len__(self):
        return len(self.elements)


class DSLParseError(ValueError):
    """A diagram text that does not parse; `line` is 1-based."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line


# ---------------------------------------------------------------------------- formatting

def to_text(diagram: Diagram) -> str:
    """The canonical text of a diagram."""
    lines = [START] + [f"  <{e.size}> <{e.shape}> <{e.position}>" for e in diagram.elements] + [END]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- parsing

_KIND_OF_TAG = {f"<{name}>": kind for kind, names in
                (("size", SIZES), ("shape", SHAPES), ("position", POSITIONS)) for name in names}
_KIND_OF_TAG.update({START: "start", END: "end"})
_EXPECTED = {
    "size": "a size (" + " ".join(f"<{s}>" for s in SIZES) + ")",
    "shape": "a shape (" + " ".join(f"<{s}>" for s in SHAPES) + ")",
    "position": "a position (" + " ".join(f"<{p}>" for p in POSITIONS) + ")",
}
# A tag, or a run of anything else up to the next tag or whitespace: "<Large><Circle>" is two tokens.
_TOKEN = re.compile(r"<[^<>\s]*>|[^<\s]+|<")


def _tokens(text: str):
    for number, line in enumerate(text.splitlines(), start=1):
        for token in _TOKEN.findall(line):
            yield number, token


def parse(text: str) -> Diagram:
    """Parse diagram text; raise DSLParseError naming the line and what was expected."""
    tokens = list(_tokens(text))
    last_line = max(1, len(text.splitlines()))
    if not tokens:
        raise DSLParseError(1, f"expected {START}, got an empty text")
    line, token = tokens[0]
    if token != START:
        raise DSLParseError(line, f"expected {START}, got {token!r} (text outside the diagram markers)")

    elements: list[Element] = []
    line_of_position: dict[str, int] = {}
    i = 1
    while True:
        if i >= len(tokens):
            raise DSLParseError(last_line, f"expected an element or {END}, got the end of the text")
        line, token = tokens[i]
        if token == END:
            break
        parts = []
        element_line = line
        for kind in ("size", "shape", "position"):
            if i >= len(tokens):
                raise DSLParseError(element_line, f"incomplete element: expected {_EXPECTED[kind]}, "
                                                  "got the end of the text")
            line, token = tokens[i]
            found = _KIND_OF_TAG.get(token)
            if found is None:
                raise DSLParseError(line, f"unknown token {token!r}: expected {_EXPECTED[kind]}")
            if found != kind:
                raise DSLParseError(element_line, f"expected {_EXPECTED[kind]}, got {token} "
                                                  "(an element line is <Size> <Shape> <Position>)")
            parts.append(token[1:-1])
            i += 1
        element = Element(*parts)
        if element.position in line_of_position:
            raise DSLParseError(element_line, f"two elements at <{element.position}> "
                                              f"(the first is on line {line_of_position[element.position]})")
        line_of_position[element.position] = element_line
        elements.append(element)

    if not elements:
        raise DSLParseError(line, f"empty diagram: expected at least one element before {END}")
    if i + 1 < len(tokens):
        extra_line, extra = tokens[i + 1]
        raise DSLParseError(extra_line, f"expected nothing after {END}, got {extra!r} "
                                        "(text outside the diagram markers)")
    return Diagram(tuple(elements))


def parse_or_none(text: str) -> Diagram | None:
    try:
        return parse(text)
    except DSLParseError:
        return None


def is_valid(text: str) -> bool:
    return parse_or_none(text) is not None


def canonical(text: str) -> str:
    """The canonical form of a text; DSLParseError (a ValueError) where it does not parse."""
    return to_text(parse(text))


def to_target(text: str) -> str:
    """What the model writes: the tags alone, no whitespace (14 tokens at most, 27 with it)."""
    return "".join(to_tags(parse(text)))


def to_tags(diagram: Diagram, position_first: bool = False) -> list[str]:
    """The diagram as its tags alone, no whitespace: what the model reads and writes.
    `"".join(to_tags(d))` parses back to d (the parser splits "<Large><Circle>"). With
    `position_first`, each element is written <Position> <Size> <Shape>: a model then says
    where it looks before what it sees there (`from_position_first` restores the DSL's order)."""
    def parts(e: Element):
        return (e.position, e.size, e.shape) if position_first else (e.size, e.shape, e.position)
    return [START] + [f"<{part}>" for e in diagram.elements for part in parts(e)] + [END]


def from_position_first(text: str) -> str:
    """Position-first tags ("<StartDiagram><TopLeft><Large><Circle><EndDiagram>") in the DSL's
    own order; a text that is not complete elements of three tags is returned as it is."""
    tags = re.findall(r"<[^<>\s]*>", text)
    middle = tags[1:-1]
    if len(tags) < 2 or len(middle) % 3:
        return text
    triples = [middle[i:i + 3] for i in range(0, len(middle), 3)]
    return "".join([tags[0], *(t for p, size, shape in triples for t in (size, shape, p)), tags[-1]])


def next_tags(tags: list[str], position_first: bool = False) -> list[str]:
    """The grammar, as the tags that may follow `tags` (a valid prefix of `to_tags` of some
    diagram, in the same order): what constrained decoding allows at each step. Positions
    come in canonical order, so a position must be later than the previous element's, and a
    new element may start only while a later position is still free."""
    if not tags:
        return [START]
    kind = _KIND_OF_TAG.get(tags[-1])
    positions = [POSITIONS.index(t[1:-1]) for t in tags if _KIND_OF_TAG.get(t) == "position"]
    after = positions[-1] + 1 if positions else 0
    sizes, shapes = [f"<{s}>" for s in SIZES], [f"<{s}>" for s in SHAPES]
    free = [f"<{p}>" for p in POSITIONS[after:]]
    if position_first:
        following = {"start": free, "shape": free + [END], "position": sizes, "size": shapes}
    else:
        following = {"start": sizes if free else [], "position": (sizes if free else []) + [END], "size": shapes,
                     "shape": free}
    return following.get(kind, [])  # after <EndDiagram>: nothing


QUADRANT_CLASSES = 1 + len(SIZES) * len(SHAPES)  # empty, or one size-shape pair
REGION_GRID, REGION_CLASSES = 2, QUADRANT_CLASSES  # the projector's auxiliary loss: what each quadrant holds


def regions(text: str) -> list[int]:
    return quadrant_classes(parse(text))


def quadrant_classes(diagram: Diagram) -> list[int]:
    """What each quadrant holds, in POSITIONS order, as a class: 0 empty, else 1 + the index
    of its (size, shape) pair. Labels of model.py's quadrant loss."""
    by_position = {e.position: e for e in diagram.elements}
    return [0 if p not in by_position
            else 1 + SIZES.index(by_position[p].size) * len(SHAPES) + SHAPES.index(by_position[p].shape)
            for p in POSITIONS]


# ---------------------------------------------------------------------------- sampling

def sample_diagram(rng: random.Random, num_elements: int | None = None) -> Diagram:
    """A random diagram: element count uniform in 1..4 (unless given), then uniform positions,
    sizes and shapes, so small diagrams are as common as full ones."""
    k = num_elements or rng.randint(1, MAX_ELEMENTS)
    positions = rng.sample(POSITIONS, k)
    return Diagram(tuple(Element(rng.choice(SIZES), rng.choice(SHAPES), p) for p in positions))


def all_diagrams():
    """Every one of the NUM_DIAGRAMS diagrams, in a fixed order."""
    for k in range(1, MAX_ELEMENTS + 1):
        for positions in combinations(POSITIONS, k):
            for looks in product(product(SIZES, SHAPES), repeat=k):
                yield Diagram(tuple(Element(size, shape, position)
                                    for (size, shape), position in zip(looks, positions)))


# Every tag is one token, so all four-element diagrams are equally long: the longest.
LONGEST = to_text(Diagram(tuple(Element("Large", "Circle", p) for p in POSITIONS)))

HELD_OUT_SHARE = 0.2  # of each element count's diagrams, kept for test sets alone


@functools.cache
def held_out_diagrams() -> frozenset[Diagram]:
    """The diagrams that only test sets show (docs/SPEC.md's data files), whatever the seed
    or the test set's size: of each element count, the fifth whose canonical text has the
    smallest SHA-256. Ranked within each count because a hash alone (modulo 5) would keep 13
    of the 36 one-element diagrams from training, not 7."""
    by_count = defaultdict(list)
    for diagram in all_diagrams():
        by_count[len(diagram)].append(diagram)
    held_out = set()
    for diagrams in by_count.values():
        diagrams.sort(key=lambda diagram: hashlib.sha256(to_text(diagram).encode("utf-8")).digest())
        held_out.update(diagrams[:round(len(diagrams) * HELD_OUT_SHARE)])
    return frozenset(held_out)


def held_out(text: str) -> bool:
    return parse(text) in held_out_diagrams()


# What create_images.py samples; renderer.py (DRAWING) draws the pictures and compares them.

def sample(rng: random.Random) -> Diagram:
    return sample_diagram(rng)


def text_of(diagram: Diagram) -> str:
    return to_text(diagram)


# ---------------------------------------------------------------------------- metrics


def _scores(pairs) -> dict:
    """pairs: (predicted Diagram or None, reference Diagram)."""
    n = len(pairs)
    exact = valid = true_positives = predicted_count = reference_count = 0
    for predicted, reference in pairs:
        reference_set = set(reference.elements)
        predicted_set = set(predicted.elements) if predicted is not None else set()
        valid += predicted is not None
        exact += predicted == reference
        true_positives += len(predicted_set & reference_set)
        predicted_count += len(predicted_set)
        reference_count += len(reference_set)
    precision = true_positives / predicted_count if predicted_count else 0.0
    recall = true_positives / reference_count if reference_count else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "exact_match": exact / n if n else 0.0,
        "element_precision": precision,
        "element_recall": recall,
        "element_f1": f1,
        "valid_rate": valid / n if n else 0.0,
    }


def score(predictions: list[str], references: list[str]) -> dict:
    """SPEC's metrics for raw model outputs against reference DSL texts.

    Element precision/recall/F1 are micro-averaged over (size, shape, position)
    triples; an output that does not parse counts as predicting no elements.
    Returns the overall scores plus `by_count`: the same scores per number of
    elements in the reference (1, 2, 3, 4).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    pairs = [(parse_or_none(p), parse(r)) for p, r in zip(predictions, references)]
    by_count = defaultdict(list)
    for pair in pairs:
        by_count[len(pair[1])].append(pair)
    result = _scores(pairs)
    result["by_count"] = {k: _scores(by_count[k]) for k in sorted(by_count)}
    return result
