"""Settings: dataclass fields with their help, parsed by transformers' HfArgumentParser.

Every script declares its settings as dataclass fields made with `setting` (a default and a
one-line meaning) and parses them with `parse`, so each one takes the same command line:

    python finetune.py --lr 1e-4                      # flags
    python finetune.py configs/llama3-8b.yaml --lr 1e-4   # a config file's values, then flags
    python finetune.py --help                         # every setting, its value in force, its meaning

A bad command line ends in one line and status 2 (argparse's usual): an unknown flag, with
the setting it was probably meant to be; a config file that is missing, unreadable or names
an unknown setting; a value out of its range (the dataclass's `__post_init__` says which).
"""

from __future__ import annotations

import argparse
import difflib
import textwrap
from dataclasses import MISSING, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# Names other trainers use for these settings (Hugging Face's Trainer, nanoGPT): a user
# who types one is told the name here.
OTHER_NAMES = {"learning_rate": "lr", "per_device_train_batch_size": "batch_size", "num_train_epochs": "epochs",
               "max_epochs": "epochs", "train_batch_size": "batch_size", "warmup": "warmup_steps",
               "max_grad_norm": "grad_clip", "output": "output_dir", "out": "out_dir", "model": "llm",
               "lora_rank": "lora_r", "rank": "lora_r", "data": "data_csv", "ckpt": "checkpoint"}


class SettingsError(ValueError):
    """A setting out of its range, or one this machine cannot run: said in one line."""


def setting(default=MISSING, help: str = "", **kwargs):
    """A dataclass field with its one-line meaning (shown by --help); without a default, a
    setting that must be given."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def check(condition: bool, name: str, value, allowed: str):
    """For __post_init__: raise SettingsError naming the setting, its value and what is allowed."""
    if not condition:
        raise SettingsError(f"--{name} {value}: {allowed}")


class _HelpFormatter(argparse.HelpFormatter):
    def _split_lines(self, text, width):  # keep values such as meta-llama/Llama-3.1-8B whole
        return textwrap.wrap(text, width, break_on_hyphens=False)


def make_parser(*classes, program: str | None = None, positional: str = "") -> HfArgumentParser:
    # A one-line usage: an error is then two short lines, not the list of every setting.
    usage = f"%(prog)s [--help] [CONFIG.yaml] [--SETTING VALUE ...]{' ' + positional if positional else ''}"
    parser = HfArgumentParser(classes, prog=program, usage=usage, formatter_class=_HelpFormatter)
    for action in parser._actions:
        if action.dest != "help":
            # argparse formats help with %: a literal one ("15% faster") must be doubled.
            action.help = f"{(action.help or '').replace('%', '%%')} [now: %(default)s]"
    return parser


def read_config_file(path: str, parser: HfArgumentParser, classes) -> dict:
    """A config file's settings (YAML, or JSON, which is YAML too), or parser.error naming the
    file and, for a syntax error, the line."""
    if not Path(path).is_file():
        parser.error(f"{path}: no such config file")
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        parser.error(f"{path}: {where}not valid YAML ({getattr(error, 'problem', None) or error})")
    except (OSError, UnicodeDecodeError) as error:
        parser.error(f"{path}: cannot be read ({error})")
    if not isinstance(values, dict):
        parser.error(f"{path}: expected settings as `name: value` lines, found a {type(values).__name__}")
    unknown = set(values) - {name for c in classes for name in c.__dataclass_fields__}
    if unknown:
        parser.error(f"{path}: unknown settings {', '.join(sorted(unknown))}")
    return values


def unknown_flag_message(flags: list[str], parser: HfArgumentParser) -> str:
    known = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    messages = []
    for flag in [f for f in flags if f.startswith("-")] or flags:  # the flags, not their values
        name = flag.split("=", 1)[0]
        guess = OTHER_NAMES.get(name.lstrip("-"))
        guesses = ([f"--{guess}"] if guess and f"--{guess}" in known else []) or \
            difflib.get_close_matches(name, known, n=1, cutoff=0.7)
        messages.append(f"{flag}" + (f" (did you mean {guesses[0]}?)" if guesses else ""))
    return "unrecognized arguments: " + ", ".join(messages)


def parse(argv: list[str], *classes, program: str | None = None, positional: tuple[str, dict] | None = None) -> tuple:
    """The dataclasses `classes` from an optional config file (new defaults) and flags; with
    `positional` (a name and add_argument's keywords), also a namespace holding it."""
    parser = make_parser(*classes, program=program,
                         positional=f"[{positional[1].get('metavar', positional[0])} ...]" if positional else "")
    if positional:
        parser.add_argument(positional[0], **positional[1])
    argv = list(argv)
    if argv and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        parser.set_defaults(**read_config_file(argv.pop(0), parser, classes))
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except SettingsError as error:
        parser.error(str(error))
    if remaining:
        parser.error(unknown_flag_message(remaining, parser))
    return tuple(parsed)
