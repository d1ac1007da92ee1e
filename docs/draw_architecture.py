"""Draw docs/architecture.png: the data flow, and which parts train.

    python docs/draw_architecture.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dsl  # noqa: E402
import files  # noqa: E402
import renderer  # noqa: E402

FROZEN, TRAINS, DATA = (225, 225, 225), (190, 235, 190), (255, 255, 255)
WIDTH, HEIGHT = 1180, 385


def box(draw, xy, title, lines=(), fill=FROZEN):
    draw.rounded_rectangle(xy, radius=10, fill=fill, outline="black", width=2)
    x0, y0, _, _ = xy
    draw.text((x0 + 10, y0 + 8), title, fill="black")
    for i, line in enumerate(lines):
        draw.text((x0 + 10, y0 + 28 + 16 * i), line, fill=(60, 60, 60))


def arrow(draw, start, end):
    draw.line([start, end], fill="black", width=2)
    (x0, _), (x1, y1) = start, end
    if x1 > x0:
        draw.polygon([(x1, y1), (x1 - 10, y1 - 5), (x1 - 10, y1 + 5)], fill="black")
    else:
        draw.polygon([(x1, y1), (x1 - 5, y1 - 10), (x1 + 5, y1 - 10)], fill="black")


def main():
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    example = dsl.parse(open(Path(__file__).parent.parent / "example.dsl.txt").read())
    picture = renderer.render(example, 120)
    image.paste(picture, (20, 60))
    draw.text((20, 40), "image", fill="black")
    arrow(draw, (145, 120), (180, 120))
    box(draw, (180, 50, 380, 190), "CLIP ViT-B-32 (frozen)", ["256 px -> 8x8 patch tokens", "of block 1, 2x2 merged:",
                                                               "16 tokens x 3072", "computed once per image,",
                                                               "cached for training"])
    arrow(draw, (380, 120), (415, 120))
    box(draw, (415, 50, 615, 190), "Projector (trains)", ["z-score per position and", "channel (train stats),",
                                                           "LayerNorm, Linear-GELU-", "Linear -> 16 x 576"], TRAINS)
    arrow(draw, (615, 120), (650, 120))
    box(draw, (650, 30, 940, 250), "LLM (frozen weights)", ["SmolLM2-135M (embedded) or", "Llama-3.1-8B (reference)"])
    box(draw, (665, 100, 925, 150), "LoRA on q_proj, v_proj (trains)", ["r=8, alpha=32, dropout 0.1"], TRAINS)
    box(draw, (665, 160, 925, 235), "14 new token embeddings (trains)", ["12 DSL tags, <start_of_image>,",
                                                                         "<end_of_image>; output rows too",
                                                                         "when untied"], TRAINS)
    arrow(draw, (940, 120), (975, 120))
    box(draw, (975, 50, 1165, 190), "DSL tags", ["greedy, batched decoding", "restricted by the grammar", "(dsl.next_tags)",
                                                  "-> dsl.parse -> canonical", "text"], DATA)
    draw.text((20, 280), "Prompt (left-padded batch; the loss is on the target's tags only):", fill="black")
    draw.text((20, 302), "<instruction>  ( <start_of_image> [16 image embeddings] <end_of_image> <example's tags> )"
                         " x num_shots  <start_of_image> [16] <end_of_image>  ->  <StartDiagram> <Large> <Circle> "
                         "<TopLeft> ... <EndDiagram>", fill=(60, 60, 60))
    for i, (fill, label) in enumerate([(TRAINS, "trains"), (FROZEN, "frozen")]):
        draw.rectangle((20 + 120 * i, 350, 40 + 120 * i, 370), fill=fill, outline="black")
        draw.text((48 + 120 * i, 355), label, fill="black")
    with files.replacing(Path(__file__).parent / "architecture.png") as temporary:
        image.save(temporary)


if __name__ == "__main__":
    main()
