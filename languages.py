"""A DSL is a plug-in: a Python module that says what its texts are. This file loads one by name.

    language = languages.load("mermaid")   # built in: diagram (dsl.py), mermaid (mermaid.py), text
    language = languages.load("my_dsl.py") # or a module of yours: a file, or an importable name

A DSL module defines

    NAME                 its name
    GRAMMAR              its grammar file, relative to the module (EBNF, as vLLM's structured output takes
                         it): constrained decoding can write nothing else; None for none
    canonical(text)      the text in a form where two texts of the same meaning are equal; raises
                         ValueError for a text that is not valid

and, where it has them,

    TOKENS               strings added to the LLM's vocabulary, one new token each (the diagram DSL's tags)
    END                  the token that ends a text (default: the LLM's end-of-text token)
    LONGEST              its longest text: generation stops after that many tokens and a few more
    to_target(text)      what the model writes for a text (default: the text itself)
    from_target(output)  the model's output as a text of the DSL (default: as it is)
    score(predictions, references) -> dict   scores of its own (element F1, ...)
    REGION_GRID, REGION_CLASSES, regions(text)   what each cell of a REGION_GRID x REGION_GRID grid over the
                         picture holds, as a class: the projector's picture loss (--quadrant_loss)
    CONTENT_CLASSES, contents(text)   or which classes the picture shows anywhere (their indices)
    agreement(picture, text) -> float   how well the picture matches the text (render and compare)
    borderline(picture, text) -> bool   whether the picture leaves some of the text undecided (a size
                         on the line between two)
    ink_reading(picture) -> text | None  a reading without the model, a candidate beside the model's
    crop_to_canvas(picture) -> Image     the picture cropped to where the diagram's canvas lies
    picture(text, size) -> Image         a drawing of a text (the page's side-by-side)
    sample(rng), text_of(item), draw(item, size, rng, augment), held_out(text)   create_images.py's data
    DRAWING              a module that holds the drawing parts instead (the diagram DSL: renderer.py)

`text` is the free-text plug-in: targets in the LLM's own tokens, no grammar, scored by exact
match and character error rate.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

BUILT_IN = {"diagram": "dsl", "mermaid": "mermaid"}
FREE_TEXT = "text"
DEFAULT_LONGEST_TOKENS = 256  # generation's limit where a DSL names no LONGEST text


@dataclass(frozen=True)
class Language:
    """One DSL, as the rest of the repo uses it: a module's parts with their defaults filled in."""

    name: str  # as config.json saves it: a built-in name, a file or a module name
    module: ModuleType | None  # None: free text

    def part(self, name: str):
        """One of the module's optional parts (languages.py's docstring), or None: from the module,
        else from its DRAWING module."""
        found = getattr(self.module, name, None)
        drawing = getattr(self.module, "DRAWING", None)
        return found if found is not None or not drawing else getattr(importlib.import_module(drawing), name, None)

    @property
    def grammar_file(self) -> Path | None:
        """None: free text, or a DSL without a grammar."""
        grammar = self.part("GRAMMAR")
        return Path(self.module.__file__).parent / grammar if grammar else None

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(self.part("TOKENS") or ())

    def canonical(self, text: str) -> str:
        """Raises ValueError for a text that is not valid."""
        if self.module is None:
            return "\n".join(line.rstrip() for line in text.strip().splitlines())  # free text: its lines
        return self.module.canonical(text)

    def canonical_or_raw(self, text: str) -> str:
        """The canonical text, or the text as it is where it is not valid (a model's raw output)."""
        try:
            return self.canonical(text)
        except ValueError:
            return text

    def is_valid(self, text: str) -> bool:
        try:
            self.canonical(text)
            return True
        except ValueError:
            return False

    def target(self, text: str) -> str:
        """What the model writes for a (valid) text."""
        to_target = self.part("to_target")
        return to_target(text) if to_target else text.strip()

    def from_target(self, output: str) -> str:
        from_target = self.part("from_target")
        return from_target(output) if from_target else output

    def score(self, predictions: list[str], references: list[str]) -> dict:
        """Exact match (canonical texts), valid rate and character error rate (of the canonical
        texts, or the raw output where it is not valid), then the DSL's own scores."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        n = max(1, len(references))
        predicted = [self.canonical_or_raw(p) for p in predictions]
        expected = [self.canonical(r) for r in references]
        scores = {"n": len(references),
                  "exact_match": sum(p == r for p, r in zip(predicted, expected)) / n,
                  "valid_rate": sum(map(self.is_valid, predictions)) / n,
                  "cer": sum(map(edit_distance, predicted, expected)) / max(1, sum(map(len, expected)))}
        own = self.part("score")
        return scores | own(predictions, references) if own else scores


@functools.cache  # a file's module is run once: its classes stay the same objects
def load(name: str) -> Language:
    """A DSL by its name: built in (diagram, mermaid, text), a .py file, or an importable module.
    Raises ValueError naming what is wrong."""
    if name == FREE_TEXT:
        return Language(name, None)
    if name in BUILT_IN:
        module = importlib.import_module(BUILT_IN[name])
    elif name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"DSL {name!r}: no such file")
        spec = importlib.util.spec_from_file_location(f"dsl_plugin_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            raise ValueError(f"DSL {name!r}: not one of {', '.join([*BUILT_IN, FREE_TEXT])}, a .py file or an "
                             f"importable module ({error})") from None
    if not callable(getattr(module, "canonical", None)) or not hasattr(module, "GRAMMAR"):
        raise ValueError(f"DSL {name!r}: a DSL module defines GRAMMAR (a grammar file, or None) and "
                         "canonical(text) (languages.py lists the rest)")
    return Language(name, module)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions of characters."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]
