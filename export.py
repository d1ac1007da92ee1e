"""Export a checkpoint as a standalone model: a folder that needs none of this repo's code.

    python export.py checkpoints exported                      # a run's best checkpoint
    python export.py checkpoints/epoch-01 exported --eval_csv test.csv   # scores measured now, in the card
    python export.py checkpoints exported --push_to_hub you/diagram-reader   # private unless --private false

The folder is written whole or not at all (a temporary folder beside OUT_DIR, renamed at the
end), and --eval_csv is checked before anything is: a bad CSV, a kill or a full disk leave no
half folder. It holds:

    llm/                    the LLM with the LoRA adapter and the new tokens merged into its weights
                            (safetensors) and its tokenizer: AutoModelForCausalLM.from_pretrained loads it
    vision.safetensors      the frozen CLIP image tower's weights, up to the block that is read
    clip/NAME.json          the tower's open_clip architecture
    projector.safetensors   the projector (feature statistics, LayerNorm, MLP, position embeddings)
    reader_config.json      what reading needs: the block, image size, merge, preprocessing, the
                            prompt's token ids, the solved examples, the DSL's files, the dtype
    examples/               the solved example pictures the prompt shows (few-shot configurations)
    read.py                 the reader (read_exported.py): it reads as inference.py --ink_margin 0
                            --find_canvas false does (the model alone: the DSL's grammar, batches) and imports only torch, transformers, open_clip,
                            safetensors, PIL, xgrammar and the files below: python read.py FOLDER picture.png
    grammar.py              constrained decoding from a grammar file (the repo's grammar.py)
    looks.py                the picture as CLIP gets it: as it is, normalised or scanned (the repo's looks.py)
    dsl/                    the DSL's module (its canonical form) and its grammar file
    README.md               a model card with the hub's front matter and the scores read.py itself
                            measured; it names no local path
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

import checkpoint
import data
import files
import hardware
import language_model
import languages
import read_exported
import settings
from checkpoint import CheckpointError, read_json
from model import DiagramReader, ModelConfig
from settings import setting

HUB_NAMES = {language_model.SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}
# What the card says the model was trained with: what it is, not how training ran.
CARD_SETTINGS = ("llm", "llm_layers", "clip_model", "clip_pretrained", "image_features", "clip_layer", "image_size",
                 "patch_merge", "projector", "image_positions", "lora_r", "lora_alpha", "lora_target_modules",
                 "num_shots", "instruction", "target_format", "dsl", "image_look")
PATH_SETTINGS = ("llm", "clip_model", "clip_pretrained", "dsl")  # may name a local file or folder


@dataclass
class Arguments:
    eval_csv: str = setting("", "a data CSV to score the exported model on, for the card (e.g. test.csv)")
    dtype: str = setting("float32", "the dtype the LLM is saved in and read.py computes in: float32, bfloat16, "
                                    "float16")
    push_to_hub: str = setting("", "a hub repository id (you/name) to upload the folder to")
    private: bool = setting(True, "--push_to_hub creates a private repository (false: public, anyone can "
                                  "download it)")

    def __post_init__(self):
        settings.check(self.dtype in hardware.DTYPES, "dtype", self.dtype, ", ".join(hardware.DTYPES))


def export(reader: DiagramReader, state: dict, out: Path, args: Arguments, eval_rows: list[data.Row]) -> dict:
    """Write the standalone folder whole or not at all: into a temporary folder beside `out`,
    renamed to it at the end. The card's scores on `eval_rows` are read by the exported reader
    itself, from what was written. Returns reader_config."""
    with files.replacing_folder(out) as folder:
        config = write_model(reader, folder, args.dtype)
        scores = measure(folder, eval_rows, args.eval_csv, reader.language) if eval_rows else None
        (folder / "README.md").write_text(model_card(reader.config, state, scores))
    return config


def write_model(reader: DiagramReader, out: Path, dtype: str) -> dict:
    """Everything but the card: the merged LLM, the vision tower, the projector, the examples,
    reader_config.json and read.py. Returns reader_config."""
    reader.llm.save_pretrained(out / "llm", safe_serialization=True)
    reader.tokenizer.save_pretrained(out / "llm")

    vision = reader.vision
    blocks = len(vision.visual.transformer.resblocks)
    deeper = () if vision.features == "pooled" else \
        tuple(f"transformer.resblocks.{i}." for i in range(vision.layer + 1, blocks))  # never run
    save_file({k: v.contiguous() for k, v in vision.visual.state_dict().items() if not k.startswith(deeper)},
              out / "vision.safetensors")
    name = Path(reader.config.clip_model).stem
    (out / "clip").mkdir()
    (out / "clip" / f"{name}.json").write_text(json.dumps(vision.architecture, indent=2) + "\n")
    save_file({k: v.detach().float().contiguous() for k, v in reader.projector.state_dict().items()
               if not k.startswith("quadrant_head")}, out / "projector.safetensors")  # the head only trains

    (out / "examples").mkdir()
    examples = []
    for i, (image, text) in enumerate(reader.examples):
        image.save(out / "examples" / f"{i}.png")
        examples.append({"image": f"examples/{i}.png", "dsl": text, "dsl_ids": reader.dsl_ids(text)})
    config = {"clip_model": name, "image_features": vision.features, "clip_layer": vision.layer,
              "image_look": reader.config.image_look,
              "image_size": vision.visual.image_size[0], "patch_merge": reader.projector.patch_merge,
              "preprocess": vision.visual.preprocess_cfg, "instruction": reader.config.instruction,
              "instruction_ids": reader.instruction_ids, "image_start_id": reader.image_start_id,
              "image_end_id": reader.image_end_id, "end_id": reader.end_id,
              "max_new_tokens": reader.max_new_tokens, "appends_end": reader.appends_end,
              **write_dsl(reader, out), "examples": examples, "dtype": dtype,
              "trained_with": card_settings(reader.config)}
    (out / "reader_config.json").write_text(json.dumps(config, indent=2, default=list) + "\n")
    shutil.copy(Path(__file__).with_name("read_exported.py"), out / "read.py")
    for module in ("grammar.py", "looks.py"):  # the repo's own, which read.py loads from the folder
        shutil.copy(Path(__file__).with_name(module), out / module)
    return config


def write_dsl(reader: DiagramReader, out: Path) -> dict:
    """The DSL's module and grammar file, copied into the folder: read.py's canonical form and
    constrained decoding (the grammar file is also what a vLLM structured-output request takes)."""
    language = reader.language
    if language.module is None:  # free text
        return {"dsl_module": "", "grammar": ""}
    module = Path(language.module.__file__)
    (out / "dsl").mkdir()
    shutil.copy(module, out / "dsl" / module.name)
    grammar = ""
    if language.grammar_file and reader.config.target_format != "text":  # the grammar is of the DSL's target
        grammar = f"dsl/{language.grammar_file.name}"
        shutil.copy(language.grammar_file, out / grammar)
    return {"dsl_module": f"dsl/{module.name}", "grammar": grammar}


def measure(folder: Path, rows: list[data.Row], csv_path: str, language: languages.Language) -> dict:
    """The scores of the reader in `folder` (read.py's code) on the CSV's rows."""
    reader = read_exported.Reader(folder)
    readings = reader.read([data.load_image(row.image_path) for row in rows])
    scores = language.score(readings, [row.dsl for row in rows])
    scores.pop("by_count", None)
    print(f"{csv_path}: exact match {scores['exact_match']:.4f}, character error rate {scores['cer']:.4f} "
          f"on {scores['n']} pictures, read by the exported reader", file=sys.stderr)
    return {"csv": Path(csv_path).name, "date": time.strftime("%Y-%m-%d"), "machine": hardware.describe(reader.device),
            **scores}


def local_name(value: str) -> str:
    """A local file or folder by its name alone: the card is public, this machine's paths are not."""
    return Path(value).name if Path(value).is_absolute() or Path(value).exists() else value


def card_settings(config: ModelConfig) -> dict:
    return {name: local_name(getattr(config, name)) if name in PATH_SETTINGS else getattr(config, name)
            for name in CARD_SETTINGS}


def hub_id(llm: str) -> str | None:
    """The base LLM's hub id, or None for a local folder or file and for random weights."""
    if llm in HUB_NAMES:
        return HUB_NAMES[llm]
    return llm if re.fullmatch(r"[\w.-]+/[\w.-]+", llm) and not Path(llm).exists() else None


def model_card(config: ModelConfig, state: dict, scores: dict | None) -> str:
    base = hub_id(config.llm)
    validation = state.get("validation") or {}
    name = local_name(config.dsl)
    lines = ["---", *([f"base_model: {base}"] if base else []), "library_name: transformers",
             "pipeline_tag: image-text-to-text", "tags:",
             *(f"  - {t}" for t in ("diagrams", "dsl", "lora", "clip", "llava", "vision-language")),
             "---", "", f"# Picture reader: {name}", "",
             f"Reads pictures into the DSL `{name}` (its module and grammar file are in `dsl/`). A frozen "
             f"CLIP {Path(config.clip_model).stem} image tower ({local_name(config.clip_pretrained)} weights), a "
             f"projector and {base or local_name(config.llm)} with a merged LoRA adapter (r={config.lora_r}, on "
             f"{', '.join(config.lora_target_modules)}) and the DSL's tokens as new tokens.", "", "## Scores", ""]
    if scores:
        own = "".join(f", {k[:-3].replace('_', ' ')} F1 {v:.4f}" for k, v in scores.items() if k.endswith("_f1"))
        lines.append(f"On {scores['csv']} ({scores['n']} pictures), read by `read.py` as exported, measured "
                     f"{scores['date']} on {scores['machine']}: exact match {scores['exact_match']:.4f}{own}, "
                     f"valid {scores['valid_rate']:.4f}, character error rate {scores['cer']:.4f}.")
    if validation:
        lines.append(f"During training: validation exact match {validation['exact_match']:.4f} at step "
                     f"{state['step']}.")
    if not scores and not validation:
        lines.append("Not measured: export with --eval_csv to put scores here.")
    grammar = "greedy decoding" if config.target_format == "text" or config.dsl == "text" else \
        "greedy decoding that follows the DSL's grammar file (only the tokens it allows next)"
    lines += ["", "## Use", "", "```", "pip install torch transformers open_clip_torch safetensors pillow xgrammar",
              "python read.py . picture.png [more.png ...]", "```", "",
              "`read.py` (in this folder) is the whole reader: it loads `llm/` with `AutoModelForCausalLM`, runs "
              f"the image tower up to the block it reads, the projector, and {grammar} after the prompt "
              f"({config.num_shots} solved example(s), then the picture), a batch of pictures at a time. The "
              "grammar file is also what a vLLM structured-output request takes.", ""]
    return "\n".join(lines)


def push(out: Path, repo_id: str, private: bool) -> int:
    """Upload the folder; one line and status 1 where the hub cannot be reached."""
    visibility = "private" if private else "public"
    print(f"uploading {out} to {repo_id}, a {visibility} repository (--private {str(not private).lower()} for a "
          f"{'public' if private else 'private'} one; a repository that exists keeps its own)")
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo_id)
    except Exception as error:  # offline, no token, no rights: all end the same way for the user
        print(f"export.py: could not upload to the hub ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
              f"the folder {out} is complete: upload it later with "
              f"`hf upload {repo_id} {out}{' --private' if private else ''}`", file=sys.stderr)
        return 1
    print(f"uploaded {out} to https://huggingface.co/{repo_id}")
    return 0


def main(args: Arguments, checkpoint_path: str, out_dir: str) -> int:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not an empty folder: export into a new one")
    folder, why = checkpoint.find(checkpoint_path)
    language = languages.load(read_json(folder / "config.json").get("dsl", "diagram"))
    eval_rows = data.read_dataset(args.eval_csv, language=language)[0] if args.eval_csv else []  # before any write
    print(f"checkpoint {folder} ({why})", file=sys.stderr)
    reader = DiagramReader.from_pretrained(folder, hardware.DTYPES[args.dtype], merge_adapter=True)
    state = checkpoint.read_state(folder) if (folder / "state.json").is_file() else {}
    if out.is_dir():
        out.rmdir()  # empty: the export then takes its place in one rename
    export(reader, state, out, args, eval_rows)
    print(f"wrote {out}: read with `python {out / 'read.py'} {out} picture.png`, or load {out / 'llm'} with "
          "AutoModelForCausalLM")
    return push(out, args.push_to_hub, args.private) if args.push_to_hub else 0


if __name__ == "__main__":
    arguments, places = settings.parse(sys.argv[1:], Arguments, program="export.py",
                                       positional=("places", {"nargs": "*", "metavar": "CHECKPOINT OUT_DIR",
                                                              "help": "a run folder or checkpoint, then the folder to "
                                                                      "write"}))
    if len(places.places) != 2:
        print("export.py: error: give a checkpoint (or run folder) and a folder to write", file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(main(arguments, *places.places))
    except files.DiskFull as error:
        print(f"export.py: error: {error}", file=sys.stderr)
        sys.exit(1)
    except (CheckpointError, data.DataError) as error:
        print(f"export.py: error: {error}", file=sys.stderr)
        sys.exit(2)
