"""Read diagrams with a model that export.py wrote, using none of the training repo's code.

    python read.py MODEL_FOLDER picture.png [more.png ...]

Needs torch, transformers, open_clip_torch, safetensors and pillow. Reads as the repo's
inference.py does: a batch of pictures at a time, greedy decoding that follows the DSL's
grammar (only the tags it allows next), each picture's DSL printed as canonical text.
"""
import json
import re
import sys
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

BATCH = 128  # pictures decoded together: every prompt has the same length, so no padding
TAG = re.compile(r"<[^<>\s]*>")


class Reader:
    """The exported model: CLIP's image tower up to the block it reads, the projector, the LLM."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.config = config = json.loads((self.folder / "reader_config.json").read_text())
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        open_clip.add_model_config(self.folder / "clip" / f"{config['clip_model']}.json")  # the tower's architecture
        clip = open_clip.create_model(config["clip_model"], pretrained=None, force_image_size=config["image_size"])
        clip.visual.load_state_dict(load_file(self.folder / "vision.safetensors"), strict=False)  # deeper blocks never run
        self.visual = clip.visual.eval().to(self.device)
        p = config["preprocess"]
        self.preprocess = open_clip.image_transform(p["size"], False, p["mean"], p["std"], p["resize_mode"], p["interpolation"], p["fill_color"])
        self.projector = load_file(self.folder / "projector.safetensors", device=str(self.device))
        attention = "eager" if self.device.type == "cpu" else "sdpa"  # eager is the faster on a CPU for prompts this short
        self.llm = AutoModelForCausalLM.from_pretrained(self.folder / "llm", dtype=getattr(torch, config["dtype"]), attn_implementation=attention).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder / "llm")

    def image_tokens(self, pictures: list[Image.Image]) -> torch.Tensor:
        """Pictures -> image tokens [B, T, hidden]: one block's patch tokens, k x k neighbours merged, projected."""
        pixels = torch.stack([self.preprocess(picture) for picture in pictures]).to(self.device)
        if self.config["image_features"] == "pooled":  # the single CLIP embedding
            return project(self.visual(pixels)[:, None].float(), self.projector).to(self.llm.dtype)
        out = self.visual.forward_intermediates(pixels, indices=[self.config["clip_layer"]], stop_early=True, intermediates_only=True, output_fmt="NLC")
        x = out["image_intermediates"][0]
        b, n, width = x.shape
        g, k = int(n ** 0.5), self.config["patch_merge"]
        x = x.view(b, g // k, k, g // k, k, width).permute(0, 1, 3, 2, 4, 5).reshape(b, (g // k) ** 2, k * k * width)
        return project(x.float(), self.projector).to(self.llm.dtype)

    def allowed(self, _row: int, written: torch.Tensor) -> list[int]:
        """The grammar as token ids; a finished row may only repeat <EndDiagram> (generate pads it)."""
        tags, grammar = self.tokenizer.convert_ids_to_tokens(written.tolist()), self.config["grammar"]
        if grammar["end"] in tags:
            return [self.config["end_id"]]
        return self.tokenizer.convert_tokens_to_ids(next_tags(tags, grammar, self.config["position_first"]))

    @torch.no_grad()
    def read(self, pictures: list[Image.Image]) -> list[str]:
        """Each picture's DSL. The prompt: the instruction, each solved example (its picture, its DSL), the picture."""
        c, embed = self.config, lambda ids: self.llm.get_input_embeddings()(torch.tensor(ids, device=self.device))
        marked = lambda tokens: [embed([c["image_start_id"]]), tokens, embed([c["image_end_id"]])]
        prompt = [embed(c["instruction_ids"])]
        if c["examples"]:
            shown = self.image_tokens([open_picture(self.folder / e["image"]) for e in c["examples"]])
            for tokens, example in zip(shown, c["examples"]):
                prompt += marked(tokens) + [embed(example["dsl_ids"])]
        texts = []
        for start in range(0, len(pictures), BATCH):
            rows = torch.stack([torch.cat(prompt + marked(tokens)) for tokens in self.image_tokens(pictures[start:start + BATCH])])
            out = self.llm.generate(inputs_embeds=rows, attention_mask=torch.ones(rows.shape[:2], dtype=torch.long, device=self.device),
                                    do_sample=False, num_beams=1, max_new_tokens=c["max_new_tokens"], eos_token_id=c["end_id"],
                                    pad_token_id=self.tokenizer.pad_token_id, prefix_allowed_tokens_fn=self.allowed if c["target_format"] != "text" else None)
            rows = [row[:row.index(c["end_id"]) + 1] if c["end_id"] in row else row for row in out.tolist()]
            texts += [canonical(self.tokenizer.decode(row), c["grammar"], c["position_first"]) for row in rows]
        return texts


def project(x: torch.Tensor, projector) -> torch.Tensor:
    """The projector: merged patch features [..., T, D] -> LLM input embeddings [..., T, hidden]."""
    x = ((x - projector["feature_mean"]) / projector["feature_std"]).unflatten(-1, (-1, projector["norm.weight"].shape[0]))
    x = F.layer_norm(x, x.shape[-1:], projector["norm.weight"], projector["norm.bias"])  # per CLIP patch
    if "patch.weight" in projector:  # patch_mlp: one map for every patch, then two layers with GELUs
        x = F.gelu(F.linear(x, projector["patch.weight"], projector["patch.bias"]).flatten(-2))
        x = F.linear(F.gelu(F.linear(x, projector["mlp.1.weight"], projector["mlp.1.bias"])), projector["mlp.3.weight"], projector["mlp.3.bias"])
    elif "mlp.weight" in projector:  # linear
        x = F.linear(x.flatten(-2), projector["mlp.weight"], projector["mlp.bias"])
    else:  # mlp2x_gelu: LLaVA's two layers with a GELU between
        x = F.linear(F.gelu(F.linear(x.flatten(-2), projector["mlp.0.weight"], projector["mlp.0.bias"])), projector["mlp.2.weight"], projector["mlp.2.bias"])
    return x + projector["positions"] if "positions" in projector else x


def next_tags(tags: list[str], grammar: dict, position_first: bool) -> list[str]:
    """The DSL's grammar (the repo's dsl.next_tags): the tags that may follow a valid prefix. Positions
    come in order, so a new element may start only while a later position is free."""
    if not tags:
        return [grammar["start"]]
    kind = next((kind for kind in ("sizes", "shapes", "positions") if tags[-1] in grammar[kind]), tags[-1])
    placed = [grammar["positions"].index(tag) for tag in tags if tag in grammar["positions"]]
    free = grammar["positions"][placed[-1] + 1:] if placed else grammar["positions"]
    sizes, shapes, end = grammar["sizes"], grammar["shapes"], grammar["end"]
    if position_first:  # each element <Position> <Size> <Shape>
        following = {grammar["start"]: free, "positions": sizes, "sizes": shapes, "shapes": free + [end]}
    else:
        following = {grammar["start"]: sizes, "sizes": shapes, "shapes": free, "positions": (sizes if free else []) + [end]}
    return following.get(kind, [])  # after <EndDiagram>: nothing


def canonical(text: str, grammar: dict, position_first: bool) -> str:
    """The canonical text (one element a line, in position order) of what the model wrote; a text that is no diagram as it is."""
    tags = TAG.findall(text)
    elements = [tags[i:i + 3] for i in range(1, len(tags) - 1, 3)]
    if position_first:  # written <Position> <Size> <Shape>
        elements = [element[1:] + element[:1] for element in elements]
    elements.sort(key=lambda element: grammar["positions"].index(element[-1]) if element[-1] in grammar["positions"] else -1)
    ordered = tags[:1] + [tag for element in elements for tag in element] + tags[-1:]
    # In position order, the grammar tells whether the tags are a diagram; whitespace is all else there may be.
    if TAG.sub("", text).strip() or ordered[-1:] != [grammar["end"]] or \
            any(tag not in next_tags(ordered[:i], grammar, False) for i, tag in enumerate(ordered)):
        return text
    return "\n".join([grammar["start"], *("  " + " ".join(element) for element in elements), grammar["end"]]) + "\n"


def open_picture(path: str) -> Image.Image:
    """A picture file as RGB, transparent parts as the white background."""
    with Image.open(path) as image:
        if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
            return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")


def fail(*lines: str):
    print(*lines, sep="\n", file=sys.stderr)
    sys.exit(2)  # called wrong, as argparse says it


if __name__ == "__main__":
    if len(sys.argv) < 3:
        fail("usage: python read.py MODEL_FOLDER PICTURE [PICTURE ...]")
    folder, paths, pictures, problems = Path(sys.argv[1]), sys.argv[2:], [], []
    if not (folder / "reader_config.json").is_file():
        fail(f"read.py: error: {folder} is not a folder that export.py wrote (it has no reader_config.json)")
    for path in paths:
        try:
            pictures.append(open_picture(path))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            problems.append(f"read.py: error: {path}: cannot be opened as a picture ({error})")
    if problems:
        fail(*problems)
    for path, text in zip(paths, Reader(folder).read(pictures)):
        print(f"# {path}\n{text.rstrip()}")
