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
save/load pair; checkpoint.py checks a checkpoint and adds what a training run keeps beside it.
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
from safetensors.torch import load_file, save_file
from torch import nn

import checkpoint
import data
import grammar
import language_model
import languages
import looks
from language_model import IMAGE_END, IMAGE_START
from settings import check, setting

IMAGE_SLOT = -1  # input id of a position that holds an image embedding instead of a token's
IGNORE = -100  # label of a position without loss

TARGET_FORMATS = ("tags", "text")
READ_BATCH = 128  # pictures decoded together: short rows leave a small batch's matmuls little to do
# A training batch's rows are packed into one and its target tokens gathered, each padded to a
# multiple of this: a run then meets few sizes, and each size's FLOPs are counted once (cost.py).
PACK_MULTIPLE = 16
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
    image_look: str = setting("scanned", "scanned: a sheet on a surface cropped to the sheet, then as normalised; "
                                         "normalised: each picture grey, ink dark on a white ground, its light "
                                         "evened out before CLIP; as_is")
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
        check(self.image_look in looks.LOOKS, "image_look", self.image_look, ", ".join(looks.LOOKS))
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
        problem = patch_grid_problem((side // patch) ** 2, self.patch_merge)
        hint = " (ViT-B-32: 256 px makes it 8 x 8)" if self.clip_model == "ViT-B-32" else ""
        check(problem is None, "patch_merge", self.patch_merge, f"{problem} of {side} px images{hint}")

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# ---------------------------------------------------------------------------- vision

class VisionEncoder(nn.Module):
    """A frozen open_clip image tower: pixels [B, 3, H, W] -> features [B, T, D]: one block's
    patch tokens (T = grid * grid), or the pooled embedding (T = 1)."""

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
        self.look = config.image_look
        with torch.no_grad():
            size = self.visual.image_size
            self.feature_shape = tuple(self(torch.zeros(1, 3, *size)).shape[1:])

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout and friends stay off

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(next(self.visual.parameters()).dtype)
        if self.features == "pooled":
            return self.visual(pixels)[:, None, :]
        # Patch tokens of one block, before the final LayerNorm, without the class token.
        out = self.visual.forward_intermediates(pixels, indices=[self.layer], stop_early=True,
                                                intermediates_only=True, output_fmt="NLC")
        return out["image_intermediates"][0]  # [B, grid * grid, D], row by row

    @torch.no_grad()
    def encode(self, pictures: list[Image.Image | Path], batch_size: int = 64, progress=None) -> torch.Tensor:
        """Features of pictures (PIL images or files), [N, T, D] float32 on the CPU. Files are
        decoded and preprocessed by a pool of threads while the encoder runs (PIL releases
        the GIL), a batch at a time."""
        from concurrent.futures import ThreadPoolExecutor

        device = next(self.visual.parameters()).device

        def pixels(picture):
            picture = picture.convert("RGB") if isinstance(picture, Image.Image) else data.load_image(picture)
            return self.preprocess(looks.look(picture, self.look))

        chunks = []
        with ThreadPoolExecutor(max_workers=2) as pool:
            batches = [pictures[start:start + batch_size] for start in range(0, len(pictures), batch_size)]
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


def fingerprint(tensors) -> float:
    """A checksum of weights: tells whether two models are the same (random ones included)."""
    return float(sum(t.detach().double().abs().sum() for t in tensors))


# ---------------------------------------------------------------------------- projector

def patch_grid_problem(tokens: int, merge: int) -> str | None:
    """Why `merge` x `merge` blocks cannot tile a grid of `tokens` patch tokens, or None."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        return f"needs a square grid of patch tokens, not {tokens}"
    if side % merge:
        return f"does not divide the {side} x {side} patch grid"
    return None


def merged_shape(feature_shape: tuple[int, int], merge: int) -> tuple[int, int]:
    """(tokens, width) of the features once each merge x merge block of patches is one token."""
    tokens, width = feature_shape
    return tokens // merge ** 2, width * merge ** 2


def merge_patches(features: torch.Tensor, merge: int) -> torch.Tensor:
    """[..., g * g, D] patch tokens, row by row -> [..., (g / k)^2, k * k * D]: each k x k block of
    neighbours as one token (k = merge), k*k fewer tokens for the LLM (nanoVLM's pixel shuffle)."""
    if merge == 1:
        return features
    *lead, tokens, width = features.shape
    g, k = math.isqrt(tokens), merge
    blocks = features.reshape(-1, g // k, k, g // k, k, width).transpose(2, 3)  # [N, g/k, g/k, k, k, D]
    return blocks.reshape(*lead, (g // k) ** 2, k * k * width)


class Projector(nn.Module):
    """CLIP features [..., T, D] -> LLM input embeddings [..., T / k^2, hidden].

    Merges each k x k block of patches into one token (patch_merge), z-scores each
    position and channel with the training images' statistics (a frozen encoder's
    features vary little across images against their scale: fed raw, the LLM ignores
    them), LayerNorms each patch, then maps it: patch_mlp maps every patch with one
    shared linear layer before an MLP mixes a token's patches (a shape looks the same in
    whichever patch it falls). `head`, when given, is the picture loss's linear head.
    """

    def __init__(self, kind: str, feature_shape: tuple[int, int], hidden_size: int,
                 head: tuple[int, int] | None = None, positions: bool = False, patch_merge: int = 1):
        super().__init__()
        tokens, width = feature_shape
        if patch_merge > 1 and (problem := patch_grid_problem(tokens, patch_merge)):
            raise ValueError(f"patch_merge {patch_merge} {problem}; pick an image_size that makes it divide "
                             "(ViT-B-32: 256 px for 8 x 8)")
        self.patch_merge = patch_merge
        tokens, width = merged_shape(feature_shape, patch_merge)
        self.register_buffer("feature_mean", torch.zeros(tokens, width))
        self.register_buffer("feature_std", torch.ones(tokens, width))
        self.patches = patch_merge ** 2 if kind == "patch_mlp" else 1  # LayerNorm'd one by one
        self.norm = nn.LayerNorm(width // self.patches)
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
        merged = merge_patches(features, self.patch_merge)
        self.feature_mean.copy_(merged.mean(dim=0))
        self.feature_std.copy_(merged.std(dim=0) + 1e-6)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = merge_patches(features.to(self.feature_mean.dtype), self.patch_merge)
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


# ---------------------------------------------------------------------------- the whole model

class DiagramReader(nn.Module):
    """Vision encoder (frozen) + projector + LLM with LoRA, and the solved examples its
    prompt shows. Training feeds cached vision features to `forward`; `read_features` reads
    vision features (vision.encode makes them), `read_pictures` reads pictures."""

    def __init__(self, config: ModelConfig, vision: VisionEncoder, projector: Projector, llm, tokenizer,
                 base_models: dict):
        super().__init__()
        self.config, self.vision, self.projector, self.llm, self.tokenizer = config, vision, projector, llm, tokenizer
        self.base_models = base_models  # what identifies the base models: base_models.json
        self.language = languages.load(config.dsl)
        self.examples: list[tuple[Image.Image, str]] = []  # the prompt's solved examples: (picture, DSL)
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
        return cls._assemble(config, dtype, load_in_4bit)

    @classmethod
    def _assemble(cls, config: ModelConfig, dtype, load_in_4bit: bool, saved: Path | None = None,
                  trainable: bool = True) -> "DiagramReader":
        """The one construction path, of a new model or (`saved`: a checkpoint folder) of a saved
        one, whose base models must be the ones it was trained with (else a CheckpointError)."""
        identity = checkpoint.read_json(saved / "base_models.json") if saved else {}
        language = languages.load(config.dsl)
        with checkpoint.loading(saved and f"the CLIP this checkpoint was trained with "
                                          f"({config.clip_model} / {config.clip_pretrained})"):
            vision = VisionEncoder(config)
        merge = config.patch_merge if config.image_features == "patches" else 1
        clip_facts = {"clip_fingerprint": fingerprint(vision.visual.parameters()),
                      "feature_shape": list(merged_shape(vision.feature_shape, merge))}  # the projector's tokens
        checkpoint.check_same_models(identity, clip_facts, f"CLIP {config.clip_model} / {config.clip_pretrained}")
        vision.to(dtype)  # frozen, run in the LLM's dtype: bfloat16 encodes 2.9 times faster here (docs/LOG.md)
        with checkpoint.loading(saved and f"the base LLM {config.llm!r} of this checkpoint"):
            llm, tokenizer = language_model.load_llm(config.llm, dtype, config.llm_layers, load_in_4bit,
                                                     language.tokens)
        llm_facts = {"llm_hidden_size": llm.config.hidden_size, "vocab_size": len(tokenizer),
                     "llm_fingerprint": fingerprint([llm.get_input_embeddings().weight])}  # new rows included
        checkpoint.check_same_models(identity, llm_facts, f"the LLM {config.llm}")
        new_ids = tokenizer.convert_tokens_to_ids(language_model.new_tokens(language.tokens))
        llm = language_model.with_lora(llm, new_ids, config, load_in_4bit, saved and saved / "adapter", trainable)
        weights = load_file(saved / "projector.safetensors") if saved else None
        # A checkpoint without a quadrant head (quadrant_loss 0, or older) goes on training without the loss.
        head = config.quadrant_loss > 0 and (weights is None or "quadrant_head.weight" in weights)
        projector = Projector(config.projector, vision.feature_shape, llm.config.hidden_size,
                              head=picture_head(language) if head else None,
                              positions=config.image_positions if weights is None else "positions" in weights,
                              patch_merge=merge)
        if weights is not None:
            projector.load_state_dict(weights)
        return cls(config, vision, projector, llm, tokenizer, clip_facts | llm_facts)

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
        (folder / "base_models.json").write_text(json.dumps(self.base_models, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype=torch.float32, llm_name: str = "",
                        trainable: bool = False, load_in_4bit: bool = False,
                        merge_adapter: bool = False) -> "DiagramReader":
        """A saved model (a checkpoint folder, a run folder or its `best` pointer), for reading
        or (trainable) to resume training. `llm_name`: the base LLM from elsewhere than
        config.json says (the same model, moved). `merge_adapter` folds the adapter and the new
        rows into the base weights, for reading only: less work per token. A checkpoint that is
        incomplete or whose base models differ is refused with a CheckpointError."""
        folder = checkpoint.model_folder(folder)
        config = ModelConfig.from_dict(checkpoint.read_json(folder / "config.json"))
        config.llm = llm_name or config.llm
        reader = cls._assemble(config, dtype, load_in_4bit, saved=folder, trainable=trainable)
        if merge_adapter and not trainable:
            reader.llm = reader.llm.merge_and_unload()
        reader.examples = [(Image.open(folder / "examples" / f"{i}.png").convert("RGB"),
                            (folder / "examples" / f"{i}.dsl.txt").read_text()) for i in range(config.num_shots)]
        return reader

    def use_attention_for(self, device: torch.device) -> "DiagramReader":
        """Eager attention on a CPU, where torch's fused kernel is slower for these short rows
        (docs/LOG.md); PyTorch's fused SDPA, the default, on a GPU."""
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

    def collate(self, features: torch.Tensor, example_dsls: list[list[str]], targets: list[str] | None = None):
        """A left-padded batch. features: [B, num_shots + 1, T, D] vision features (examples, then target);
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
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "features": features}
        if targets is not None and self.projector.quadrant_head is not None:
            batch["picture_labels"] = picture_targets(self.language, targets)
        return batch

    # -- forward

    def embed(self, input_ids: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """Token embeddings, with the projector's image tokens [B, images, T, hidden] in the
        IMAGE_SLOT positions."""
        embeddings = self.llm.get_input_embeddings()(input_ids.clamp(min=0))
        slots = input_ids == IMAGE_SLOT
        return embeddings.masked_scatter(slots[..., None], projected.flatten(1, 2).to(embeddings.dtype))

    def forward(self, input_ids, attention_mask, labels, features, picture_labels=None) -> torch.Tensor:
        """Cross-entropy per target token. Given the picture loss's labels (collate adds them when
        the projector has its head), that loss joins the sum, weighted by quadrant_loss; the total
        stays a sum over the batch divided by its target tokens, so micro-batches weighted by
        their share of those tokens add up to the batch."""
        projected = self.projector(features)  # [B, images, T, hidden]: once, for the LLM and the picture head
        embeddings = self.embed(input_ids, projected)
        # The rows packed into one, padding left out: each row its own sequence (its positions
        # start at 0, which is how transformers tells packed sequences apart), so that matmuls
        # spend little time on padding (docs/LOG.md). Then a sequence of filler up to the size.
        real = attention_mask.bool()
        tokens, rows = packed_sizes(attention_mask, labels)
        n_real = int(real.sum())
        filler = tokens - n_real
        positions = torch.cat([(attention_mask.cumsum(-1) - 1)[real], torch.arange(filler, device=real.device)])
        hidden = self.llm.get_decoder()(inputs_embeds=F.pad(embeddings[real], (0, 0, 0, filler))[None],
                                        position_ids=positions[None],
                                        use_cache=False).last_hidden_state[0]  # a cache hides the packing
        # Logits only where a target token is predicted, gathered into one block: one position's
        # logits cost a quarter of all SmolLM2's decoder layers.
        predicts = torch.zeros_like(real)
        predicts[:, :-1] = labels[:, 1:] != IGNORE
        targets = labels[:, 1:][predicts[:, :-1]]
        logits = self.llm.get_output_embeddings()(F.pad(hidden[:n_real][predicts[real]],
                                                        (0, 0, 0, rows - len(targets))))
        loss = F.cross_entropy(logits.float(), F.pad(targets, (0, rows - len(targets)), value=IGNORE),
                               reduction="sum")
        if picture_labels is not None:
            loss = loss + self.config.quadrant_loss * picture_loss(self.projector, projected[:, -1], picture_labels,
                                                                   "sum")
        return loss / len(targets)

    # -- generation: the one path that validation, inference and the benchmark share

    @torch.no_grad()
    def generate(self, features: torch.Tensor, example_dsls: list[list[str]],
                 constrained: bool = True) -> tuple[list[str], list[float]]:
        """Greedy, batched, KV-cached decoding of vision features [B, shots + 1, T, D].
        Returns the raw texts up to the end token and each one's confidence: the lowest
        probability the model gave to a token it chose. `constrained` lets the DSL's grammar
        file decide which tokens may come next (for what the DSL says the model writes: not
        with target_format text)."""
        batch = self.collate(features, example_dsls)
        device = self.projector.feature_mean.device
        embeddings = self.embed(batch["input_ids"].to(device), self.projector(batch["features"].to(device)))
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

    @torch.no_grad()
    def score_texts(self, features: torch.Tensor, texts: list[str]) -> list[tuple[float, float]]:
        """Each text as the model's reading of its picture, teacher-forced after the solved
        examples: (the sum of its tokens' log-probabilities, the least probability of one of
        them, as generate's confidence counts it). features: [N, T, D], a picture a text."""
        self.eval()
        example_features, example_dsls = self.prompt_examples()
        batch = self.collate(with_examples(example_features, features), [example_dsls] * len(texts), texts)
        device = self.projector.feature_mean.device
        embeddings = self.embed(batch["input_ids"].to(device), self.projector(batch["features"].to(device)))
        logits = self.llm(inputs_embeds=embeddings, attention_mask=batch["attention_mask"].to(device)).logits
        log_probabilities = logits[:, :-1].float().log_softmax(-1)
        scores = []
        for row, labels in zip(log_probabilities, batch["labels"][:, 1:].to(device)):
            targets = labels[labels != IGNORE]
            chosen = row[labels != IGNORE].gather(-1, targets[:, None])[:, 0]
            scores.append((float(chosen.sum()), float(chosen.exp().min())))
        return scores

    def prompt_examples(self) -> tuple[torch.Tensor, list[str]]:
        """The solved examples as the prompt shows them: vision features [shots, T, D], DSL texts."""
        return self.vision.encode([image for image, _ in self.examples]), [text for _, text in self.examples]

    @torch.no_grad()
    def read_features(self, features: torch.Tensor, batch_size: int = READ_BATCH, constrained: bool = True,
                      progress=None) -> tuple[list[str], list[float]]:
        """Raw DSL and confidence for the pictures whose vision features are `features` [N, T, D],
        each after the model's solved examples."""
        self.eval()
        example_features, example_dsls = self.prompt_examples()
        texts, confidences = [], []
        for start in range(0, len(features), batch_size):
            chunk = features[start:start + batch_size]
            chunk_texts, chunk_confidences = self.generate(with_examples(example_features, chunk),
                                                           [example_dsls] * len(chunk), constrained)
            texts += chunk_texts
            confidences += chunk_confidences
            if progress is not None:
                progress.update(len(chunk))
        return texts, confidences

    @torch.no_grad()
    def read_pictures(self, pictures: list[Image.Image | str | Path], batch_size: int = READ_BATCH,
                      constrained: bool = True, progress=None) -> tuple[list[str], list[float]]:
        """Raw DSL and confidence for pictures (PIL images or files).

            reader = DiagramReader.from_pretrained("checkpoints")
            texts, confidences = reader.read_pictures(["example.png"])
        """
        features = self.vision.encode(pictures, progress=progress)
        return self.read_features(features, batch_size, constrained, progress)

    @torch.no_grad()
    def picture_check(self, features: torch.Tensor, texts: list[str]) -> list[float | None]:
        """A second reader's word on each text: the probability the picture head (the picture
        loss's, reading the image tokens alone) gives what the text says: for a DSL's regions,
        the least it gives a region's content as written; for contents, the least it gives a
        class being shown, or not, as written. None without a head, or for a text that does
        not parse."""
        projector = self.projector.eval()
        if projector.quadrant_head is None:
            return [None] * len(texts)
        device = projector.feature_mean.device
        logits = torch.cat([projector.quadrant_logits(projector(features[start:start + READ_BATCH].to(device)))
                            for start in range(0, len(features), READ_BATCH)]).float().cpu()
        checks = []
        for row, text in zip(logits, texts):
            if not self.language.is_valid(text):
                checks.append(None)
                continue
            said = picture_targets(self.language, [text])[0]
            if projector.region_grid:
                probability = row.softmax(-1).gather(-1, said[:, None])[:, 0]
            else:
                probability = torch.where(said.bool(), row.sigmoid(), 1 - row.sigmoid())
            checks.append(float(probability.min()))
        return checks

    def computing_parts(self) -> tuple[nn.Module, ...]:
        """The modules whose calls do a reading's arithmetic (CLIP, the projector, the LLM with
        its head): finetune.py counts a validation's FLOPs call by call of these."""
        llm = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm  # PEFT's wraps it
        return self.vision, self.projector, llm

    def trainable_parameters(self):
        """(LoRA weights, projector and new-token embeddings): the two learning-rate groups."""
        lora = [p for n, p in self.llm.named_parameters() if p.requires_grad and "lora_" in n]
        rest = [p for n, p in self.llm.named_parameters() if p.requires_grad and "lora_" not in n]
        return lora, rest + list(self.projector.parameters())


def packed_sizes(attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """A training batch's packed tokens and target tokens, each rounded up to PACK_MULTIPLE:
    what the FLOPs of its step depend on."""
    def up(n):
        return -(-n // PACK_MULTIPLE) * PACK_MULTIPLE
    return up(int(attention_mask.sum())), up(int((labels != IGNORE).sum()))


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
