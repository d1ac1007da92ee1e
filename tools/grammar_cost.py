"""What constrained decoding from grammars/diagram.lark costs per generated token, with
xgrammar (grammar.py) and with llguidance (the same processor written for it here), next
to the model's own decoding step; and whether reading with grammar.py's processor writes
the same texts as model.DiagramReader's hand-written grammar (dsl.next_tags).

    python -m tools.grammar_cost --checkpoint /work/demo0/checkpoints/epoch-01 --csv /work/demo0/test.csv

Prints the CPU flags, a table (milliseconds per decoding step) and a verdict line.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import pandas as pd
import torch
from transformers import LogitsProcessor

import dsl
import grammar
from model import DiagramReader

GRAMMAR = Path(__file__).resolve().parent.parent / "grammars" / "diagram.lark"


class LLGuidanceProcessor(LogitsProcessor):
    """grammar.GrammarLogitsProcessor with llguidance in xgrammar's place (same bitmask layout)."""

    def __init__(self, template: llguidance.LLMatcher, executor: llguidance.LLExecutor, vocab_size: int,
                 batch_size: int, end_token_id: int):
        self.matchers = [template.deep_copy() for _ in range(batch_size)]  # 600 times faster than LLMatcher()
        self.executor, self.vocab_size, self.end_token_id = executor, vocab_size, end_token_id
        self.bitmask = llguidance.torch.allocate_token_bitmask(batch_size, vocab_size)
        self.done, self.start = [False] * batch_size, None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        elif input_ids.shape[1] > self.start:
            last = input_ids[:, -1].tolist()
            live = [i for i, done in enumerate(self.done) if not done]
            accepted = llguidance.torch.consume_token_par(self.executor, [(self.matchers[i], last[i]) for i in live])
            assert all(accepted), [m.get_error() for m in self.matchers if m.is_error()]
            for i in live:
                self.done[i] = last[i] == self.end_token_id
        live = [i for i, done in enumerate(self.done) if not done]
        if live:  # llguidance refuses an empty batch
            llguidance.torch.fill_next_token_bitmask_par(self.executor, [(self.matchers[i], i) for i in live], self.bitmask)
        for i, done in enumerate(self.done):
            if done:
                self.bitmask[i] = 0
                self.bitmask[i, self.end_token_id // 32] = 1 << (self.end_token_id % 32)
        bits = np.unpackbits(self.bitmask.numpy().view(np.uint8), axis=1, count=scores.shape[1],
                             bitorder="little").view(np.bool_)
        return scores.masked_fill(~torch.from_numpy(bits), float("-inf"))


def factories(tokenizer, end_id: int) -> dict:
    """library -> (batch size -> a new processor)."""
    text = GRAMMAR.read_text()
    g = grammar.Grammar(text)
    lltokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))
    template = llguidance.LLMatcher(lltokenizer, llguidance.LLMatcher.grammar_from_lark(text))
    assert not template.is_error(), template.get_error()
    executor = llguidance.LLExecutor()
    return {"xgrammar": lambda batch: grammar.logits_processor(g, tokenizer, batch, end_id),
            "llguidance": lambda batch: LLGuidanceProcessor(template, executor, len(tokenizer), batch, end_id)}


class Timed(LogitsProcessor):
    """A processor, its calls counted and timed."""

    def __init__(self, processor):
        self.processor, self.calls, self.seconds = processor, 0, 0.0

    def __call__(self, input_ids, scores):
        start = time.perf_counter()
        scores = self.processor(input_ids, scores)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return scores


def mask_cost(make, rows: list[list[int]], batch: int, vocab: int, pad_id: int) -> tuple[float, float]:
    """(ms to make the processor, ms per step) replaying `rows` (tag ids) `batch` at a time,
    on random scores: the mask alone, fill + apply + accept."""
    setup = step = 0.0
    steps = 0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        length = max(map(len, chunk)) + 1
        written = torch.tensor([row + [pad_id] * (length - len(row)) for row in chunk])
        scores = torch.randn(len(chunk), vocab)
        begin = time.perf_counter()
        processor = make(len(chunk))
        setup += time.perf_counter() - begin
        for k in range(length):
            s = scores.clone()
            begin = time.perf_counter()
            processor(written[:, :k], s)
            step += time.perf_counter() - begin
            steps += 1
    calls = -(-len(rows) // batch)
    return 1000 * setup / calls, 1000 * step / steps


def patched_read(reader: DiagramReader, make, features, batch: int):
    """reader.read with `make`'s processor in place of prefix_allowed_tokens_fn: (texts,
    confidences, grammar seconds, steps)."""
    original = reader.llm.generate
    timers = []

    def generate(*args, prefix_allowed_tokens_fn=None, **kwargs):
        timers.append(Timed(make(kwargs["inputs_embeds"].shape[0])))
        return original(*args, logits_processor=[timers[-1]], **kwargs)

    reader.llm.generate = generate
    try:
        texts, confidences = reader.read(features, batch)
    finally:
        del reader.llm.generate
    return texts, confidences, sum(t.seconds for t in timers), sum(t.calls for t in timers)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="/work/demo0/checkpoints/epoch-01")
    parser.add_argument("--csv", default="/work/demo0/test.csv")
    parser.add_argument("--dtype", default="bfloat16", help="what --dtype auto picks on an AVX-512 BF16 CPU")
    parser.add_argument("--batch1_pictures", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timings: the fastest of this many")
    args = parser.parse_args()
    torch.manual_seed(0)
    flags = sorted(set(re.findall(r"\b(avx2|avx512f|avx512_bf16|amx_tile)\b", Path("/proc/cpuinfo").read_text())))
    print(f"CPU flags: {' '.join(flags)}; torch threads {torch.get_num_threads()}; dtype {args.dtype}")

    reader = DiagramReader.from_pretrained(args.checkpoint, getattr(torch, args.dtype), merge=True)
    tokenizer, end_id = reader.tokenizer, reader.end_id
    table = pd.read_csv(args.csv)
    features = reader.vision.encode([Path(args.csv).parent / p for p in table.image_path])
    makers = factories(tokenizer, end_id)

    # Same texts, picture by picture, as the hand-written grammar.
    today, today_conf = reader.read(features)
    for library, make in makers.items():
        texts, confidences, _, _ = patched_read(reader, make, features, 128)
        same = sum(a == b for a, b in zip(today, texts))
        print(f"{library}: {same} of {len(today)} texts as reader.read's, confidences equal: "
              f"{today_conf == confidences}; exact match vs test.csv "
              f"{dsl.score(texts, list(table.dsl))['exact_match']:.3f}")

    # The mask alone, on the tag sequences of test.csv's diagrams.
    rows = [tokenizer.convert_tokens_to_ids(dsl.to_tags(dsl.parse(text))) for text in table.dsl]
    print("\nms per decoding step (fastest of", args.repeats, "runs)")
    print("| batch | library | mask alone: fill + apply + accept | processor made, per generate | "
          "generate step with the grammar | of which the grammar | share | today's step (dsl.next_tags) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch, pictures in ((1, args.batch1_pictures), (128, 128)):
        chunk = features[:pictures]
        best_today = min(timed(lambda: reader.read(chunk, batch)) for _ in range(args.repeats))
        for library, make in makers.items():
            setup, mask = min(mask_cost(make, rows[:pictures] if batch == 1 else (rows * 2)[:128], batch,
                                        len(tokenizer), tokenizer.pad_token_id) for _ in range(args.repeats))
            runs = []
            for _ in range(args.repeats):
                begin = time.perf_counter()
                _, _, seconds, steps = patched_read(reader, make, chunk, batch)
                runs.append((time.perf_counter() - begin, seconds, steps))
            wall, seconds, steps = min(runs)
            step, in_grammar = 1000 * wall / steps, 1000 * seconds / steps
            print(f"| {batch} | {library} | {mask:.3f} | {setup:.2f} | {step:.2f} | {in_grammar:.3f} | "
                  f"{in_grammar / step:.1%} | {1000 * best_today / steps:.2f} |")


def timed(function) -> float:
    begin = time.perf_counter()
    function()
    return time.perf_counter() - begin


if __name__ == "__main__":
    main()
