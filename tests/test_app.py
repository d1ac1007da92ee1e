"""app.py: its page, in a real headless browser (Debian's chromium and chromedriver), reads a
test picture as inference.py does, shows the confidence and the agreement, asks nothing of
any address but its own, and answers a file that is not a picture in one line. Over plain
HTTP: it serves its example pictures and what it makes, and no other file through any of
Gradio's routes; it takes its port and address from Gradio's variables, and can ask a login;
a full disk is one line.

A screenshot of the page is saved in the test's folder, and also at $APP_SCREENSHOT when set.
"""

import contextlib
import http.cookiejar
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

import dsl
import languages
import renderer
from conftest import ROOT
from test_finetune import run_script, tiny_args
from tools import sketchpad
from tools.sketchpad import CHROMEDRIVER, CHROMIUM, free_port



@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llm, tiny_clip, tiny_dataset):
    """A one-epoch tiny run: it reads badly, but it reads."""
    run_dir = tmp_path_factory.mktemp("run")
    result = run_script("finetune.py", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def browser():
    """A headless chromium driven by selenium; skipped (one line) where there is none, never in CI."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing and os.environ.get("CI"):
        pytest.fail(f"no {' and '.join(missing)} in CI: .ci/run installs Debian's chromium and chromium-driver")
    if missing:
        pytest.skip(f"no {' and '.join(missing)}: apt-get install chromium chromium-driver")
    return sketchpad.open_browser()


def wait_for_page(url: str, server: subprocess.Popen, log: Path, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, f"app.py stopped (status {server.returncode}):\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"app.py did not answer at {url} within {seconds} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def serving(tmp_path: Path, *flags: str, env: dict, cwd: Path | None = None):
    """app.py running with `flags` in `env`, its output in tmp_path/app.log; stopped with Ctrl-C
    (SIGINT), as a user stops it, so that it cleans up after itself."""
    log = tmp_path / "app.log"
    with open(log, "w") as output:
        server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), *flags, "--dtype", "float32"],
                                  cwd=cwd or tmp_path, stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        yield server, log
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def get(url: str | urllib.request.Request, opener=None) -> tuple[int, bytes]:
    """(status, body) of a request (a GET unless it holds data), an error status included."""
    try:
        with (opener or urllib.request.build_opener()).open(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def call(url: str, api_name: str, *inputs) -> list | None:
    """An event of the page through Gradio's API, as the browser triggers it: its outputs, or
    None when it ends in an error."""
    request = urllib.request.Request(f"{url}gradio_api/call/{api_name}", json.dumps({"data": list(inputs)}).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=120) as response:
        kind, data = re.search(r"event: (\w+)\ndata: (.*)\n", response.read().decode()).groups()
    return json.loads(data) if kind == "complete" else None


def test_the_page_reads_an_upload_as_inference_py_does(trained_run, tiny_dataset, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    picture = sorted((tiny_dataset / "images").glob("test_*.png"))[0]
    expected = run_script("inference.py", "--checkpoint", str(trained_run), "--dtype", "float32", str(picture))
    assert expected.returncode == 0, expected.stderr[-2000:]
    header, text = expected.stdout.split("\n", 1)
    confidence, agreement, check = map(float, re.search(r"confidence ([\d.]+), agreement ([\d.]+), picture check "
                                                        r"([\d.]+)", header).groups())

    port, log = free_port(), tmp_path / "app.log"
    with open(log, "w") as stderr:
        server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--checkpoint", str(trained_run),
                                   "--examples_csv", str(tiny_dataset / "test.csv"), "--port", str(port),
                                   "--dtype", "float32"], cwd=tmp_path, stdout=stderr, stderr=subprocess.STDOUT,
                                  env={**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio")})
    try:
        wait_for_page(f"http://127.0.0.1:{port}/", server, log)
        driver.get(f"http://127.0.0.1:{port}/")
        find = driver.find_element
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        find(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(picture))
        WebDriverWait(driver, 120).until(lambda d: find(By.CSS_SELECTOR, "#dsl textarea").get_attribute("value")
                                         and find(By.CSS_SELECTOR, "#confidence input").get_attribute("value"))
        time.sleep(1)  # the side-by-side picture arrives with the text; let it draw
        driver.save_screenshot(str(tmp_path / "app.png"))
        if os.environ.get("APP_SCREENSHOT"):
            shutil.copyfile(tmp_path / "app.png", os.environ["APP_SCREENSHOT"])

        shown = find(By.CSS_SELECTOR, "#dsl textarea").get_attribute("value")
        assert dsl.canonical(shown).strip() == dsl.canonical(text).strip()
        assert float(find(By.CSS_SELECTOR, "#confidence input").get_attribute("value")) == pytest.approx(confidence, abs=2e-3)
        assert float(find(By.CSS_SELECTOR, "#agreement input").get_attribute("value")) == pytest.approx(agreement, abs=1e-6)
        verdict = find(By.CSS_SELECTOR, "#verdict").text
        assert verdict.startswith("Doubtful" if confidence < 0.9 or check < 0.9 else "Confident"), verdict

        # Offline: the page asks nothing of any address but its own.
        requests = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
        urls = {r["params"]["request"]["url"] for r in requests if r["method"] == "Network.requestWillBeSent"}
        assert urls and not [u for u in urls if not u.startswith((f"http://127.0.0.1:{port}/", "data:", "blob:"))]

        # A file that is not a picture, uploaded: one line in the page, no traceback in the server's log.
        (tmp_path / "notes.png").write_text("not a picture")
        find(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(tmp_path / "notes.png"))
        WebDriverWait(driver, 60).until(lambda d: "Cannot read" in find(By.CSS_SELECTOR, "#verdict").text)
        assert find(By.CSS_SELECTOR, "#verdict").text == "Cannot read this file: not an image."
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    finally:
        driver.quit()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_a_full_disk_is_one_line_and_status_1_and_leaves_nothing(trained_run, tiny_dataset, tmp_path):
    # The page's first write: Gradio's copies of the examples, in the page's own folder.
    code = ("import errno, runpy, shutil, sys\n"
            "def full(source, target, *rest, **kwargs):\n"
            "    raise OSError(errno.ENOSPC, 'No space left on device', str(target))\n"
            "shutil.copy2 = full\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            f"runpy.run_path({str(ROOT / 'app.py')!r}, run_name='__main__')\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith("GRADIO_")}
    result = subprocess.run([sys.executable, "-c", code, "--checkpoint", str(trained_run), "--examples_csv",
                             str(tiny_dataset / "test.csv"), "--dtype", "float32"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env={**env, "TMPDIR": str(tmp_path)})
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1].startswith("app.py: error: the disk is full: ")
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("app-*"))


class FixedReader:
    """A stand-in for DiagramReader that reads every picture as one large circle, top left, at
    one confidence and picture check, and keeps the pictures it is given; the agreement is
    inference.read's own, of that reading and the picture."""

    language = languages.load("diagram")
    dsl = "<StartDiagram>\n  <Large> <Circle> <TopLeft>\n<EndDiagram>\n"

    def __init__(self, confidence, check=None):
        self.confidence, self.check, self.pictures = confidence, check, []
        self.vision = self  # its own encoder

    def encode(self, pictures, progress=None):
        assert all(isinstance(p, Image.Image) and p.mode == "RGB" for p in pictures)
        self.pictures += pictures
        return torch.zeros(len(pictures), 1, 1)

    def read_features(self, features, batch_size, constrained, progress):
        return [self.dsl] * len(features), [self.confidence] * len(features)

    def picture_check(self, features, texts):
        return [self.check] * len(texts)

    def score_texts(self, features, texts):  # its own reading first: far likelier than the ink's
        return [(0.0, self.confidence)] + [(-1e9, 0.0)] * (len(texts) - 1)


def test_what_cannot_be_read_is_one_line_and_a_doubtful_reading_is_flagged(tmp_path):
    import app

    (tmp_path / "notes.png").write_text("not a picture")
    Image.new("RGB", (1, 1), "white").save(tmp_path / "dot.png")
    Image.new("RGB", (64, 64), "white").save(tmp_path / "blank.png")
    renderer.render(dsl.parse(FixedReader.dsl)).save(tmp_path / "circle.png")  # what the stand-in reads
    reader = FixedReader(0.95)
    for picture, message in [(str(tmp_path / "notes.png"), "Cannot read this file**: not an image."),
                             (str(tmp_path / "dot.png"), "Cannot read this file**: too small to read (1 x 1"),
                             (str(tmp_path / "missing.png"), "Cannot read this file**: no such file."),
                             (Image.new("RGBA", (8, 20)), "Cannot read this picture**: 8 x 20 pixels"),
                             (None, "Upload a picture or draw a diagram.")]:
        text, beside, confidence, agreement, verdict = app.read(reader, 0.9, picture)
        assert message in verdict and "\n" not in verdict and (text, beside, confidence) == ("", None, None)

    text, beside, confidence, agreement, verdict = app.read(reader, 0.9, str(tmp_path / "circle.png"))
    assert text == FixedReader.dsl.rstrip() and beside.size == (448, 224) and agreement == 1.0
    assert verdict == "**Confident**. The ink agrees."
    assert app.read(FixedReader(0.5), 0.9, str(tmp_path / "circle.png"))[-1].startswith("**Doubtful**: confidence 0.500")
    # The picture head doubts what the LLM is sure of: doubtful too; sure of it: not.
    assert app.read(FixedReader(0.99, 0.4), 0.9, str(tmp_path / "circle.png"))[-1] == \
        "**Doubtful**: the image tokens alone give it 0.400. The ink agrees."
    assert app.read(FixedReader(0.99, 0.95), 0.9, str(tmp_path / "circle.png"))[-1].startswith("**Confident**")
    # A blank picture: the three empty quadrants agree with the reading, the top left does not,
    # and the ink fitting another reading is doubt of its own, unless the LLM and its picture head are sure.
    assert app.read(FixedReader(0.98), 0.9, str(tmp_path / "blank.png"))[-1] == \
        "**Doubtful**: the ink fits another reading (agreement 0.75)."
    assert app.read(FixedReader(0.995, 0.995), 0.9, str(tmp_path / "blank.png"))[-1] == \
        "**Confident**. The ink fits another reading (agreement 0.75), but the model is sure of its reading."
    # An empty sketchpad is nothing drawn; a stroke on its transparent layer is a drawing, on white.
    empty = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert app.drawing({"composite": empty}) is None and app.drawing(None) is None
    empty.putpixel((10, 10), (0, 0, 0, 255))
    assert app.drawing({"composite": empty}) is not None


def ink_box(picture: Image.Image, left: int, top: int, side: int) -> tuple | None:
    """The box of the dark pixels in one square of a picture, in the picture's pixels."""
    box = ImageOps.invert(picture.convert("L").crop((left, top, left + side, top + side))).point(
        lambda v: 255 if v > 96 else 0).getbbox()
    return box and (box[0] + left, box[1] + top, box[2] + left, box[3] + top)


def test_the_sketchpad_hands_the_reader_what_the_mouse_drew(tmp_path, monkeypatch):
    """tools/sketchpad.py's mouse strokes, in chromium, reach the reader as the drawing: in each
    quadrant the ink spans the element's box (docs/SPEC.md's size, centred), and nothing is in
    an empty one; the page shows the reader's reading. tools/sketchpad.py --checkpoint runs the
    same strokes with a trained model (docs/LOG.md)."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    driver = browser()
    reader = FixedReader(0.95)
    page, url = sketchpad.serve(reader)
    try:
        assert len(sketchpad.DIAGRAMS) >= 5
        for count, text in enumerate(sketchpad.DIAGRAMS, 1):
            shown = sketchpad.draw_and_read(driver, url, text)
            assert shown["dsl"] == FixedReader.dsl.rstrip() and shown["confidence"] == pytest.approx(0.95)
            assert len(reader.pictures) == count
            picture = reader.pictures[-1]
            picture.save(tmp_path / f"drawn_{count}.png")
            assert picture.size == (sketchpad.CANVAS, sketchpad.CANVAS)
            drawn = {element.position: element for element in dsl.parse(text).elements}
            half = sketchpad.CANVAS // 2
            for position, (x, y) in zip(dsl.POSITIONS, [(0, 0), (half, 0), (0, half), (half, half)]):
                box = ink_box(picture, x, y, half)
                if position not in drawn:
                    assert box is None, (count, position, box)
                    continue
                points = [p for stroke in sketchpad.strokes(drawn[position]) for p in stroke]
                expected = (min(p[0] for p in points), min(p[1] for p in points),
                            max(p[0] for p in points), max(p[1] for p in points))
                assert box is not None and all(abs(a - b) <= 8 for a, b in zip(box, expected)), \
                    (count, position, box, expected)
    finally:
        driver.quit()
        page.close()


# Every route of Gradio 6 that answers with a file: gradio_api/ is its API's prefix, the bare
# file routes are its static workers'; static/, assets/ and svelte/ serve its own package.
FILE_ROUTES = ["gradio_api/file=", "gradio_api/file/", "file=", "file/", "static/", "assets/", "svelte/",
               "gradio_api/custom_component/image/client/", "gradio_api/proxy=", "gradio_api/file=file://"]


def ways_to_name(file: Path, cwd: Path, folder: str) -> set[str]:
    """`file` as a request can name it: absolute, relative to the server's cwd, climbing out of
    the root and out of `folder` (one the page serves) with ../, each also URL-encoded two ways."""
    climbing = "../" * 12 + str(file).lstrip("/")
    paths = [str(file), os.path.relpath(file, cwd), climbing, f"{folder}/{climbing}", f"{folder}/../{file.name}"]
    return {way for path in paths
            for way in (path, urllib.parse.quote(path, safe=""), path.replace("..", "%2e%2e"))}


def test_the_page_serves_its_examples_and_what_it_makes_and_no_other_file(trained_run, tiny_dataset, tmp_path):
    # A clone as its users run the page: from the repo, with the examples' test.csv beside the code.
    repo, temporary = tmp_path / "repo", tmp_path / "tmp"
    shutil.copytree(tiny_dataset, repo)
    secrets = [repo / ".git" / "config", repo / "README.md", repo / "test.csv", trained_run / "log.jsonl",
               # What other Gradio apps leave where Gradio keeps the files it serves by default.
               temporary / "gradio" / "0" / "other.txt", repo / ".gradio" / "cached_examples" / "0" / "other.txt"]
    for secret in secrets:
        secret.parent.mkdir(parents=True, exist_ok=True)
        if not secret.exists():
            secret.write_text(f"the secret content of {secret.name}\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith("GRADIO_")}
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with serving(tmp_path, "--checkpoint", str(trained_run), "--port", str(port), cwd=repo,
                 env={**env, "TMPDIR": str(temporary)}) as (server, log):
        wait_for_page(url, server, log)

        # The examples, as the browser gets them: the URLs in the page's config, Gradio's copies.
        dataset, = [c for c in json.loads(get(url + "config")[1])["components"] if c["type"] == "dataset"]
        examples = [sample[0] for sample in dataset["props"]["samples"]]
        originals = sorted((repo / "images").glob("test_*.png"))
        assert len(examples) == len(originals) == 6
        for example, original in zip(examples, originals):
            assert get(example["url"]) == (200, original.read_bytes()) and str(temporary) in example["path"]

        # An example clicked: what the page makes (the prediction drawn beside the input) is served.
        loaded, = call(url, "load_example", 0)
        text, beside, *_ = call(url, "read_upload", loaded["value"])
        status, body = get(beside["url"])
        assert text.startswith("<StartDiagram>") and status == 200 and Image.open(io.BytesIO(body)).size == (448, 224)
        # A file on the server's disk, named in an event instead of uploaded, is not read.
        for file in (repo / ".git" / "config", originals[0]):
            assert call(url, "read_upload", {"path": str(file), "meta": {"_type": "gradio.FileData"}}) is None

        served_folder = str(Path(examples[0]["path"]).parent)
        leaks = []
        for secret in secrets:
            content = secret.read_bytes()[:200]
            for way in sorted(ways_to_name(secret, repo, served_folder)):
                for route in FILE_ROUTES:
                    status, body = get(url + route + way)
                    if status == 200 and content in body:
                        leaks.append(f"{route}{way}")
        assert not leaks, f"{len(leaks)} requests got a file the page must not serve: {leaks[:10]}"
        assert get(url)[0] == 200
    assert server.returncode == 0 and not list(temporary.glob("app-*")), "the page's own folder is left behind"


def test_port_and_address_from_gradios_variables_a_flag_wins_and_a_login(trained_run, tmp_path, monkeypatch):
    import app

    monkeypatch.setenv("GRADIO_SERVER_PORT", "7000")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    assert (app.Arguments().port, app.Arguments().host) == (7000, "0.0.0.0")
    assert (app.Arguments(port=7001).port, app.Arguments(host="127.0.0.1").host) == (7001, "127.0.0.1")
    monkeypatch.delenv("GRADIO_SERVER_PORT")
    monkeypatch.delenv("GRADIO_SERVER_NAME")
    assert (app.Arguments().port, app.Arguments().host) == (7860, "127.0.0.1")

    # Each mistake in one line, status 2, before the model is loaded.
    for variables, flags, error in [({"GRADIO_SERVER_PORT": "78x0"}, (), "GRADIO_SERVER_PORT=78x0: not a port number"),
                                    ({}, ("--port", "65536"), "--port 65536: a port number is 0 to 65535"),
                                    ({}, ("--auth", "ada"), "--auth: expected USER:PASSWORD, neither empty")]:
        result = run_script("app.py", "--checkpoint", str(trained_run), *flags, env={**os.environ, **variables})
        assert result.returncode == 2 and result.stderr.splitlines()[-1].startswith(f"app.py: error: {error}")
        assert "Traceback" not in result.stderr, result.stderr

    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "localhost",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    with serving(tmp_path, "--checkpoint", str(trained_run), "--auth", "ada:lovelace", env=env) as (server, log):
        url = f"http://localhost:{port}/"
        wait_for_page(url, server, log)
        assert f"Running on local URL:  {url[:-1]}" in log.read_text()
        assert get(url + "config")[0] == 401  # nothing but the login form without a login
        browser_session = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        for password, status in [("babbage", 400), ("lovelace", 200)]:
            form = urllib.parse.urlencode({"username": "ada", "password": password}).encode()
            assert get(urllib.request.Request(url + "login", form), browser_session)[0] == status
        assert get(url + "config", browser_session)[0] == 200
