"""Read pictures with a model that export.py wrote, using none of the training repo's code.

    python read.py MODEL_FOLDER picture.png [more.png ...]

Needs torch, transformers, open_clip_torch, safetensors, pillow and xgrammar. Reads as the
repo's inference.py --ink_margin 0 --find_canvas false does (the model alone): a batch of pictures at a time, greedy decoding that follows the
DSL's grammar file (grammar.py, looks.py and the DSL's module are in this folder), each picture's
text printed in the DSL's canonical form.
"""
import importlib.util
import json
import sys
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

BATCH = 128  # pictures decoded together: every prompt has the same length, so no padding


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
        # The DSL: its own module (canonical form) and grammar file, and the repo's grammar.py (constrained
        # decoding), all copied into the folder by export.py.
        self.dsl = load_module(self.folder / config["dsl_module"]) if config["dsl_module"] else None
        self.decoding = load_module(self.folder / "grammar.py")
        self.looks = load_module(self.folder / "looks.py")
        self.grammar = self.decoding.Grammar.from_file(self.folder / config["grammar"]) if config["grammar"] else None

    def image_tokens(self, pictures: list[Image.Image]) -> torch.Tensor:
        """Pictures -> image tokens [B, T, hidden]: one block's patch tokens (or the pooled embedding), projected."""
        look = self.config.get("image_look", "as_is")  # as the repo's looks.py (this folder's copy) has it
        pixels = torch.stack([self.preprocess(self.looks.look(picture, look)) for picture in pictures]).to(self.device)
        if self.config["image_features"] == "pooled":  # the single CLIP embedding
            return project(self.visual(pixels)[:, None].float(), self.projector, 1).to(self.llm.dtype)
        out = self.visual.forward_intermediates(pixels, indices=[self.config["clip_layer"]], stop_early=True, intermediates_only=True, output_fmt="NLC")
        return project(out["image_intermediates"][0].float(), self.projector, self.config["patch_merge"]).to(self.llm.dtype)

    @torch.no_grad()
    def read(self, pictures: list[Image.Image]) -> list[str]:
        """Each picture's DSL text (canonical where it is valid). The prompt: the instruction, each solved
        example (its picture, its DSL), the picture."""
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
            rules = [self.decoding.logits_processor(self.grammar, self.tokenizer, len(rows), c["end_id"])] if self.grammar else []
            out = self.llm.generate(inputs_embeds=rows, attention_mask=torch.ones(rows.shape[:2], dtype=torch.long, device=self.device),
                                    do_sample=False, num_beams=1, max_new_tokens=c["max_new_tokens"], eos_token_id=c["end_id"],
                                    pad_token_id=self.tokenizer.pad_token_id, logits_processor=rules)
            for row in out.tolist():  # up to the end token; without it where the DSL's texts do not end with one
                row = row[:row.index(c["end_id"]) + (not c["appends_end"])] if c["end_id"] in row else row
                texts.append(self.canonical(self.from_target(self.tokenizer.decode(row))))
        return texts

    def canonical(self, text: str) -> str:
        """The DSL's canonical form (its own module's), or the text as it is where it is not valid."""
        if self.dsl is None:  # free text: its lines
            return "\n".join(line.rstrip() for line in text.strip().splitlines())
        try:
            return self.dsl.canonical(text)
        except ValueError:
            return text

    def from_target(self, text: str) -> str:
        return self.dsl.from_target(text) if hasattr(self.dsl, "from_target") else text


def merge_patches(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, g * g, D] patch tokens, row by row -> [B, (g / k)^2, k * k * D]: each k x k block of neighbours as one token."""
    b, n, width = x.shape
    g = int(n ** 0.5)
    return x.view(b, g // k, k, g // k, k, width).transpose(2, 3).reshape(b, (g // k) ** 2, k * k * width)


def project(x: torch.Tensor, projector, patch_merge: int) -> torch.Tensor:
    """The projector: patch features [B, g * g, D] -> LLM input embeddings [B, T, hidden], k x k patches a token."""
    x = merge_patches(x, patch_merge)
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


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"exported_{path.stem}", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


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
