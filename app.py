"""A web page to try a checkpoint: upload a picture or draw a diagram; see its DSL, the prediction
drawn beside it, the confidence, the agreement, and a flag when the reading is doubtful (the
confidence, or the picture head's probability of the reading, below --doubtful_below; or the
ink fitting another reading, where the DSL can tell).

    python app.py --checkpoint checkpoints        # then open http://127.0.0.1:7860

Offline: no analytics, no share link, the page's fonts served by the page itself. It serves
its example pictures (Gradio's copies of them) and what it makes, and no other file: it allows
Gradio no path, and the folders whose files Gradio serves are the page's own (unless
GRADIO_TEMP_DIR names one).
"""

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

import data
import files
import inference
import settings
from checkpoint import CheckpointError
from settings import setting

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported (in page), which calls home otherwise


@dataclass
class Arguments:
    checkpoint: str = setting("checkpoints", "a run folder (its best checkpoint, else latest epoch) or a checkpoint")
    examples_csv: str = setting("test.csv", "a data CSV whose first 8 pictures are the page's examples (if it exists)")
    doubtful_below: float = setting(0.5, "flag a reading as doubtful below this confidence or picture check, "
                                         "and for the ink's doubts (docs/SPEC.md's doubt flag)")
    port: int | None = setting(None, "the port to serve the page on (unset: $GRADIO_SERVER_PORT, else 7860)")
    host: str | None = setting(None, "the address (unset: $GRADIO_SERVER_NAME, else 127.0.0.1; 0.0.0.0: all "
                                     "networks)")
    auth: str = setting("", "USER:PASSWORD: ask every visitor to log in (empty: no login)")
    device: str = setting("auto", "auto (cuda when there is one), cpu, cuda, ...")
    dtype: str = setting("auto", "auto (the fastest safe one here, by measurement), float32, bfloat16, float16")

    def __post_init__(self):
        # Gradio's own variables, which its users and hosted Spaces set; a flag wins. The port's is
        # checked even then: gradio reads it too, when imported.
        self.host = self.host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
        port = os.environ.get("GRADIO_SERVER_PORT", "7860")
        if not (port.isdigit() and int(port) <= 65535):
            raise settings.SettingsError(f"GRADIO_SERVER_PORT={port}: not a port number (0 to 65535)")
        self.port = int(port) if self.port is None else self.port
        settings.check(0 <= self.port <= 65535, "port", self.port, "a port number is 0 to 65535")
        user, _, password = self.auth.partition(":")
        if self.auth and not (user and password):  # the value is not repeated: it holds a password
            raise settings.SettingsError("--auth: expected USER:PASSWORD, neither empty")


def on_white(image: Image.Image) -> Image.Image:
    """A picture, or a sketch (transparent where nothing is drawn), as RGB on white."""
    return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA")).convert("RGB")


def drawing(value: dict | None) -> Image.Image | None:
    """The sketchpad's picture, or None while nothing is drawn on it."""
    picture = value and value.get("composite")
    return picture if picture is not None and ImageOps.invert(on_white(picture).convert("L")).getbbox() else None


def read(reader, doubtful_below: float, picture: str | Image.Image | None) -> tuple:
    """(DSL, input beside prediction, confidence, agreement, verdict); a picture that cannot be
    read (a file that is none, one under 16 px) has its reason as the verdict, in one line."""
    if picture is None:
        return "", None, None, None, "Upload a picture or draw a diagram."
    if isinstance(picture, str) and (problem := data.image_problem(Path(picture))):
        return "", None, None, None, f"**Cannot read this file**: {problem}."
    picture = on_white(data.load_image(picture) if isinstance(picture, str) else picture)
    if min(picture.size) < data.MIN_SIDE:
        return "", None, None, None, f"**Cannot read this picture**: {picture.width} x {picture.height} pixels, " \
                                     f"under {data.MIN_SIDE} on a side."
    reading = inference.read(reader, [picture])[0]
    confidence, agreement, check = float(reading.confidence), reading.agreement, reading.picture_check
    doubts = inference.doubts(reading, doubtful_below)
    ink = ""  # also where the agreement is None: the DSL cannot compare
    if agreement == 1:
        ink = " The ink agrees."
    elif agreement is not None and inference.sure(reading):  # not named among the doubts: say why
        ink = f" The ink fits another reading (agreement {agreement:.2f}), but the model is sure of its reading."
    verdict = (f"**Doubtful**: {'; '.join(doubts)}." if doubts else "**Confident**.") + ink
    drawn = inference.render_side_by_side(picture, reading.dsl, reader.language)
    return (reading.dsl.rstrip(), drawn, round(confidence, 3), None if agreement is None else round(agreement, 2),
            verdict)


def page(reader, args: Arguments, examples: list[str]):
    """The page, as Gradio Blocks. Gradio is imported here, once the settings are checked: it
    reads GRADIO_SERVER_PORT when imported, and a bad one would end in a traceback there."""
    import gradio as gr

    with gr.Blocks(title="Diagrams to DSL", analytics_enabled=False) as demo:
        gr.Markdown("## Diagrams to DSL\nUpload a picture of a diagram, or draw one, and the model reads it.")
        with gr.Row():
            with gr.Column():
                with gr.Tab("Upload"):
                    upload = gr.Image(type="filepath", sources=["upload", "clipboard"], label="picture",
                                      elem_id="upload")
                    if examples:
                        gr.Examples(examples, upload, label=f"{Path(args.examples_csv).name}'s pictures")
                with gr.Tab("Draw"):
                    sketch = gr.Sketchpad(type="pil", label="diagram", canvas_size=(448, 448), elem_id="sketch",
                                          brush=gr.Brush(colors=["#202020"], color_mode="fixed", default_size=4))
                    button = gr.Button("Read the drawing")
            with gr.Column():
                verdict = gr.Markdown(elem_id="verdict")
                text = gr.Textbox(label="DSL", lines=6, elem_id="dsl")
                with gr.Row():
                    confidence = gr.Number(label="confidence", elem_id="confidence")
                    agreement = gr.Number(label="agreement", elem_id="agreement")
                beside = gr.Image(label="the input, and the prediction drawn", elem_id="beside")
        outputs = [text, beside, confidence, agreement, verdict]
        # The uploaded file as it came (preprocess=False): read() names what is wrong with one that is no picture.
        upload.change(lambda file: read(reader, args.doubtful_below, file and file["path"]), upload, outputs,
                      preprocess=False, api_name="read_upload")
        button.click(lambda drawn: read(reader, args.doubtful_below, drawing(drawn)), sketch, outputs,
                     api_name="read_drawing")
    return demo


def main(args: Arguments) -> None:
    csv = Path(args.examples_csv)
    examples = [str(row.image_path) for row in data.read_dataset(csv, True)[0][:8]] if csv.is_file() else []
    reader = inference.load(args.checkpoint, args.device, args.dtype)
    with tempfile.TemporaryDirectory(prefix="app-") as own_folder:
        # Gradio serves every file in its temporary folder (uploads, what the page draws, the copies
        # it makes of the examples when the page is built) and in its examples cache. By default
        # those are /tmp/gradio, shared by every Gradio app on the machine, and ./.gradio.
        os.environ.setdefault("GRADIO_TEMP_DIR", own_folder)
        os.environ.setdefault("GRADIO_EXAMPLES_CACHE", os.path.join(own_folder, "cached_examples"))
        # No allowed_paths: the examples are served from Gradio's copies, and nothing else on the disk.
        page(reader, args, examples).launch(server_name=args.host, server_port=args.port, share=False,
                                            auth=tuple(args.auth.split(":", 1)) if args.auth else None,
                                            ssr_mode=False, footer_links=[])


if __name__ == "__main__":
    arguments, = settings.parse(sys.argv[1:], Arguments, program="app.py")
    try:
        main(arguments)
    except (data.DataError, CheckpointError, ValueError, OSError) as error:  # OSError: the port is taken
        if files.is_disk_full(error):  # writing Gradio's copies of the examples; the page's folder is gone
            print(f"app.py: error: the disk is full: {error}. Free some space and run again", file=sys.stderr)
            sys.exit(1)
        print(f"app.py: error: {error}", file=sys.stderr)
        sys.exit(2)
