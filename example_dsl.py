"""A DSL of your own, the smallest whole one: copy it and change it (docs/SPEC.md, "A DSL of your own").

    python finetune.py --dsl example_dsl.py --data_csv my/data.csv --quadrant_loss 0

It names the colour a picture is mostly filled with: `red`, `green` or `blue`.
"""

NAME = "colour"
GRAMMAR = "grammars/example.lark"  # what the model may write, relative to this file
COLOURS = ("red", "green", "blue")


def canonical(text: str) -> str:
    """One form per meaning (exact match compares it); ValueError for a text that is not valid."""
    word = text.strip().lower()
    if word not in COLOURS:
        raise ValueError(f"not one of {', '.join(COLOURS)}: {text!r}")
    return word
