"""Read diagrams with a model that export.py wrote, using none of the training repo's code.

    python read.py MODEL_FOLDER picture.png [more.png ...]

Needs torch, transformers, open_clip_torch, safetensors and pillow. Greedy decoding, one
picture at a time; prints each picture's DSL.
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


def load(folder: Path):
    config = json.loads((folder / "reader_config.json").read_text())
    open_clip.add_model_config(folder / "clip" / f"{config['clip_model']}.json")  # the encoder's architecture
    clip = open_clip.create_model(config["clip_model"], pretrained=None, force_image_size=config["image_size"])
    clip.visual.load_state_dict(load_file(folder / "vision.safetensors"), strict=False)  # blocks after the one read are unused
    p = config["preprocess"]
    preprocess = open_clip.image_transform(p["size"], False, p["mean"], p["std"], p["resize_mode"], p["interpolation"], p["fill_color"])
    llm = AutoModelForCausalLM.from_pretrained(folder / "llm", dtype=getattr(torch, config["dtype"])).eval()
    return config, clip.visual.eval(), preprocess, load_file(folder / "projector.safetensors"), llm, AutoTokenizer.from_pretrained(folder / "llm")


def image_tokens(picture: Image.Image, config, visual, preprocess, projector) -> torch.Tensor:
    """CLIP's patch tokens of one block, k x k neighbours merged, then the projector: [T, hidden]."""
    out = visual.forward_intermediates(preprocess(picture.convert("RGB"))[None], indices=[config["clip_layer"]],
                                       stop_early=True, intermediates_only=True, output_fmt="NLC")
    tokens = out["image_intermediates"][0]
    b, n, width = tokens.shape
    g, k = int(n ** 0.5), config["patch_merge"]
    x = tokens.view(b, g // k, k, g // k, k, width).permute(0, 1, 3, 2, 4, 5).reshape(b, (g // k) ** 2, k * k * width)[0]
    return project(x, projector)


def project(x: torch.Tensor, projector) -> torch.Tensor:
    """The projector: merged patch features [T, D] -> LLM input embeddings [T, hidden]."""
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


@torch.no_grad()
def read(picture: Image.Image, folder: Path, config, visual, preprocess, projector, llm, tokenizer) -> str:
    """The prompt: instruction, each solved example (image, its DSL), then the picture; the model writes its DSL."""
    embed = llm.get_input_embeddings()
    ids = lambda values: embed(torch.tensor(values))
    image = lambda p: [ids([config["image_start_id"]]), image_tokens(p, config, visual, preprocess, projector).to(llm.dtype), ids([config["image_end_id"]])]
    parts = [ids(config["instruction_ids"])]
    for example in config["examples"]:
        parts += image(Image.open(folder / example["image"])) + [ids(example["dsl_ids"])]
    embeddings = torch.cat(parts + image(picture))[None]
    out = llm.generate(inputs_embeds=embeddings, attention_mask=torch.ones(embeddings.shape[:2], dtype=torch.long), do_sample=False,
                       max_new_tokens=config["max_new_tokens"], eos_token_id=config["end_id"], pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0])
    tags = re.findall(r"<[A-Za-z]+>", text)  # the DSL's tags, in the order written
    if len(tags) < 2:
        return text + "\n"
    elements = [tags[i:i + 3] for i in range(1, len(tags) - 1, 3)]
    if config["position_first"]:  # written <Position> <Size> <Shape>: the DSL's lines say <Size> <Shape> <Position>
        elements = [e[1:] + e[:1] for e in elements]
    return "\n".join([tags[0], *("  " + " ".join(e) for e in elements), *tags[-1:]]) + "\n"


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    model = load(folder)
    for path in sys.argv[2:]:
        print(f"# {path}\n{read(Image.open(path), folder, *model)}", end="")
