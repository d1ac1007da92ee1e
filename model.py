"""The model: a frozen CLIP vision encoder, a projector, and a causal LM with LoRA.

    image -> CLIP ViT (frozen) -> features [T, D] -> projector -> [T, hidden] -> LLM -> DSL tags

The prompt, LLaVA-style, with `num_shots` solved examples before the target:

    <instruction> (<start_of_image> [T image embeddings] <end_of_image> <example DSL>)* <start_of_image> [T] <end_of_image>

and the model continues with the target's DSL (languages.py: any DSL plug-in), up to its end
token. Training puts the loss on the target DSL, and (quadrant_loss, for a DSL that names
what each region of a picture holds) on a small head that names it from the projector's
tokens alone: a direct signal from which the projector learns to see sooner than from the
LLM's loss alone. What trains: the projector with that head, the LoRA adapters and the
embeddings of the new tokens (the DSL's own, and the two image markers); the vision encoder
and the LLM's own weights stay frozen.

`DiagramReader.save_pretrained` / `DiagramReader.from_pretrained` are the model's
save/load pair; checkpoint.py adds what a training run keeps beside it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from peft import PeftModel, prepare_model_for_kbit_training
from safetensors.torch import load_file, save_file
from torch import nn

import data
import grammar
import language_model
import languages
from language_model import IMAGE_END, IMAGE_START
from settings import check, setting

IMAGE_SLOT = -1  # input id of a position that holds an image embedding instead of a token's
IGNORE = -100  # label of a position without loss

TARGET_FORMATS = ("tags", "text")
# Pictures decoded together. On a CPU 256 pictures take 9 s at 128, 12 at 64 and 17 at 32:
# the rows are short, so a small batch leaves the matmuls little to do.
READ_BATCH = 128
PROJECTORS = ("patch_mlp", "mlp2x_gelu", "linear")
PATCH_CODE = 64  # patch_mlp: numbers per patch after the shared map


@dataclass
class ModelConfig:
    """Everything it takes to rebuild the model: saved with every checkpoint as config.json.
    The defaults are the embedded CPU configuration; configs/llama3-8b.yaml is the reference one."""

    dsl: str = setting("diagram", "the DSL the model writes: diagram, mermaid, text, or a plug-in's "
                                  ".py file or module")

    llm: str = setting(language_model.SMOLLM2, "smollm2 (embedded), a hub id, a folder, a .gguf file, or "
                                               "llama3.1-8b-shape (random weights)")
    llm_layers: int = setting(0, "keep the LLM's first N decoder layers (0: all): each costs time and memory")
    clip_model: str = setting("ViT-B-32", "an open_clip architecture, or a .json file of one")
    clip_pretrained: str = setting("none", "open_clip weights (laion2b_s34b_b79k), a local file, or none: "
                                           "random weights (no hub here)")
    clip_seed: int = setting(0, "seeds the random CLIP weights when clip_pretrained is none")
    image_features: str = setting("patches", "patches: one block's patch tokens (LLaVA); pooled: the single "
                                             "CLIP embedding (1 token)")
    clip_layer: int = setting(1, "the block whose patch tokens are read (-2: LLaVA's penultimate)")
    image_size: int = setting(256, "CLIP's input side in px (0: its own); 256: each quadrant 4x4 ViT-B-32 patches")
    patch_merge: int = setting(4, "merge each k x k block of patch tokens into one (4 at 256 px: a token a quadrant)")
    projector: str = setting("patch_mlp", "patch_mlp (one map for every patch: fewer pictures), "
                                          "mlp2x_gelu (LLaVA's), linear")
    image_positions: bool = setting(False, "add a learned embedding per image token: where it is (z-scoring "
                                           "removes CLIP's)")
    lora_r: int = setting(8, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA scale numerator (the update is scaled by alpha / r)")
    lora_dropout: float = setting(0.1, "dropout on the LoRA input")
    lora_target_modules: list[str] = setting(["q_proj", "v_proj"], "the LLM's linear layers that get adapters")
    num_shots: int = setting(0, "solved examples (image and DSL) in the prompt before the target image")
    instruction: str = setting("Read the diagram.", "the prompt's text; short: every token costs time in "
                                                    "every step")
    quadrant_loss: float = setting(3.0, "weight (in DSL tokens) of a loss teaching the projector what each "
                                        "region holds; 0: off")
    target_format: str = setting("tags", "tags: what the DSL says the model writes (diagram: tags alone); "
                                         "text: the canonical text")

    def __post_init__(self):
        """Each setting's range, checked when the settings are parsed: before data or models load."""
        try:
            language = languages.load(self.dsl)
        except ValueError as error:
            check(False, "dsl", self.dsl, str(error))
        check(not self.quadrant_loss or picture_head(language) is not None, "quadrant_loss", self.quadrant_loss,
              f"0: the DSL {self.dsl} names nothing a picture holds (regions or contents) for that loss to learn")
        check(self.llm_layers >= 0, "llm_layers", self.llm_layers, "a number of layers, or 0 for all")
        check(self.image_features in ("patches", "pooled"), "image_features", self.image_features,
              "patches or pooled")
        check(self.projector in PROJECTORS, "projector", self.projector, ", ".join(PROJECTORS))
        check(self.target_format in TARGET_FORMATS, "target_format", self.target_format, ", ".join(TARGET_FORMATS))
        check(self.image_size >= 0, "image_size", self.image_size, "a side in pixels, or 0 for the encoder's own")
        check(self.patch_merge >= 1, "patch_merge", self.patch_merge, "at least 1 (1: no merging)")
        check(self.lora_r >= 1, "lora_r", self.lora_r, "a rank of at least 1")
        check(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "greater than 0")
        check(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "a probability from 0 to below 1")
        check(len(self.lora_target_modules) > 0, "lora_target_modules", "(none)", "at least one layer name")
        check(0 <= self.num_shots <= 8, "num_shots", self.num_shots, "from 0 to 8 solved examples")
        check(self.quadrant_loss >= 0, "quadrant_loss", self.quadrant_loss, "a weight of 0 (off) or more")
        if self.image_features == "patches":
            self._check_patch_grid()

    def _check_patch_grid(self):
        """image_size and patch_merge against the encoder's patch size, read from open_clip's
        config of the architecture (no weights loaded)."""
        if self.clip_model.endswith(".json"):
            path = Path(self.clip_model)
            check(path.is_file(), "clip_model", self.clip_model, "no such file")
            vision = json.loads(path.read_text()).get("vision_cfg", {})
        else:
            vision = (open_clip.get_model_config(self.clip_model) or {}).get("vision_cfg")
            check(vision is not None, "clip_model", self.clip_model,
                  f"not an open_clip architecture (e.g. {', '.join(open_clip.list_models()[:3])}, ...)")
        patch, side = vision.get("patch_size"), self.image_size or vision.get("image_size")
        if not isinstance(patch, int) or not isinstance(side, int):
            return  # an architecture described otherwise (timm): the encoder checks itself when built
        check(side % patch == 0, "image_size", self.image_size,
              f"a multiple of {self.clip_model}'s patch size, {patch} px")
        hint = " (ViT-B-32: 256 px makes it 8 x 8)" if self.clip_model == "ViT-B-32" else ""
        check((side // patch) % self.patch_merge == 0, "patch_merge", self.patch_merge,
              f"does not divide the {side // patch} x {side // patch} patch grid of {side} px images{hint}")

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


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
        self.architecture = open_clip.get_model_config(name)  # open_clip's config: what export.py writes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.clip_seed)  # random weights, the same ones every time
            clip, _, self.preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, force_image_size=config.image_size or None)
        self.visual = clip.visual.eval().requires_grad_(False)  # the text tower is not needed
        self.features = config.image_features
        blocks = len(self.visual.transformer.resblocks)
        self.layer = config.clip_layer % blocks
        self.merge = config.patch_merge
        self.patches_per_token = self.merge ** 2 if self.features == "patches" else 1
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
    def encode(self, images: list[Image.Image | Path], batch_size: int = 64, progress=None) -> torch.Tensor:
        """Features of images (PIL images or files), [N, T, D] float32 on the CPU. Files are
        decoded and preprocessed by a pool of threads while the encoder runs (PIL releases
        the GIL), a batch at a time."""
        from concurrent.futures import ThreadPoolExecutor

        device = next(self.visual.parameters()).device

        def pixels(image):
            return self.preprocess(image.convert("RGB") if isinstance(image, Image.Image) else data.load_image(image))

        chunks = []
        with ThreadPoolExecutor(max_workers=2) as pool:
            batches = [images[start:start + batch_size] for start in range(0, len(images), batch_size)]
            pending = pool.map(lambda batch: torch.stack(list(map(pixels, batch))), batches)
            for batch in pending:
                chunks.append(self(batch.to(device)).float().cpu())
                if progress is not None:
                    progress.update(len(batch))
        return torch.cat(chunks) if chunks else torch.zeros(0, *self.feature_shape)

    def flops_per_image(self) -> int:
        """The encoder's FLOPs for one picture, counted by torch's FlopCounterMode."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self(torch.zeros(1, 3, *self.visual.image_size, device=next(self.visual.parameters()).device))
        return counter.get_total_flops()

    def identity(self) -> dict:
        """What a checkpoint records to recognise these weights later."""
        return {"clip_fingerprint": fingerprint(self.visual.parameters()), "feature_shape": list(self.feature_shape)}


def fingerprint(tensors) -> float:
    """A checksum of weights: tells whether two models are the same (random ones included)."""
    return float(sum(t.detach().double().abs().sum() for t in tensors))


# ---------------------------------------------------------------------------- projector

class Projector(nn.Module):
    """CLIP features [B, T, D] -> LLM input embeddings [B, T, hidden].

    First z-scores each position and channel with statistics of the training
    images (buffers, saved with the weights), then a LayerNorm (per CLIP patch for
    patch_mlp, over the whole token otherwise): features of a frozen encoder vary
    little across images against their overall scale (a random ViT's pooled vector
    is ~95% constant), and fed raw the LLM learns the output format and ignores
    the image. patch_mlp then maps every patch with one shared linear layer
    before the MLP mixes a token's patches: a shape looks the same in whichever
    patch it falls, so what one patch learns serves all (measured: docs/LOG.md).
    With quadrant_head, it also carries the linear head of the quadrant loss
    (quadrant_logits), which only training uses.
    """

    def __init__(self, kind: str, feature_shape: tuple[int, int], hidden_size: int,
                 head: tuple[int, int] | None = None, positions: bool = False, patches_per_token: int = 1):
        super().__init__()
        tokens, width = feature_shape
        self.register_buffer("feature_mean", torch.zeros(tokens, width))
        self.register_buffer("feature_std", torch.ones(tokens, width))
        self.patches = patches_per_token if kind == "patch_mlp" else 1
        self.norm = nn.LayerNorm(width // self.patches)  # per patch
        self.patch = None  # patch_mlp's shared map
        if kind == "patch_mlp":
            self.patch = nn.Linear(width // self.patches, PATCH_CODE)
            self.mlp = nn.Sequential(nn.GELU(), nn.Linear(self.patches * PATCH_CODE, hidden_size), nn.GELU(),
                                     nn.Linear(hidden_size, hidden_size))
        elif kind == "mlp2x_gelu":
            self.mlp = nn.Sequential(nn.Linear(width, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        elif kind == "linear":
            self.mlp = nn.Linear(width, hidden_size)
        else:
            raise ValueError(f"projector must be one of {', '.join(PROJECTORS)}, not {kind!r}")
        # head: (grid, classes) of the DSL's picture loss: what each of grid x grid cells holds, or
        # (grid 0) which classes the picture shows anywhere.
        side = math.isqrt(tokens)
        if head and head[0] and (side * side != tokens or side < head[0]):
            raise ValueError(f"quadrant_loss needs the image tokens to form a square grid of at least "
                             f"{head[0]} x {head[0]}, not {tokens} token(s); use image_features patches, "
                             "or quadrant_loss 0")
        self.region_grid = head[0] if head else 0
        self.quadrant_head = nn.Linear(hidden_size, head[1]) if head else None
        # Zero at the start: the tokens begin as the MLP's alone and learn where they are.
        self.positions = nn.Parameter(torch.zeros(tokens, hidden_size)) if positions else None

    @torch.no_grad()
    def set_feature_statistics(self, features: torch.Tensor):
        """features: [N, T, D] of the training images."""
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(features.std(dim=0) + 1e-6)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(self.feature_mean.dtype)
        scored = (features - self.feature_mean) / self.feature_std
        patches = self.norm(scored.unflatten(-1, (self.patches, -1)))  # [B, T, k*k, D / (k*k)]
        if self.patch is not None:
            patches = self.patch(patches)
        tokens = self.mlp(patches.flatten(-2))
        return tokens if self.positions is None else tokens + self.positions

    def quadrant_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """This projector's tokens of images [B, T, hidden] -> [B, grid * grid, classes]: what
        each region holds (the diagram DSL: each quadrant), row by row, read from the mean of
        the tokens over it; with grid 0, [B, classes]: whether the picture shows each class,
        from the token that shows it most. Gradients reach the projector from here directly,
        not only through the LLM: it learns to see faster."""
        if not self.region_grid:
            return self.quadrant_head(tokens).amax(dim=1)
        b, t, h = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, h, math.isqrt(t), math.isqrt(t))
        cells = F.adaptive_avg_pool2d(grid, self.region_grid).flatten(2).transpose(1, 2)  # [B, grid * grid, H]
        return self.quadrant_head(cells)


class CheckpointError(Exception):
    """A checkpoint that is incomplete or was made for another model."""


MODEL_FILES = ("config.json", "base_models.json", "projector.safetensors", "adapter/adapter_config.json",
               "adapter/adapter_model.safetensors")
IDENTITY_NAMES = {"clip_fingerprint": "CLIP weights", "feature_shape": "CLIP feature shape",
              "llm_hidden_size": "LLM hidden size", "vocab_size": "vocabulary size", "llm_fingerprint": "LLM weights"}


# ---------------------------------------------------------------------------- the whole model

class DiagramReader(nn.Module):
    """Vision encoder (frozen) + projector + LLM with LoRA, and the solved examples its
    prompt shows. Training feeds cached vision features to `forward`; `read` reads vision
    features (vision.encode makes them), `read_images` reads pictures."""

    def __init__(self, config: ModelConfig, vision: VisionEncoder, projector: Projector, llm, tokenizer,
                 llm_fingerprint: float, examples: list[tuple[Image.Image, str]] = ()):
        super().__init__()
        self.config, self.vision, self.projector, self.llm, self.tokenizer = config, vision, projector, llm, tokenizer
        self.language = languages.load(config.dsl)
        self.llm_fingerprint = llm_fingerprint  # of the base LLM's input embeddings, new rows included
        self.examples = list(examples)
        self.image_tokens = projector.feature_mean.shape[0]
        ids = tokenizer.convert_tokens_to_ids
        self.image_start_id, self.image_end_id = ids(IMAGE_START), ids(IMAGE_END)
        # A DSL whose texts end with a token of their own (the diagram DSL's <EndDiagram>) stops
        # there; any other gets the LLM's end-of-text token after its target.
        self.appends_end = self.language.part("END") is None
        self.end_id = tokenizer.eos_token_id if self.appends_end else ids(self.language.part("END"))
        self.instruction_ids = tokenizer(config.instruction).input_ids  # with BOS where the tokenizer adds one
        grammar_file = self.language.grammar_file
        self.grammar = grammar.Grammar.from_file(grammar_file) if grammar_file else None
        longest = self.language.part("LONGEST")
        # Generation's limit: the longest text's tokens, and a few more for a text a little longer.
        self.max_new_tokens = (len(self.dsl_ids(longest)) if longest else languages.DEFAULT_LONGEST_TOKENS) + 8

    @classmethod
    def build(cls, config: ModelConfig, dtype=torch.float32, load_in_4bit: bool = False) -> "DiagramReader":
        """A fresh model for training: LoRA adapters and new tokens on the pretrained LLM
        (QLoRA with load_in_4bit). The projector's feature statistics are set later, from the
        training images."""
        vision, llm, tokenizer, base = load_base_models(config, dtype, load_in_4bit)
        language = languages.load(config.dsl)
        new_ids = tokenizer.convert_tokens_to_ids(language_model.new_tokens(language.tokens))
        llm = language_model.with_lora(llm, new_ids, config, load_in_4bit)
        projector = Projector(config.projector, vision.feature_shape, llm.config.hidden_size,
                              head=picture_head(language) if config.quadrant_loss > 0 else None,
                              positions=config.image_positions, patches_per_token=vision.patches_per_token)
        return cls(config, vision, projector, llm, tokenizer, base)

    # -- checkpoints: the save/load pair

    def save_pretrained(self, folder: str | Path):
        """The adapter (PEFT's format), the projector (safetensors), the tokenizer, config.json
        (ModelConfig), base_models.json (what identifies the base models) and the
        solved examples that the prompt shows."""
        folder = Path(folder)
        # The new tokens' rows travel as PEFT trainable tokens; the rest of the (resized) embedding
        # matrices is the base model's, so PEFT must not save them whole (1 GB for Llama 3.1).
        self.llm.save_pretrained(folder / "adapter", save_embedding_layers=False)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.projector.state_dict().items()},
                  folder / "projector.safetensors")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        (folder / "examples").mkdir(exist_ok=True)
        for i, (image, text) in enumerate(self.examples):
            image.save(folder / "examples" / f"{i}.png")
            (folder / "examples" / f"{i}.dsl.txt").write_text(text)
        (folder / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        identity = {**self.vision.identity(), "llm_hidden_size": self.llm.config.hidden_size,
                    "vocab_size": len(self.tokenizer), "llm_fingerprint": self.llm_fingerprint}
        (folder / "base_models.json").write_text(json.dumps(identity, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype=torch.float32, llm_name: str = "",
                        trainable: bool = False, load_in_4bit: bool = False, merge: bool = False) -> "DiagramReader":
        """A saved model (a checkpoint folder, or a run's `best` pointer), for inference or
        (trainable) to resume training; `llm_name` loads
        the base LLM from elsewhere than config.json says (the same model, moved). `merge`
        folds the adapter and the new rows into the base weights, for reading only: no adapter
        work per token and no copy of the embedding matrix per step. Refuses,
        with a CheckpointError that says why, a checkpoint whose files are missing or whose
        base LLM or CLIP cannot be loaded or differ from the ones it was trained with."""
        folder = Path(folder)
        if folder.is_file() and folder.name == "best":  # a run's pointer: "checkpoints/best"
            folder = folder.parent / folder.read_text().strip()
        missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{folder} is not a complete checkpoint: missing {', '.join(missing)}")
        config = ModelConfig.from_dict(read_json(folder / "config.json"))
        config.llm = llm_name or config.llm
        vision, llm, tokenizer, base = load_base_models(config, dtype, load_in_4bit,
                                                        identity=read_json(folder / "base_models.json"))
        if load_in_4bit and trainable:
            llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
        llm = PeftModel.from_pretrained(llm, folder / "adapter", is_trainable=trainable)
        if merge and not trainable:
            llm = llm.merge_and_unload()
        weights = load_file(folder / "projector.safetensors")
        # A checkpoint without a quadrant head (quadrant_loss 0, or older) goes on training without the loss.
        projector = Projector(config.projector, vision.feature_shape, llm.config.hidden_size,
                              head=picture_head(languages.load(config.dsl)) if config.quadrant_loss > 0
                              and "quadrant_head.weight" in weights else None, positions="positions" in weights,
                              patches_per_token=vision.patches_per_token)
        projector.load_state_dict(weights)
        examples = [(Image.open(folder / "examples" / f"{i}.png").convert("RGB"),
                     (folder / "examples" / f"{i}.dsl.txt").read_text()) for i in range(config.num_shots)]
        return cls(config, vision, projector, llm, tokenizer, base, examples)

    def use_attention_for(self, device: torch.device) -> "DiagramReader":
        """Plain (eager) attention on a CPU: for these short sequences (~30 tokens) torch's
        fused CPU kernel is slower, its backward most of all (measured: a bfloat16 training
        step ~10% faster, float32 the same within noise, inference's 200 test images 17 -> 14 s);
        PyTorch's fused SDPA, the default, on a GPU."""
        self.llm.set_attn_implementation("eager" if device.type == "cpu" else "sdpa")
        return self

    # -- prompts

    def dsl_ids(self, text: str) -> list[int]:
        """The target tokens of a DSL text, up to and including its end token (generation stops
        there): what the DSL says the model writes, or its canonical text (target_format)."""
        target = (self.language.canonical(text).rstrip() if self.config.target_format == "text"
                  else self.language.target(text))
        ids = self.tokenizer(target, add_special_tokens=False).input_ids
        return ids + [self.end_id] if self.appends_end else ids

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
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "images": images}
        if targets is not None and self.projector.quadrant_head is not None:
            batch["quadrants"] = picture_targets(self.language, targets)
        return batch

    # -- forward

    def embed(self, input_ids: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """Token embeddings, with the projector's image tokens [B, images, T, hidden] in the
        IMAGE_SLOT positions."""
        embeddings = self.llm.get_input_embeddings()(input_ids.clamp(min=0))
        slots = input_ids == IMAGE_SLOT
        return embeddings.masked_scatter(slots[..., None], projected.flatten(1, 2).to(embeddings.dtype))

    def forward(self, input_ids, attention_mask, labels, images, quadrants=None) -> torch.Tensor:
        """Cross-entropy per target token. Given the quadrants' classes (collate adds them when
        the projector has a quadrant head), each quadrant's cross-entropy joins the sum,
        weighted by quadrant_loss; the total stays a sum over the batch divided by its target
        tokens, so micro-batches weighted by their share of those tokens add up to the batch."""
        projected = self.projector(images)  # [B, images, T, hidden]: once, for the LLM and the quadrant head
        embeddings = self.embed(input_ids, projected)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
        # Targets sit at the end of every row (left padding), so logits are needed only there:
        # computing them over the whole prompt would cost a vocabulary-sized matmul per position.
        # The positions go as a tensor, not a count: the LLM gathers them into one block, where
        # a slice of them sent the matmul, under no_grad, down a path that copies the embedding
        # matrix once per row (a validation forward cost 2.7 training forwards; docs/LOG.md).
        first_label = int((labels != IGNORE).int().argmax(dim=1).min())
        positions = torch.arange(first_label - 1, labels.shape[1], device=labels.device)
        logits = self.llm(inputs_embeds=embeddings, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=positions).logits
        targets = labels[:, first_label:].flatten()
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets, ignore_index=IGNORE, reduction="sum")
        if quadrants is not None:
            loss = loss + self.config.quadrant_loss * picture_loss(self.projector, projected[:, -1], quadrants, "sum")
        return loss / (targets != IGNORE).sum()

    # -- generation: the one path that validation, inference and the benchmark share

    @torch.no_grad()
    def generate(self, images: torch.Tensor, example_dsls: list[list[str]],
                 constrained: bool = True) -> tuple[list[str], list[float]]:
        """Greedy, batched, KV-cached decoding of image features [B, shots + 1, T, D].
        Returns the raw texts up to the end token and each one's confidence: the lowest
        probability the model gave to a token it chose. `constrained` lets the DSL's grammar
        file decide which tokens may come next (for what the DSL says the model writes: not
        with target_format text)."""
        batch = self.collate(images, example_dsls)
        device = self.projector.feature_mean.device
        embeddings = self.embed(batch["input_ids"].to(device), self.projector(batch["images"].to(device)))
        rules = self.grammar if constrained and self.config.target_format != "text" else None
        processors = [grammar.logits_processor(rules, self.tokenizer, len(embeddings), self.end_id)] if rules else []
        out = self.llm.generate(inputs_embeds=embeddings, attention_mask=batch["attention_mask"].to(device),
                                max_new_tokens=self.max_new_tokens,
                                do_sample=False, num_beams=1, eos_token_id=self.end_id,
                                pad_token_id=self.tokenizer.pad_token_id, logits_processor=processors,
                                output_logits=True, return_dict_in_generate=True)
        chosen = out.sequences[:, -len(out.logits):]
        # Probabilities over the whole vocabulary, before the grammar's mask: how sure the model is.
        probabilities = torch.stack(out.logits, dim=1).float().softmax(-1).gather(-1, chosen[..., None])[..., 0]
        texts, confidences = [], []
        for row, row_probabilities in zip(chosen.tolist(), probabilities.tolist()):
            length = row.index(self.end_id) + 1 if self.end_id in row else len(row)
            text = self.tokenizer.decode(row[:length - (self.appends_end and self.end_id in row)],
                                         skip_special_tokens=False)
            texts.append(self.language.from_target(text))
            confidences.append(min(row_probabilities[:length]))
        return texts, confidences

    def prompt_examples(self) -> tuple[torch.Tensor, list[str]]:
        """The solved examples as the prompt shows them: vision features [shots, T, D], DSL texts."""
        return self.vision.encode([image for image, _ in self.examples]), [text for _, text in self.examples]

    @torch.no_grad()
    def read(self, features: torch.Tensor, batch_size: int = READ_BATCH, constrained: bool = True,
             progress=None) -> tuple[list[str], list[float]]:
        """Raw DSL and confidence for the images whose vision features are `features` [N, T, D],
        each after the model's solved examples."""
        self.eval()
        example_features, example_dsls = self.prompt_examples()
        texts, confidences = [], []
        for start in range(0, len(features), batch_size):
            chunk = features[start:start + batch_size]
            images = with_examples(example_features, chunk)
            batch_texts, batch_confidences = self.generate(images, [example_dsls] * len(chunk), constrained)
            texts += batch_texts
            confidences += batch_confidences
            if progress is not None:
                progress.update(len(chunk))
        return texts, confidences

    @torch.no_grad()
    def read_images(self, images: list[Image.Image | str | Path], batch_size: int = READ_BATCH, constrained: bool = True,
                    progress=None) -> list[Reading]:
        """Read pictures (PIL images or files): each one's DSL, confidence and agreement.

            reader = DiagramReader.from_pretrained("checkpoints/best")
            for reading in reader.read_images(["example.png"]):
                print(reading.dsl, reading.confidence, reading.agreement)
        """
        readings = []
        for start in range(0, len(images), 256):  # a chunk of pictures in memory at a time
            pictures = [image.convert("RGB") if isinstance(image, Image.Image) else data.load_image(image)
                        for image in images[start:start + 256]]
            texts, confidences = self.read(self.vision.encode(pictures, progress=progress), batch_size,
                                           constrained, progress=progress)
            agreement = self.language.part("agreement")
            readings += [Reading(self.language.canonical_or_raw(text), self.language.is_valid(text), confidence,
                                 agreement(picture, text) if agreement else None)
                         for picture, text, confidence in zip(pictures, texts, confidences)]
        return readings

    def trainable_parameters(self):
        """(LoRA weights, projector and new-token embeddings): the two learning-rate groups."""
        lora = [p for n, p in self.llm.named_parameters() if p.requires_grad and "lora_" in n]
        rest = [p for n, p in self.llm.named_parameters() if p.requires_grad and "lora_" not in n]
        return lora, rest + list(self.projector.parameters())


@dataclass
class Reading:
    """What the model read in one picture."""

    dsl: str  # the canonical DSL text (the raw output where it does not parse: never with grammar decoding)
    valid: bool  # the text parses as a diagram
    confidence: float  # the lowest probability the model gave to a token it chose
    # Render and compare, for a DSL that has it (diagram: share of quadrants where the picture has
    # ink exactly where the DSL draws an element); None for one without.
    agreement: float | None


def load_base_models(config: ModelConfig, dtype, load_in_4bit: bool = False, identity: dict | None = None):
    """(vision encoder, LLM with the new tokens, tokenizer, the LLM's fingerprint): what build
    and from_pretrained both start from. Given a checkpoint's `identity` (base_models.json),
    each base model is checked against it, and one that cannot be loaded or differs is a
    CheckpointError saying which."""
    try:
        vision = VisionEncoder(config)
    except (OSError, RuntimeError, ValueError) as error:
        if identity is None:
            raise
        raise CheckpointError(f"cannot load the CLIP this checkpoint was trained with "
                              f"({config.clip_model} / {config.clip_pretrained}): {error}") from None
    check_same_models(config, identity or {}, vision.identity())
    try:
        llm, tokenizer = language_model.load_llm(config.llm, dtype, config.llm_layers, load_in_4bit,
                                                 languages.load(config.dsl).tokens)
    except (OSError, ValueError) as error:
        if identity is None:
            raise
        raise CheckpointError(f"cannot load the base LLM {config.llm!r} of this checkpoint: {error}") from None
    base = fingerprint([llm.get_input_embeddings().weight])
    check_same_models(config, identity or {}, {"llm_hidden_size": llm.config.hidden_size,
                                               "vocab_size": len(tokenizer), "llm_fingerprint": base})
    return vision, llm, tokenizer, base


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file, or a CheckpointError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable JSON file ({error})") from None


def check_same_models(config: ModelConfig, saved: dict, actual: dict):
    """Compare the facts a checkpoint recorded about its base models with the ones loaded now."""
    for key, value in actual.items():
        if key not in saved:
            continue  # a fact this checkpoint did not record
        expected = saved[key]
        # Checksums: loose enough for the same weights in another precision (bf16 vs fp32).
        same = (abs(expected - value) <= 1e-4 * abs(expected) if isinstance(value, float) else expected == value)
        if not same:
            source = (f"CLIP {config.clip_model} / {config.clip_pretrained}" if key in ("clip_fingerprint", "feature_shape")
                      else f"the LLM {config.llm}")
            raise CheckpointError(f"this checkpoint was made for another base model: its {IDENTITY_NAMES[key]} is "
                                  f"{expected}, but {source} as loaded here has {value}")


def picture_head(language: languages.Language) -> tuple[int, int] | None:
    """(grid, classes) of the DSL's picture loss: regions(text) names what each of grid x grid cells
    holds; contents(text) (grid 0) which of CONTENT_CLASSES the picture shows; None: neither."""
    if language.part("regions"):
        return language.part("REGION_GRID"), language.part("REGION_CLASSES")
    if language.part("contents"):
        return 0, language.part("CONTENT_CLASSES")
    return None


def picture_targets(language: languages.Language, texts: list[str]) -> torch.Tensor:
    """The picture loss's labels: [B, cells] classes, or [B, classes] 0/1 for contents."""
    if language.part("regions"):
        return torch.tensor([language.part("regions")(text) for text in texts])
    shown = torch.zeros(len(texts), language.part("CONTENT_CLASSES"))
    for row, text in zip(shown, texts):
        row[language.part("contents")(text)] = 1
    return shown


def picture_loss(projector: Projector, tokens: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"):
    """Cross-entropy of each region's class, or each content class's binary cross-entropy."""
    logits = projector.quadrant_logits(tokens).float()
    if projector.region_grid:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
    # A picture shows few of the classes: each shown one weighs as much as all the others together.
    balance = (targets.numel() - targets.sum()) / targets.sum().clamp(min=1)
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=balance, reduction=reduction)


def with_examples(example_features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
    """[B, num_shots + 1, T, D]: the same solved examples' features before each target's."""
    shots = example_features.to(target_features.device)[None].expand(len(target_features), *example_features.shape)
    return torch.cat([shots, target_features[:, None]], dim=1)
