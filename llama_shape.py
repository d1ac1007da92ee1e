"""Llama-3.1-8B's exact shape and its real tokenizer, with random weights, built offline.

The reference configuration (configs/llama3-8b.yaml) needs meta-llama/Llama-3.1-8B, a 16 GB
download behind a licence. This stand-in runs the same code path without it: the same
config (widths, heads, vocabulary, RoPE, untied embeddings) and the same tokenizer, so
tests and benchmarks meet what a user with the weights meets (the 128,256-token vocabulary,
the BOS token, the untied lm_head), only with weights that know nothing.

    --llm llama3.1-8b-shape                  all 32 layers
    --llm llama3.1-8b-shape --llm_layers 2   the first 2 layers at full width (tests, memory per layer)

`python llama_shape.py --out DIR [--layers N]` writes it as a folder that loads like the
real one (--llm DIR), which 4-bit loading (--load_in_4bit) needs.

The tokenizer comes from the `llama-models` wheel (Meta's tiktoken file, 2.2 MB), turned into
a transformers fast tokenizer once and cached beside it in ~/.cache.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import hardware
import settings
from settings import setting

NAME = "llama3.1-8b-shape"

# meta-llama/Llama-3.1-8B's config.json, as published.
LLAMA_3_1_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=128000, eos_token_id=128001, hidden_act="silu",
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)

# Llama 3's special tokens in id order from 128000, as llama_models/llama3/tokenizer.py lists them.
_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
          "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
          "<|eot_id|>", "<|python_tag|>", "<|image|>"]
SPECIAL_TOKENS = _NAMED + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_NAMED))]
# The split pattern of the same file.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def is_shape(name: str) -> bool:
    return name == NAME


def config(layers: int = 0) -> LlamaConfig:
    """Llama-3.1-8B's config, with its first `layers` layers only (0: all 32)."""
    return LlamaConfig(**{**LLAMA_3_1_8B, "num_hidden_layers": layers or LLAMA_3_1_8B["num_hidden_layers"]})


def _tiktoken_file() -> Path:
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Llama 3 tokenizer comes from the llama-models package: "
                                "pip install --no-deps llama-models==0.3.0 (or `make install`)")
    return Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"


def tokenizer() -> PreTrainedTokenizerFast:
    """Llama 3's tokenizer: 128,000 BPE tokens, then the 256 special tokens at 128000-128255;
    BOS (<|begin_of_text|>) added in front of every text, as the hub's tokenizer does."""
    cache = hardware.cache_dir() / "llama3-tokenizer"
    if (cache / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(cache)
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(str(_tiktoken_file()), pattern=PATTERN,
                                  extra_special_tokens=SPECIAL_TOKENS).converted()
    bos = SPECIAL_TOKENS[0]
    converted.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, LLAMA_3_1_8B["bos_token_id"])]),
    ])
    result = PreTrainedTokenizerFast(tokenizer_object=converted, bos_token=bos, eos_token=SPECIAL_TOKENS[1])
    wrong = [t for i, t in enumerate(SPECIAL_TOKENS) if result.convert_tokens_to_ids(t) != 128000 + i]
    if len(result) != LLAMA_3_1_8B["vocab_size"] or wrong:
        raise RuntimeError(f"the converted Llama 3 tokenizer is wrong: {len(result)} tokens, "
                           f"special tokens off their ids: {wrong[:3]}")
    cache.mkdir(parents=True, exist_ok=True)
    result.save_pretrained(cache)
    return result


def build(dtype: torch.dtype = torch.float32, layers: int = 0, seed: int = 0):
    """(the random-weight LLM, its tokenizer). Built at its layer count (never all 32 to cut
    down), on the GPU when there is one (8B random numbers are drawn far faster there); the
    same weights for the same arguments on the same device, so a checkpoint made on it loads
    again."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.random.fork_rng(), torch.device(device):
        torch.manual_seed(seed)
        llm = LlamaForCausalLM._from_config(config(layers), dtype=dtype)
    return llm, tokenizer()


@dataclass
class Arguments:
    out: str = setting(help="the folder to write: config.json, random weights (safetensors), tokenizer")
    layers: int = setting(0, "decoder layers (0: all 32)")
    dtype: str = setting("bfloat16", "the weights' dtype on disk")


if __name__ == "__main__":
    # A folder that loads like the real one (--llm DIR): what --load_in_4bit needs, since
    # bitsandbytes quantizes while loading from files.
    args, = settings.parse(sys.argv[1:], Arguments, program="llama_shape.py")
    llm, llama_tokenizer = build(getattr(torch, args.dtype), args.layers)
    llm.save_pretrained(args.out)
    llama_tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}: Llama-3.1-8B's shape, {llm.config.num_hidden_layers} layers, random weights")
