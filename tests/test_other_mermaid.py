"""tools/other_mermaid.py: held-out Mermaid charts in a second style, drawn by code that shares
nothing with mermaid.py's drawing, reproducible from its arguments."""

import subprocess
import sys

import PIL.Image
import pytest

import data
import languages
import mermaid
from conftest import ROOT

ARGUMENTS = ["--num", "12", "--size", "96", "--seed", "3"]


def run_tool(out_dir):
    return subprocess.run([sys.executable, "-m", "tools.other_mermaid", "--out_dir", str(out_dir), *ARGUMENTS],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    out = tmp_path_factory.mktemp("other_mermaid")
    result = run_tool(out)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_every_row_is_a_held_out_chart_in_reading_order_at_the_size_asked(drawn):
    rows, bad = data.read_dataset(drawn / "data.csv", language=languages.load("mermaid"))
    assert bad == 0 and len(rows) == 12
    for row in rows:
        assert mermaid.held_out(row.dsl)
        assert mermaid.to_text(mermaid.parse(row.dsl)) == row.dsl  # as to_text writes it, ids A, B, C, ...
        with PIL.Image.open(row.image_path) as image:
            assert image.size == (96, 96) and image.mode == "RGB"
    assert len({row.dsl for row in rows}) > 1


def test_the_same_arguments_draw_the_same_bytes(drawn, tmp_path):
    result = run_tool(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "data.csv").read_bytes() == (drawn / "data.csv").read_bytes()
    names = sorted(p.name for p in (drawn / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "images").iterdir()) and len(names) == 12
    assert all((tmp_path / "images" / n).read_bytes() == (drawn / "images" / n).read_bytes() for n in names)


def test_it_uses_none_of_mermaid_drawing_code():
    source = (ROOT / "tools" / "other_mermaid.py").read_text(encoding="utf-8")
    for name in ("mermaid.draw", "mermaid.render", "mermaid.picture", "mermaid.arrow", "draw_chart", "random_style", "NODE_HALF",
                 "mermaid.outline", "mermaid.fitting_font", "mermaid.font_of_size", "mermaid.MARGIN", "from mermaid import"):
        assert name not in source, name
