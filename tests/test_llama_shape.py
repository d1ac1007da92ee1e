"""The reference configuration at Llama-3.1-8B's real width and tokenizer (random weights,
one layer), through gpu_proof.py's small path: what a user with the real weights runs,
short of the other 31 layers."""

import json

import pytest
import torch
from safetensors import safe_open

import dsl
import language_model
import llama_shape
import model
from test_finetune import run_tool


@pytest.fixture(scope="module")
def tokenizer():
    return llama_shape.tokenizer()


def test_the_tokenizer_is_llama_3s_with_its_special_tokens_at_their_ids(tokenizer):
    assert len(tokenizer) == 128256
    assert tokenizer("Read the diagram.").input_ids == [128000, 4518, 279, 13861, 13]  # BOS, then the text
    for name, id_ in [("<|begin_of_text|>", 128000), ("<|end_of_text|>", 128001), ("<|finetune_right_pad_id|>", 128004),
                      ("<|eot_id|>", 128009), ("<|image|>", 128011)]:
        assert tokenizer.convert_tokens_to_ids(name) == id_
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (128000, 128001)
    assert tokenizer.decode(tokenizer(" top left\n\n x").input_ids, skip_special_tokens=True) == " top left\n\n x"


def test_the_config_is_llama_3_1_8bs():
    config = llama_shape.config()
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 14336, 32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (32, 8, 128256)
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500000.0
    assert not config.tie_word_embeddings and llama_shape.config(2).num_hidden_layers == 2


@pytest.fixture(scope="module")
def proof(tmp_path_factory):
    """gpu_proof.py --small: configs/llama3-8b.yaml at full width with one layer (batch 4, one
    shot; dtype auto, as FP16 needs a GPU; the random ViT-B-32): benchmark.py's steps and
    generation, then the shape written as a folder, finetune.py on it and inference.py."""
    work = tmp_path_factory.mktemp("proof")
    result = run_tool("gpu_proof", "--small", "--work_dir", str(work), timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return work, json.loads(result.stdout.strip().splitlines()[-1])


def test_the_proofs_small_path_measures_training_and_generation_and_reads_back(proof):
    _, results = proof
    lora = results["lora"]
    assert lora["llm"] == llama_shape.NAME and lora["batch_size"] == 4
    assert lora["tokens_per_step"] > 4 * 2 * 49  # two images of 49 tokens a row, and text
    assert lora["train_step_seconds"] > 0 and 0 < lora["train_step_share_of_peak"] < 1.5
    folder = results["folder_base"]
    assert folder["steps"] == 9  # 36 training images // batch 4
    read_back = folder["read_back_on_the_unquantised_base"]
    assert read_back["n"] == 8 and read_back["valid_rate"] == 1.0  # grammar-constrained, even untrained


def test_the_prompt_has_one_bos_masked_padding_and_one_token_per_tag(proof):
    work, _ = proof
    reader = model.DiagramReader.from_pretrained(work / "run" / "epoch-01", llm_name=str(work / "llama3.1-8b-shape"))
    new_tokens = language_model.new_tokens(dsl.TOKENS)
    assert reader.config.num_shots == 1 and reader.llm.config.vocab_size == 128256 + len(new_tokens)
    for token in new_tokens:
        assert len(reader.tokenizer(token, add_special_tokens=False).input_ids) == 1, token
    short, long = "<StartDiagram> <Small> <Square> <TopLeft> <EndDiagram>", dsl.LONGEST
    features = torch.zeros(2, 2, *reader.vision.feature_shape)
    batch = reader.collate(features, [[short], [long]], [short, long])
    bos = reader.tokenizer.bos_token_id
    for row, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        real = row[mask.bool()]
        assert (real == bos).sum() == 1 and real[0] == bos  # once, first
        assert (labels[~mask.bool()] == model.IGNORE).all()  # padding never carries loss
    assert (batch["attention_mask"][0] == 0).any()  # the short row was padded


def test_the_checkpoint_holds_the_adapter_and_the_new_rows_not_the_embedding_matrices(proof):
    work, _ = proof
    adapter = work / "run" / "epoch-01" / "adapter" / "adapter_model.safetensors"
    assert adapter.stat().st_size < 20e6  # the two 128k x 4096 matrices would be 4 GB in FP32
    with safe_open(adapter, "pt") as saved:
        rows = {k: saved.get_tensor(k) for k in saved.keys() if "trainable_tokens" in k}
    lm_head = [v for k, v in rows.items() if "lm_head" in k]
    assert len(rows) == 2 and lm_head and lm_head[0].shape == (len(language_model.new_tokens(dsl.TOKENS)), 4096)
    # The untied lm_head's new rows trained: they moved away from their initial values.
    llm, tokenizer = language_model.load_llm(str(work / "llama3.1-8b-shape"), torch.float32,
                                             dsl_tokens=dsl.TOKENS)
    initial = llm.get_output_embeddings().weight[tokenizer.convert_tokens_to_ids(language_model.new_tokens(dsl.TOKENS))]
    assert (lm_head[0] - initial).abs().max() > 5e-5  # 9 Adam steps of lr 5e-5 without warm-up
