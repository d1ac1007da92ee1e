"""Constrained decoding from a grammar file with xgrammar: EBNF (grammars/mermaid.ebnf) or Lark
(grammars/diagram.lark), the notations vLLM's structured output takes.

    g = Grammar.from_file("grammars/diagram.lark")
    processor = logits_processor(g, tokenizer, batch_size, end_token_id)
    llm.generate(inputs_embeds=..., logits_processor=[processor], eos_token_id=end_token_id, ...)

In Lark, a tag written `<Large>` (no quotes) is the tokenizer's special token of that name
and nothing else: the same text spelled out of ordinary tokens is not allowed. EBNF can name
a special token only by its id, so a DSL with tokens of its own writes its grammar in Lark.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xgrammar
from transformers import LogitsProcessor


@dataclass(frozen=True)
class Grammar:
    text: str
    notation: str = "lark"  # or "ebnf"

    @classmethod
    def from_file(cls, path: str | Path) -> "Grammar":
        """A .lark file, or EBNF (.ebnf, .gbnf)."""
        path = Path(path)
        return cls(path.read_text(), "lark" if path.suffix == ".lark" else "ebnf")


@functools.lru_cache(maxsize=16)
def _compile(grammar: Grammar, tokenizer, vocab_size: int) -> xgrammar.CompiledGrammar:
    # Once per (grammar, tokenizer): reading the vocabulary is the slow part. vocab_size
    # is in the key so that a tokenizer given new tokens afterwards is read again.
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    parsed = (xgrammar.Grammar.from_lark(grammar.text, tokenizer_info=info) if grammar.notation == "lark"
              else xgrammar.Grammar.from_ebnf(grammar.text))
    return xgrammar.GrammarCompiler(info).compile_grammar(parsed)


class GrammarLogitsProcessor(LogitsProcessor):
    """For one batched generate call: each row's scores are -inf outside what its grammar
    allows next. A row that has written `end_token_id` is allowed only that token from then
    on (generate pads it), whatever the grammar says."""

    def __init__(self, compiled: xgrammar.CompiledGrammar, batch_size: int, end_token_id: int):
        self.matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(batch_size)]
        self.vocab_size = compiled.tokenizer_info.vocab_size
        self.bitmask = xgrammar.allocate_token_bitmask(batch_size, self.vocab_size)
        self.batch = xgrammar.BatchGrammarMatcher()
        self.end_token_id = end_token_id
        self.done = [False] * batch_size
        self.start = None  # input_ids' length at the first step: with inputs_embeds, 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        elif input_ids.shape[1] > self.start:  # the tokens chosen at the previous step
            last = input_ids[:, -1].tolist()
            live = [i for i, done in enumerate(self.done) if not done]
            accepted = self.batch.batch_accept_token([self.matchers[i] for i in live], [last[i] for i in live])
            for i, ok in zip(live, accepted):
                if not ok:
                    raise ValueError(f"row {i}: token {last[i]} is not allowed by the grammar")
                self.done[i] = last[i] == self.end_token_id
        live = [i for i, done in enumerate(self.done) if not done]
        self.batch.batch_fill_next_token_bitmask([self.matchers[i] for i in live], self.bitmask, live)
        for i, done in enumerate(self.done):
            if done:
                self.bitmask[i] = 0
                self.bitmask[i, self.end_token_id // 32] = 1 << (self.end_token_id % 32)
        # Unpacking the bits with numpy and one masked_fill is faster on the CPU than
        # xgrammar's own apply_token_bitmask_inplace (a loop over rows).
        bits = np.unpackbits(self.bitmask[:len(scores)].numpy().view(np.uint8), axis=1,
                             count=scores.shape[1], bitorder="little").view(np.bool_)
        # Not in place: generate keeps these very logits for output_logits (confidences).
        return scores.masked_fill(~torch.from_numpy(bits).to(scores.device), float("-inf"))


def logits_processor(grammar: Grammar, tokenizer, batch_size: int, end_token_id: int | None = None
                     ) -> GrammarLogitsProcessor:
    """A new processor for one generate call of `batch_size` rows. end_token_id: the token
    that ends a row (the grammar's last token, or by default the tokenizer's EOS, which the
    grammar then allows where its text may end)."""
    end = tokenizer.eos_token_id if end_token_id is None else end_token_id
    return GrammarLogitsProcessor(_compile(grammar, tokenizer, len(tokenizer)), batch_size, end)
