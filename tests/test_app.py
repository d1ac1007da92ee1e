"""app.py: its page, in a real headless browser (Debian's chromium and chromedriver), reads a
test picture as inference.py does, shows the confidence and the agreement, asks nothing of
any address but its own, and answers a file that is not a picture in one line.

A screenshot of the page is saved in the test's folder, and also at $APP_SCREENSHOT when set.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import dsl
import model
from conftest import ROOT
from test_finetune import run_script, tiny_args

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


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
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_the_page_reads_an_upload_as_inference_py_does(trained_run, tiny_dataset, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    picture = sorted((tiny_dataset / "images").glob("test_*.png"))[0]
    expected = run_script("inference.py", "--checkpoint", str(trained_run), "--dtype", "float32", str(picture))
    assert expected.returncode == 0, expected.stderr[-2000:]
    header, text = expected.stdout.split("\n", 1)
    confidence, agreement = map(float, re.search(r"confidence ([\d.]+), agreement ([\d.]+)", header).groups())

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
        assert verdict.startswith("Doubtful" if confidence < 0.9 or agreement < 1 else "Confident"), verdict

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


class FixedReader:
    """A stand-in for DiagramReader that reads every picture the same way."""

    def __init__(self, confidence, agreement):
        self.reading = model.Reading("<StartDiagram>\n  <Large> <Circle> <TopLeft>\n<EndDiagram>\n", True,
                                     confidence, agreement)

    def read_images(self, pictures):
        assert all(isinstance(p, Image.Image) and p.mode == "RGB" for p in pictures)
        return [self.reading for _ in pictures]


def test_what_cannot_be_read_is_one_line_and_a_doubtful_reading_is_flagged(tmp_path):
    import app

    (tmp_path / "notes.png").write_text("not a picture")
    Image.new("RGB", (1, 1), "white").save(tmp_path / "dot.png")
    Image.new("RGB", (64, 64), "white").save(tmp_path / "blank.png")
    reader = FixedReader(0.95, 1.0)
    for picture, message in [(str(tmp_path / "notes.png"), "Cannot read this file**: not an image."),
                             (str(tmp_path / "dot.png"), "Cannot read this file**: too small to read (1 x 1"),
                             (str(tmp_path / "missing.png"), "Cannot read this file**: no such file."),
                             (Image.new("RGBA", (8, 20)), "Cannot read this picture**: 8 x 20 pixels"),
                             (None, "Upload a picture or draw a diagram.")]:
        text, beside, confidence, agreement, verdict = app.read(reader, 0.9, picture)
        assert message in verdict and "\n" not in verdict and (text, beside, confidence) == ("", None, None)

    text, beside, confidence, agreement, verdict = app.read(reader, 0.9, str(tmp_path / "blank.png"))
    assert text == reader.reading.dsl.rstrip() and beside.size == (448, 224) and verdict.startswith("**Confident**")
    assert app.read(FixedReader(0.5, 1.0), 0.9, str(tmp_path / "blank.png"))[-1].startswith("**Doubtful**: confidence 0.500")
    assert "agreement 0.75" in app.read(FixedReader(0.99, 0.75), 0.9, str(tmp_path / "blank.png"))[-1]
    # An empty sketchpad is nothing drawn; a stroke on its transparent layer is a drawing, on white.
    empty = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert app.drawing({"composite": empty}) is None and app.drawing(None) is None
    empty.putpixel((10, 10), (0, 0, 0, 255))
    assert app.drawing({"composite": empty}) is not None
