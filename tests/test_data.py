"""Bad data is found before any model loads: a clear message, exit status 2, no traceback."""

import csv
import subprocess
import sys

import pytest
from PIL import Image

import data
import dsl
import languages
from conftest import ROOT

GOOD_DSL = "<StartDiagram>\n  <Large> <Circle> <TopLeft>\n<EndDiagram>\n"


def write_csv(folder, rows, header=("image_path", "dsl")):
    path = folder / "rows.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (64, 64), "white").save(tmp_path / "good.png")
    return tmp_path


def test_good_rows_are_read_with_paths_against_the_csv_folder(folder):
    Image.new("RGB", (64, 64), "white").save(folder / "abs.png")
    path = write_csv(folder, [["good.png", GOOD_DSL], [str(folder / "abs.png"), GOOD_DSL.replace("\n", " ")]])
    rows, skipped = data.read_dataset(path)
    assert skipped == 0
    assert [r.image_path for r in rows] == [folder / "good.png", folder / "abs.png"]
    assert rows[1].dsl == GOOD_DSL.replace("\n", " ")  # as written: scores compare canonical forms


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_other_image_modes_are_converted_silently(folder, mode):
    Image.new(mode, (32, 32)).save(folder / f"img.{'jpg' if mode == 'CMYK' else 'png'}")
    name = f"img.{'jpg' if mode == 'CMYK' else 'png'}"
    rows, _ = data.read_dataset(write_csv(folder, [[name, GOOD_DSL]]))
    assert data.load_image(rows[0].image_path).mode == "RGB"


def test_transparent_background_becomes_white(folder):
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    image.putpixel((0, 0), (10, 20, 30, 255))
    image.save(folder / "t.png")
    loaded = data.load_image(folder / "t.png")
    assert loaded.getpixel((1, 1)) == (255, 255, 255) and loaded.getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize("content, header, message", [
    (None, None, "no such file"),
    ([["good.png", GOOD_DSL]], ("image_path",), "missing column(s) dsl"),
    ([["good.png", GOOD_DSL, "x"]], ("image_path", "dsl", "notes"), "unexpected column(s) notes"),
    ([], ("image_path", "dsl"), "no rows"),
    ([], None, "found none"),
])
def test_file_level_problems(folder, content, header, message):
    path = folder / "nothing.csv" if content is None else write_csv(folder, content, header)
    with pytest.raises(data.DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.read_dataset(path)


def test_every_bad_row_is_reported_with_number_path_and_reason(folder):
    (folder / "notes.png").write_text("not an image at all")
    good_png = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    rows = [
        ["good.png", GOOD_DSL],                                   # row 1: fine
        ["missing.png", GOOD_DSL],                                # row 2
        ["notes.png", GOOD_DSL],                                  # row 3
        ["truncated.png", GOOD_DSL],                              # row 4
        ["good.png", GOOD_DSL],                                   # row 5: duplicate of row 1
        ["good.png", "<StartDiagram>\n  <Huge> <Circle> <TopLeft>\n<EndDiagram>\n"],  # row 6: bad DSL
        ["gone.png", GOOD_DSL],                                   # row 7: not shown, counted
    ]
    with pytest.raises(data.DataError) as error:
        data.read_dataset(write_csv(folder, rows))
    message = str(error.value)
    assert "6 of 7 rows are bad" in message
    assert "row 2: 'missing.png': no such file" in message
    assert "row 3: 'notes.png': not an image" in message
    assert "row 4: 'truncated.png': cannot be decoded" in message
    assert "row 5: 'good.png': duplicate of row 1" in message
    assert "row 6: 'good.png': bad DSL: line 2: unknown token '<Huge>'" in message
    assert "gone.png" not in message and "and 1 more" in message  # only the first few are shown
    assert "--skip_bad_rows" in message


def test_bad_dsl_shows_the_parsers_message(folder):
    bad = "<StartDiagram>\n  <Large> <Circle>\n<EndDiagram>\n"
    with pytest.raises(data.DataError) as error:
        data.read_dataset(write_csv(folder, [["good.png", bad]]))
    try:
        dsl.parse(bad)
    except dsl.DSLParseError as parse_error:
        assert str(parse_error) in str(error.value)


def test_skip_bad_rows_keeps_the_rest(folder):
    rows, skipped = data.read_dataset(write_csv(folder, [["good.png", GOOD_DSL], ["missing.png", GOOD_DSL]]),
                                      skip_bad_rows=True)
    assert len(rows) == 1 and skipped == 1
    with pytest.raises(data.DataError, match="all 1 rows are bad"):
        data.read_dataset(write_csv(folder, [["missing.png", GOOD_DSL]]), skip_bad_rows=True)


@pytest.mark.parametrize("script", ["finetune.py", "inference.py"])
def test_scripts_refuse_a_bad_csv_before_loading_any_model(folder, script):
    path = write_csv(folder, [["good.png", GOOD_DSL], ["missing.png", GOOD_DSL]])
    flag = "--data_csv" if script == "finetune.py" else "--csv"
    if script == "inference.py":  # the checkpoint's config.json names the DSL the CSV is checked against
        (folder / "run").mkdir()
        (folder / "run" / "config.json").write_text('{"dsl": "diagram"}')
    result = subprocess.run([sys.executable, str(ROOT / script), flag, str(path), "--output_dir" if script ==
                             "finetune.py" else "--checkpoint", str(folder / "run")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "1 of 2 rows are bad" in result.stderr and "row 2: 'missing.png': no such file" in result.stderr
    assert "CLIP features" not in result.stderr and "checkpoint" not in result.stderr.lower()


def test_validation_holds_out_whole_diagrams(folder):
    """finetune.split_data: no validation diagram among the training rows, about val_fraction of
    the rows, the same split for the same seed."""
    import finetune

    diagrams = [dsl.to_text(d) for d in list(dsl.all_diagrams())[::250]]  # 40 diagrams of 1 to 4 elements
    rows = []
    for i, diagram in enumerate(diagrams):
        for copy in range(1 + i % 7):  # 1 to 7 pictures of each: 156 rows
            Image.new("RGB", (16, 16), "white").save(folder / f"{i}-{copy}.png")
            rows.append([f"{i}-{copy}.png", diagram])
    path = write_csv(folder, rows)

    def split(seed):
        return finetune.split_data(finetune.TrainConfig(data_csv=str(path), val_fraction=0.2, seed=seed),
                                   languages.load("diagram"))

    for seed in range(5):
        train, val = split(seed)
        assert len(train) + len(val) == len(rows)
        assert not {r.dsl for r in train} & {r.dsl for r in val}
        assert 31 <= len(val) <= 31 + 6  # 20% of 156, and at most one diagram's pictures more
    assert split(0) == split(0) and split(0) != split(1)


def test_validation_needs_two_diagrams(folder):
    import finetune

    Image.new("RGB", (64, 64), "white").save(folder / "other.png")
    path = write_csv(folder, [["good.png", GOOD_DSL], ["other.png", GOOD_DSL]])
    with pytest.raises(data.DataError, match="all 2 rows show one diagram"):
        finetune.split_data(finetune.TrainConfig(data_csv=str(path)), languages.load("diagram"))
