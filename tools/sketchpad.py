"""The page's sketchpad, as a user draws on it: diagrams drawn with mouse strokes in a headless
chromium (Debian's chromium and chromedriver, driven by selenium), read by a checkpoint.

    python -m tools.sketchpad --checkpoint checkpoints

Serves app.py's page with the checkpoint, draws each of DIAGRAMS on its sketchpad with the
mouse (a circle as a 36-sided polyline, a square and a triangle a stroke per side, as a hand
with a mouse draws them; sizes and centres from docs/SPEC.md), presses "Read the drawing",
and prints each diagram, what the page read, and the confidence. The last line is one JSON
object. tests/test_app.py draws the same strokes through the same code.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import dsl
import settings
from settings import setting

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CANVAS = 448  # app.py's sketchpad side, in pixels of the picture it hands the reader
SIDE = {"Large": 0.80, "Medium": 0.55, "Small": 0.30}  # of a quadrant's side (docs/SPEC.md)
CENTRE = {"TopLeft": (0.25, 0.25), "TopRight": (0.75, 0.25), "BottomLeft": (0.25, 0.75),
          "BottomRight": (0.75, 0.75)}  # of the canvas's side

# Circles, squares and triangles, in every quadrant and at every size, one to four a diagram.
DIAGRAMS = [
    "<StartDiagram>\n  <Large> <Circle> <TopLeft>\n<EndDiagram>\n",
    "<StartDiagram>\n  <Medium> <Square> <BottomRight>\n<EndDiagram>\n",
    "<StartDiagram>\n  <Large> <Triangle> <TopRight>\n  <Small> <Circle> <BottomLeft>\n<EndDiagram>\n",
    "<StartDiagram>\n  <Small> <Square> <TopLeft>\n  <Medium> <Triangle> <BottomLeft>\n"
    "  <Medium> <Circle> <BottomRight>\n<EndDiagram>\n",
    "<StartDiagram>\n  <Large> <Square> <TopLeft>\n  <Medium> <Circle> <TopRight>\n"
    "  <Small> <Triangle> <BottomLeft>\n  <Large> <Circle> <BottomRight>\n<EndDiagram>\n",
    "<StartDiagram>\n  <Medium> <Triangle> <TopRight>\n  <Large> <Square> <BottomLeft>\n<EndDiagram>\n",
]


@dataclass
class Arguments:
    checkpoint: str = setting("checkpoints", "a run folder (its best checkpoint, else latest epoch) or a checkpoint")
    dtype: str = setting("auto", "auto (the fastest safe one here, by measurement), float32, bfloat16, float16")


def strokes(element: dsl.Element) -> list[list[tuple[float, float]]]:
    """The mouse strokes that draw an element, in canvas pixels: one closed polyline (a circle
    of 36 short moves), or a stroke per side (a square, a triangle with its apex up)."""
    side = SIDE[element.size] * CANVAS / 2
    cx, cy = (fraction * CANVAS for fraction in CENTRE[element.position])
    if element.shape == "Circle":
        return [[(cx + side / 2 * math.cos(2 * math.pi * i / 36), cy + side / 2 * math.sin(2 * math.pi * i / 36))
                 for i in range(37)]]
    h = side / 2
    corners = ([(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
               if element.shape == "Square" else [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)])
    return [[a, b] for a, b in zip(corners, corners[1:] + corners[:1])]


def open_browser():
    """A headless chromium driven by selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(reader, doubtful_below: float = 0.5):
    """app.py's page for this reader, served on a free port of 127.0.0.1: (page, its address)."""
    import app

    arguments = app.Arguments(examples_csv="", doubtful_below=doubtful_below)
    page = app.page(reader, arguments, [])
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, ssr_mode=False,
                quiet=True, footer_links=[])
    return page, f"http://127.0.0.1:{port}/"


def draw_and_read(driver, url: str, text: str, seconds: float = 120) -> dict:
    """Draws a diagram on a fresh page's sketchpad with the mouse, presses "Read the drawing",
    and returns what the page shows: dsl, confidence, agreement, verdict."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, seconds)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[role=tab]"))
    next(tab for tab in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if tab.text == "Draw").click()
    canvas = wait.until(lambda d: next((c for c in d.find_elements(By.CSS_SELECTOR, "#sketch canvas")
                                        if c.is_displayed()), None))
    driver.find_element(By.CSS_SELECTOR, "#sketch button[aria-label=Brush]").click()
    # The editor shows the picture centred in its canvas, zoomed to fit (its zoom shown as "64%").
    zoom = float(wait.until(lambda d: next((e.text for e in d.find_elements(By.CSS_SELECTOR, "#sketch span")
                                            if re.fullmatch(r"\d+%", e.text)), None))[:-1]) / 100
    actions = ActionBuilder(driver, mouse=PointerInput(interaction.POINTER_MOUSE, "mouse"), duration=0)
    for element in dsl.parse(text).elements:
        for stroke in strokes(element):
            # W3C actions place the pointer relative to the element's centre.
            offsets = [(round((x - CANVAS / 2) * zoom), round((y - CANVAS / 2) * zoom)) for x, y in stroke]
            actions.pointer_action.move_to(canvas, *offsets[0]).pointer_down()
            for x, y in offsets[1:]:  # the brush draws a straight line from one reported point to the next
                actions.pointer_action.move_to(canvas, x, y)
            actions.pointer_action.pointer_up()
    actions.perform()
    next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "Read the drawing").click()
    shown = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#confidence input").get_attribute("value")
                       and d.find_element(By.CSS_SELECTOR, "#dsl textarea").get_attribute("value"))
    number = lambda selector: float(driver.find_element(By.CSS_SELECTOR, selector).get_attribute("value") or "nan")
    return {"dsl": shown, "confidence": number("#confidence input"), "agreement": number("#agreement input"),
            "verdict": driver.find_element(By.CSS_SELECTOR, "#verdict").text}


def main(args: Arguments) -> dict:
    import inference

    os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="sketchpad-"))
    reader = inference.load(args.checkpoint, "cpu", args.dtype)
    page, url = serve(reader)
    driver = open_browser()
    results = []
    try:
        for text in DIAGRAMS:
            shown = draw_and_read(driver, url, text)
            right = dsl.parse_or_none(shown["dsl"]) == dsl.parse(text)
            results.append({"truth": dsl.canonical(text), **shown, "right": right})
            print(f"{'right' if right else 'WRONG'}  confidence {shown['confidence']:.3f}  "
                  f"{' '.join(dsl.to_tags(dsl.parse(text)))}  read: {' '.join(shown['dsl'].split())}")
    finally:
        driver.quit()
        page.close()
    return {"n": len(results), "right": sum(r["right"] for r in results), "readings": results}


if __name__ == "__main__":
    arguments, = settings.parse(sys.argv[1:], Arguments, program="tools/sketchpad.py")
    print(json.dumps(main(arguments)))
