"""grammar.py with grammars/diagram.lark: the same masks as dsl.next_tags, token for token."""

from pathlib import Path

import numpy as np
import pytest
import torch

import dsl
import grammar
import language_model

DIAGRAM = Path(__file__).resolve().parent.parent / "grammars" / "diagram.lark"


@pytest.fixture(scope="module")
def tiny(tiny_llm):
    """A random 2-layer Llama and SmolLM2's tokenizer, the tags added as load_llm adds them."""
    return language_model.load_llm(tiny_llm, dsl_tokens=dsl.TOKENS)


def test_masks_equal_next_tags_for_every_prefix_of_every_diagram(tiny):
    _, tokenizer = tiny
    ids = tokenizer.convert_tokens_to_ids
    end, vocab = ids(dsl.END), len(tokenizer)
    rows = [ids(dsl.to_tags(d)) for d in dsl.all_diagrams()]
    g = grammar.Grammar.from_file(DIAGRAM)
    next_ids = {}  # prefix -> allowed ids, dsl.next_tags as token ids
    for row in rows:
        for step in range(len(row) + 1):
            tags = tokenizer.convert_ids_to_tokens(row[:step])
            next_ids[tuple(row[:step])] = ids(dsl.next_tags(tags)) if step < len(row) else [end]
    scores = torch.zeros(1000, vocab, dtype=torch.bfloat16)
    for start in range(0, len(rows), 1000):
        chunk = rows[start:start + 1000]
        processor = grammar.logits_processor(g, tokenizer, len(chunk), end)
        steps = max(map(len, chunk)) + 1  # one more: rows that ended allow only the end token
        # As generate calls it: input_ids hold the tokens written so far, finished rows padded.
        written = torch.tensor([row + [tokenizer.pad_token_id] * (steps - len(row)) for row in chunk])
        for step in range(steps):
            masked = processor(written[:, :step], scores[:len(chunk)].zero_())
            # Packed as the processor's bitmask (32 times smaller than the scores): token t is
            # bit t % 32 of word t // 32.
            expected = np.zeros(processor.bitmask.shape, np.uint32)
            for i, row in enumerate(chunk):
                for token in next_ids[tuple(row[:step])]:  # a finished row: row[:step] is the row
                    expected[i, token // 32] |= np.uint32(1 << token % 32)
            assert np.array_equal(processor.bitmask.numpy().view(np.uint32), expected), f"step {step}, rows {start}.."
            if start == 0:  # the scores as masked too, in a few rows (all would take seconds)
                bits = np.unpackbits(expected[:50].view(np.uint8), axis=1, count=vocab, bitorder="little")
                assert torch.equal(masked[:50].isfinite(), torch.from_numpy(bits.astype(bool)))


def test_a_tag_spelled_out_of_ordinary_tokens_is_not_allowed_and_scores_stay(tiny):
    _, tokenizer = tiny
    processor = grammar.logits_processor(grammar.Grammar.from_file(DIAGRAM), tokenizer, 1,
                                         tokenizer.convert_tokens_to_ids(dsl.END))
    scores = torch.zeros(1, len(tokenizer))
    allowed = processor(torch.zeros(1, 0, dtype=torch.long), scores).isfinite()
    assert scores.isfinite().all()  # not masked in place: generate keeps them as output_logits
    assert allowed.nonzero()[:, 1].tolist() == [tokenizer.convert_tokens_to_ids(dsl.START)]
    assert len(tokenizer("<StartDiagram>", add_special_tokens=False, split_special_tokens=True).input_ids) > 1


def test_generation_from_embeddings_writes_only_diagrams(tiny):
    """Left-padded inputs_embeds, batched and greedy, as model.DiagramReader.generate calls it."""
    llm, tokenizer = tiny
    end = tokenizer.convert_tokens_to_ids(dsl.END)
    torch.manual_seed(0)
    with torch.no_grad():  # random rows of the embedding table make the rows differ
        llm.get_output_embeddings().weight[tokenizer.convert_tokens_to_ids(list(dsl.DSL_TOKENS))].normal_(0, 1)
    batch, length = 6, 5
    embeds = torch.randn(batch, length, llm.config.hidden_size)
    attention = torch.ones(batch, length, dtype=torch.long)
    attention[1, :2] = attention[4, :3] = 0  # left padding
    calls = []
    processor = grammar.logits_processor(grammar.Grammar.from_file(DIAGRAM), tokenizer, batch, end)
    spy = lambda input_ids, scores: calls.append(input_ids.shape[1]) or scores
    out = llm.generate(inputs_embeds=embeds, attention_mask=attention, max_new_tokens=20, do_sample=False,
                       num_beams=1, eos_token_id=end, pad_token_id=tokenizer.pad_token_id,
                       logits_processor=[spy, processor])
    assert calls[0] == 0  # with inputs_embeds, input_ids hold only the generated tokens
    texts = [tokenizer.decode(row[:row.index(end) + 1], skip_special_tokens=False)
             for row in out.tolist() if end in row]
    assert len(texts) == batch
    assert all(dsl.is_valid(text) for text in texts), texts
    assert len(set(texts)) > 1, texts
