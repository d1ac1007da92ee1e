"""Mermaid flowcharts, a subset people write: its text (parse, canonical form, scores), a sampler
of charts laid out on a grid, and a drawing of them with PIL.

    flowchart TD
        A[Load]
        B{Check}
        C((End))
        A --> B
        B --> C

    python mermaid.py chart.mmd -o chart.png [--size 288]    # draw a chart file
    python mermaid.py --sample 3 --seed 0                     # print sampled charts

The subset (docs/SPEC.md says it in full): `flowchart TD` or
`flowchart LR`; nodes with a box `[...]`, rounded `(...)`, diamond `{...}` or circle
`((...))`, each labelled with one word of LABELS, no word twice; directed edges `-->`.
Ids are not drawn, so two texts that differ only in ids or line order are the same chart:
`canonical` names the nodes A, B, C, ... in the order of their labels and sorts the lines.

A sampled chart sits on a 3 x 3 grid and the picture shows that grid's order: the text
names its nodes A, B, C, ... row by row, left to right, as a reader meets them. In a TD
chart every edge goes down, no more sideways than down, and at least one goes more down
than sideways; an LR chart is the same turned (right, and more right than up or down), so
the direction can be read off the arrows. No arrow crosses another node or another arrow.

As a plug-in (languages.py) it declares NAME, GRAMMAR and LONGEST, and create_images.py's hooks:
sample, text_of, draw, held_out; picture draws a chart from its text alone.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import math
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LABELS = ("Start", "End", "Load", "Save", "Check", "Retry", "Parse", "Send", "Wait", "Stop", "Done", "Error",
          "Input", "Output", "Read", "Write", "Login", "Fetch", "Build", "Test", "Deploy", "Review", "Approve",
          "Reject")
SHAPES = {"box": ("[", "]"), "rounded": ("(", ")"), "diamond": ("{", "}"), "circle": ("((", "))")}
DIRECTIONS = ("TD", "LR")
GRID = 3  # rows and columns of the layout
MAX_NODES = 6
MAX_EDGES = 7  # the most arrows that fit on the grid uncrossed among MAX_NODES nodes (most_edges())

# The plug-in's declarations (languages.py).
NAME = "mermaid"
GRAMMAR = "grammars/mermaid.ebnf"  # the text as to_text writes it, stripped
SIZE = 288  # create_images.py's default picture side: the labels read well at it


class ParseError(ValueError):
    """Text that is not a chart of the subset; the message names the line."""


@dataclass(frozen=True)
class Node:
    label: str
    shape: str  # a key of SHAPES


@dataclass(frozen=True)
class Chart:
    direction: str
    nodes: tuple[Node, ...]  # in the text's order: node i is named by the i-th letter
    edges: tuple[tuple[int, int], ...]  # (from, to) indices into nodes, sorted


# ---------------------------------------------------------------------------- text

def node_id(i: int) -> str:
    return chr(ord("A") + i)


def to_text(chart: Chart) -> str:
    lines = [f"flowchart {chart.direction}"]
    lines += [f"    {node_id(i)}{SHAPES[n.shape][0]}{n.label}{SHAPES[n.shape][1]}" for i, n in enumerate(chart.nodes)]
    lines += [f"    {node_id(a)} --> {node_id(b)}" for a, b in chart.edges]
    return "\n".join(lines) + "\n"


_NODE = r"([A-Za-z_][A-Za-z0-9_]*)(?:(\(\(|\[|\(|\{)\s*([A-Za-z]+)\s*(\)\)|\]|\)|\}))?"
_NODE_LINE = re.compile(rf"^{_NODE}$")
_EDGE_LINE = re.compile(rf"^{_NODE}\s*-->\s*{_NODE}$")
_CLOSING = {opening: closing for opening, closing in SHAPES.values()}


def parse(text: str) -> Chart:
    """A chart from Mermaid text. Lenient about whitespace, ids, line order and nodes declared
    inside edge lines (`A[Load] --> B{Check}`); strict about the rest: a label outside LABELS,
    a word used twice, a node never given a shape, an edge from a node to itself or given
    twice, and anything else is a ParseError naming the line."""
    lines = [(number, line.strip()) for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1)]
    lines = [(number, line) for number, line in lines if line and not line.startswith("%%")]
    if not lines or not (header := re.fullmatch(r"flowchart\s+(TD|TB|LR)", lines[0][1])):
        raise ParseError(f"line {lines[0][0] if lines else 1}: expected `flowchart TD` or `flowchart LR` first")
    direction = "TD" if header.group(1) in ("TD", "TB") else "LR"
    shapes: dict[str, Node] = {}
    order: list[str] = []
    edges: list[tuple[str, str]] = []

    def declare(number: int, name: str, opening: str | None, label: str | None, closing: str | None):
        if name not in order:
            order.append(name)
        if opening is None:
            return
        if _CLOSING[opening] != closing:
            raise ParseError(f"line {number}: {name}{opening}{label}{closing}: the brackets do not match")
        if label not in LABELS:
            raise ParseError(f"line {number}: {label!r} is not a label of this DSL ({', '.join(LABELS)})")
        node = Node(label, next(shape for shape, (o, _) in SHAPES.items() if o == opening))
        if shapes.setdefault(name, node) != node:
            raise ParseError(f"line {number}: {name} is declared twice, differently")

    for number, line in lines[1:]:
        if match := _EDGE_LINE.match(line):
            declare(number, *match.groups()[:4])
            declare(number, *match.groups()[4:])
            edge = (match.group(1), match.group(5))
            if edge[0] == edge[1]:
                raise ParseError(f"line {number}: an edge from {edge[0]} to itself")
            if edge in edges:
                raise ParseError(f"line {number}: the edge {edge[0]} --> {edge[1]} is given twice")
            edges.append(edge)
        elif match := _NODE_LINE.match(line):
            declare(number, *match.groups())
        else:
            raise ParseError(f"line {number}: expected a node (`A[Load]`) or an edge (`A --> B`), not {line!r}")
    if missing := [name for name in order if name not in shapes]:
        raise ParseError(f"{', '.join(missing)}: used but never given a shape and a label")
    labels = [shapes[name].label for name in order]
    if twice := sorted({label for label in labels if labels.count(label) > 1}):
        raise ParseError(f"the label(s) {', '.join(twice)} name more than one node")
    if not order:
        raise ParseError("a chart needs at least one node")
    index = {name: i for i, name in enumerate(order)}
    return Chart(direction, tuple(shapes[name] for name in order), tuple(sorted((index[a], index[b]) for a, b in edges)))


def parse_or_none(text: str) -> Chart | None:
    try:
        return parse(text)
    except ParseError:
        return None


def canonical(text: str) -> str:
    """The chart's text with its nodes in the order of their labels (ids and line order are
    not drawn, so they are not part of what is read). Raises ParseError where it does not parse."""
    chart = parse(text)
    order = sorted(range(len(chart.nodes)), key=lambda i: chart.nodes[i].label)
    new_index = {old: new for new, old in enumerate(order)}
    return to_text(Chart(chart.direction, tuple(chart.nodes[i] for i in order),
                         tuple(sorted((new_index[a], new_index[b]) for a, b in chart.edges))))


def elements(chart: Chart) -> dict[str, set]:
    """What the scores count: nodes as (label, shape), edges as (label, label)."""
    return {"node": {(n.label, n.shape) for n in chart.nodes},
            "edge": {(chart.nodes[a].label, chart.nodes[b].label) for a, b in chart.edges}}


def parts(chart: Chart) -> dict:
    """A chart's parts, each compared whole by `score` to say what kind of error a reading makes."""
    counted = elements(chart)
    return {"direction": chart.direction, "node_count": len(chart.nodes),
            "labels": {n.label for n in chart.nodes}, "shapes": sorted(n.shape for n in chart.nodes),
            "nodes": counted["node"], "edges": counted["edge"]}


def score(predictions: list[str], references: list[str]) -> dict:
    """Exact match of canonical texts, node and edge precision / recall / F1 (summed over all
    charts), the share of predictions that parse, and errors by kind: the share of charts
    whose direction, node count, label set, shapes (as a multiset), nodes (label and shape)
    and edges are each right."""
    counts = {kind: [0, 0, 0] for kind in ("node", "edge")}  # true positives, predicted, referenced
    exact = valid = 0
    right = dict.fromkeys(("direction", "node_count", "labels", "shapes", "nodes", "edges"), 0)  # parts' keys
    for prediction, reference in zip(predictions, references, strict=True):
        chart, truth = parse_or_none(prediction), parse(reference)
        valid += chart is not None
        exact += chart is not None and canonical(prediction) == canonical(reference)
        got = elements(chart) if chart else {"node": set(), "edge": set()}
        for kind, expected in elements(truth).items():
            counts[kind][0] += len(got[kind] & expected)
            counts[kind][1] += len(got[kind])
            counts[kind][2] += len(expected)
        if chart:
            read, expected = parts(chart), parts(truth)
            for part in right:
                right[part] += read[part] == expected[part]
    scores = {"n": len(references), "exact_match": exact / max(1, len(references)),
              "valid_rate": valid / max(1, len(references))}
    scores |= {f"{part}_right": hits / max(1, len(references)) for part, hits in right.items()}
    for kind, (hits, predicted, expected) in counts.items():
        precision, recall = hits / max(1, predicted), hits / max(1, expected)
        scores |= {f"{kind}_precision": precision, f"{kind}_recall": recall,
                   f"{kind}_f1": 2 * precision * recall / max(1e-12, precision + recall)}
    return scores


# ---------------------------------------------------------------------------- sampling on a grid

Cell = tuple[int, int]  # (row, column) on the GRID x GRID layout


def segment_hits_box(a: tuple[float, float], b: tuple[float, float], centre: tuple[float, float],
                     half: tuple[float, float]) -> bool:
    """Does the segment a-b pass through the axis-aligned box (centre, half sizes)? Sampled
    finely: the boxes are a good fraction of a cell, so 64 points cannot miss one."""
    return any(abs(a[0] + (b[0] - a[0]) * t / 64 - centre[0]) < half[0]
               and abs(a[1] + (b[1] - a[1]) * t / 64 - centre[1]) < half[1] for t in range(65))


# A node's box in cell units, as wide as the drawing makes the largest: an arrow that misses
# it misses the drawn node.
NODE_HALF = (0.42, 0.27)
MARGIN = 0.06  # of the picture's side around the grid: a shifted or turned picture keeps every node whole


def segments_cross(p: tuple, q: tuple, r: tuple, s: tuple) -> bool:
    """Do segments p-q and r-s cross at a point inside both (a shared end is no crossing)?"""
    if len({p, q, r, s}) < 4:
        return False

    def side(a, b, c):
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])

    return side(p, q, r) * side(p, q, s) < 0 and side(r, s, p) * side(r, s, q) < 0


def allowed_edges(cells: list[Cell]) -> list[tuple[int, int]]:
    """Edges (i, j) a TD chart may have between nodes at these cells: j lower, no more
    sideways than down, the straight arrow clear of every other node."""
    found = []
    for i, j in itertools.permutations(range(len(cells)), 2):
        (r1, c1), (r2, c2) = cells[i], cells[j]
        if r2 > r1 and abs(c2 - c1) <= r2 - r1 and not any(
                segment_hits_box((c1, r1), (c2, r2), (c, r), NODE_HALF)
                for k, (r, c) in enumerate(cells) if k not in (i, j)):
            found.append((i, j))
    return found


def sample(rng: random.Random) -> tuple[Chart, list[Cell]]:
    """A random chart and the grid cell of each of its nodes (node i at cells[i]), nodes in
    reading order (row by row, left to right). Every node has an edge; 2 to MAX_NODES nodes."""
    while True:
        count = rng.randint(2, MAX_NODES)
        cells = sorted(rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], count))  # as TD
        candidates = allowed_edges(cells)
        chosen: list[tuple[int, int]] = []

        def clear(edge) -> bool:  # crosses no arrow chosen so far
            return not any(segments_cross(cells[edge[0]], cells[edge[1]], cells[a], cells[b]) for a, b in chosen)

        for j in range(count):  # each node below the top gets one arrow in, where it can
            if into := [e for e in candidates if e[1] == j and clear(e)]:
                chosen.append(rng.choice(into))
        chosen += [e for e in candidates if e not in chosen and rng.random() < 0.15 and clear(e)]  # branches, joins
        touched = {i for edge in chosen for i in edge}
        steep = any(abs(cells[b][1] - cells[a][1]) < cells[b][0] - cells[a][0] for a, b in chosen)
        if len(touched) == count and steep:
            break
    direction = rng.choice(DIRECTIONS)
    if direction == "LR":  # the same chart turned: rows become columns
        cells = [(c, r) for r, c in cells]
    order = sorted(range(count), key=lambda i: cells[i])  # reading order in the picture
    position = {old: new for new, old in enumerate(order)}
    labels = rng.sample(LABELS, count)
    nodes = tuple(Node(labels[i], rng.choice(list(SHAPES))) for i in range(count))
    chart = Chart(direction, tuple(nodes[i] for i in order),
                  tuple(sorted((position[a], position[b]) for a, b in chosen)))
    return chart, [cells[i] for i in order]


def layout_of(chart: Chart) -> list[Cell]:
    """A grid layout for a chart given as text alone (no cells): nodes by longest path from a
    source, one level a row (TD) or column (LR), in text order along it. For drawing a chart
    file; the picture shows it, though not always without crossings."""
    level = [0] * len(chart.nodes)
    for _ in chart.nodes:
        for a, b in chart.edges:
            level[b] = max(level[b], level[a] + 1)
    lanes: dict[int, int] = {}
    cells = []
    for i in range(len(chart.nodes)):
        lane = lanes[level[i]] = lanes.get(level[i], -1) + 1
        cells.append((level[i], lane) if chart.direction == "TD" else (lane, level[i]))
    return cells


def most_edges() -> int:
    """The most arrows a sampled chart can have: over every placement of up to MAX_NODES
    nodes, the largest set of allowed edges of which no two cross (what sample keeps)."""
    best = 0
    for count in range(2, MAX_NODES + 1):
        for cells in itertools.combinations([(r, c) for r in range(GRID) for c in range(GRID)], count):
            candidates = allowed_edges(list(cells))
            crossing = [[segments_cross(cells[a], cells[b], cells[c], cells[d]) for c, d in candidates]
                        for a, b in candidates]

            def grow(i: int, chosen: list[int]):  # branch and bound over the candidates in order
                nonlocal best
                if len(chosen) + len(candidates) - i <= best:
                    return
                if i == len(candidates):
                    best = len(chosen)
                    return
                if not any(crossing[i][j] for j in chosen):
                    grow(i + 1, chosen + [i])
                grow(i + 1, chosen)

            grow(0, [])
    return best


# ---------------------------------------------------------------------------- the plug-in's data

# The longest text a sampled chart can have: the most nodes, with the longest words in the
# longest brackets, and the most edges (ids and arrows are the same length on every line).
# Longest in characters; in a tokenizer's tokens a chart of shorter words that split into
# more pieces can be a token or two longer, which generation's few more tokens cover.
LONGEST = to_text(Chart("TD", tuple(Node(label, "circle") for label in sorted(LABELS, key=len)[-MAX_NODES:]),
                        tuple(itertools.islice(itertools.combinations(range(MAX_NODES), 2), MAX_EDGES))))

HELD_OUT_ONE_IN = 5  # about a fifth of all charts are kept for test sets alone

# The picture loss (model.py): which labelled nodes, as (label, shape), a picture shows
# anywhere. The text does not say which grid cell holds a node, so no loss per region.
CONTENT_CLASSES = len(LABELS) * len(SHAPES)


def contents(text: str) -> list[int]:
    shapes = list(SHAPES)
    return [LABELS.index(node.label) * len(shapes) + shapes.index(node.shape) for node in parse(text).nodes]


def held_out(text: str) -> bool:
    """Is this chart one that only test sets show? Decided by the SHA-256 of its canonical text,
    so whatever the seed, the ids or the line order, no training set holds a test chart."""
    digest = hashlib.sha256(canonical(text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_ONE_IN == 0


def text_of(item: tuple[Chart, list[Cell]]) -> str:
    """What the model learns to write for a sampled chart: its ids in reading order, as sampled."""
    return to_text(item[0])


def draw(item: tuple[Chart, list[Cell]], size: int, rng: random.Random, augment: bool) -> Image.Image:
    """A sampled chart's picture: a style drawn from rng when augmenting, else NOMINAL."""
    chart, cells = item
    return draw_chart(chart, cells, size, random_style(rng) if augment else NOMINAL, rng)


def picture(text: str, size: int = SIZE) -> Image.Image:
    """A drawing of a chart from its text alone (layout_of), in the nominal style."""
    chart = parse(text)
    return draw_chart(chart, layout_of(chart), size)


# ---------------------------------------------------------------------------- drawing

@dataclass(frozen=True)
class Style:
    ink: tuple[int, int, int] = (30, 30, 30)
    background: tuple[int, int, int] = (255, 255, 255)
    fill: tuple[int, int, int] | None = None  # the nodes' inside; None: the background
    stroke: int = 2  # line width in pixels at a 256-pixel picture, scaled with its side
    font_scale: float = 1.0  # of the text size that fits the nodes
    head: float = 1.0  # arrow heads' size, of the nominal
    jitter: bool = False  # nodes moved a little in their cells


NOMINAL = Style()


def random_style(rng: random.Random) -> Style:
    """A look a whiteboard or an editor might give: dark ink (every channel at most 90) on a
    light background (at least 225), nodes filled with a light colour or not, lines 1 to 4
    pixels, the text a little smaller or larger, arrow heads small to large, nodes moved a
    little in their cells. The ink's lightness is drawn first, so grey inks are as common as black."""
    lightness = rng.randint(0, 90)
    ink = tuple(max(0, lightness - rng.randint(0, 40)) for _ in range(3))
    background = tuple(rng.randint(225, 255) for _ in range(3))
    fill = tuple(rng.randint(200, 255) for _ in range(3)) if rng.random() < 0.4 else None
    return Style(ink, background, fill, rng.randint(1, 4), rng.uniform(0.85, 1.15), rng.uniform(0.7, 1.5), True)


def draw_chart(chart: Chart, cells: list[Cell], size: int = SIZE, style: Style = NOMINAL,
               rng: random.Random | None = None) -> Image.Image:
    """A chart drawn with its nodes at these grid cells; rng moves them when the style jitters."""
    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size), style.background)
    draw = ImageDraw.Draw(image)
    margin = MARGIN * size
    cell = (size - 2 * margin) / max(GRID, *(r + 1 for r, _ in cells), *(c + 1 for _, c in cells))
    half_w, half_h = NODE_HALF[0] * cell * 0.95, NODE_HALF[1] * cell * 0.95
    font_size = max(6, round(0.2 * cell * style.font_scale))
    width = max(1, round(style.stroke * size / 256))
    room = 0.05 * cell if style.jitter else 0
    centres = [(margin + (c + 0.5) * cell + rng.uniform(-room, room), margin + (r + 0.5) * cell + rng.uniform(-room, room))
               for r, c in cells]
    fonts = [fitting_font(node.label, node.shape, font_size, (half_w, half_h), width) for node in chart.nodes]
    # a circle is as wide as its word needs, within the node's box
    radii = [min(half_w, max(1.25 * half_h, font.getlength(node.label) / 2 + 3 + width))
             for node, font in zip(chart.nodes, fonts)]
    for a, b in chart.edges:
        arrow(draw, centres[a], centres[b], [outline(chart.nodes[i].shape, (half_w, half_h), radii[i]) for i in (a, b)],
              width, style)
    for node, (x, y), font, r in zip(chart.nodes, centres, fonts, radii):
        box = (x - half_w, y - half_h, x + half_w, y + half_h)
        fill, ink = style.fill or style.background, style.ink
        if node.shape == "box":
            draw.rectangle(box, fill=fill, outline=ink, width=width)
        elif node.shape == "rounded":
            draw.rounded_rectangle(box, radius=half_h * 0.7, fill=fill, outline=ink, width=width)
        elif node.shape == "diamond":
            draw.polygon([(x, y - half_h * 1.2), (x + half_w, y), (x, y + half_h * 1.2), (x - half_w, y)], fill=fill,
                         outline=ink, width=width)
        else:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=ink, width=width)
        draw.text((x, y), node.label, fill=ink, font=font, anchor="mm")
    return image


def outline(shape: str, half: tuple[float, float], radius: float):
    """A function of a unit direction (ux, uy): the distance from a node's centre to its outline."""
    if shape == "circle":
        return lambda ux, uy: radius
    if shape == "diamond":  # |x| / half width + |y| / (1.2 half height) = 1
        return lambda ux, uy: 1 / (abs(ux) / half[0] + abs(uy) / (1.2 * half[1]))
    return lambda ux, uy: min(half[0] / max(abs(ux), 1e-6), half[1] / max(abs(uy), 1e-6))


@functools.cache
def font_of_size(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def fitting_font(label: str, shape: str, size: int, half: tuple[float, float], width: int) -> ImageFont.FreeTypeFont:
    """The font of this size, or smaller until the label fits inside its node's outline (a
    diamond is narrow above and below its middle, so long words get a smaller font there)."""
    while True:
        font = font_of_size(size)
        rise = 0.4 * size  # half the height of a capital, about
        if shape == "diamond":
            room = 2 * half[0] * (1 - rise / (1.2 * half[1]))
        elif shape == "circle":
            room = 2 * math.sqrt(max(0.0, half[0] ** 2 - rise ** 2))
        else:
            room = 2 * half[0]
        if size <= 6 or font.getlength(label) <= room - 2 * width - 6:
            return font
        size -= 1


def arrow(draw: ImageDraw.ImageDraw, start, end, outlines, width: int, style: Style):
    """A straight arrow from one node's outline to the other's, its head at the end."""
    dx, dy = end[0] - start[0], end[1] - start[1]
    length = math.hypot(dx, dy)
    ux, uy = dx / length, dy / length
    leave, reach = outlines[0](ux, uy), outlines[1](ux, uy) + width / 2  # the head's tip on the outline
    a = (start[0] + ux * leave, start[1] + uy * leave)
    b = (end[0] - ux * reach, end[1] - uy * reach)
    draw.line([a, b], fill=style.ink, width=width)
    head = (4 + 2 * width) * style.head
    draw.polygon([b, (b[0] - ux * head - uy * head * 0.6, b[1] - uy * head + ux * head * 0.6),
                  (b[0] - ux * head + uy * head * 0.6, b[1] - uy * head - ux * head * 0.6)], fill=style.ink)


def main(argv=None):
    import files  # the repo's writer; the module itself needs only PIL, so an export can carry it

    parser = argparse.ArgumentParser(description="Draw a Mermaid flowchart of the subset, or sample some.")
    parser.add_argument("file", nargs="?", help="a chart file, or - for standard input")
    parser.add_argument("-o", "--output", help="the picture to write (PNG)")
    parser.add_argument("--size", type=int, default=SIZE, help="picture side in pixels")
    parser.add_argument("--sample", type=int, default=0, help="print this many sampled charts instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.sample:
        rng = random.Random(args.seed)
        print("\n".join(to_text(sample(rng)[0]) for _ in range(args.sample)), end="")
        return
    if not args.file or not args.output:
        parser.error("give a chart file and -o PICTURE, or --sample N")
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        chart = parse(text)
    except (OSError, UnicodeDecodeError, ParseError) as error:
        parser.exit(2, f"mermaid.py: error: {args.file}: {error}\n")
    try:
        with files.replacing(args.output) as temporary:
            draw_chart(chart, layout_of(chart), args.size).save(temporary)
    except files.DiskFull as error:
        parser.exit(1, f"mermaid.py: error: {error}\n")
    except (OSError, ValueError) as error:
        parser.exit(2, f"mermaid.py: error: cannot write {args.output}: {error}\n")


if __name__ == "__main__":
    main()
