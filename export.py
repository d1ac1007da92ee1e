"""Export a checkpoint as a standalone model: a folder that needs none of this repo's code.

    python export.py checkpoints exported                      # a run's best checkpoint
    python export.py checkpoints/epoch-01 exported --eval_csv test.csv   # scores measured now, in the card
    python export.py checkpoints exported --push_to_hub you/diagram-reader

The folder holds:

    llm/                    the LLM with the LoRA adapter and the new tokens merged into its weights
                            (safetensors) and its tokenizer: AutoModelForCausalLM.from_pretrained loads it
    vision.safetensors      the frozen CLIP image tower's weights, up to the block that is read
    clip/NAME.json          the tower's open_clip architecture
    projector.safetensors   the projector (feature statistics, LayerNorm, MLP, position embeddings)
    reader_config.json      what reading needs: the block, image size, merge, preprocessing, the
                            prompt's token ids, the solved examples, the dtype
    examples/               the solved example pictures the prompt shows (few-shot configurations)
    read.py                 a ~60-line reader that imports only torch, transformers, open_clip,
                            safetensors and PIL: python read.py FOLDER picture.png
    README.md               a model card with the hub's front matter and the measured scores
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import checkpoint
import data
import dsl
import hardware
import language_model
import settings
from model import FULL_DIAGRAM, CheckpointError, DiagramReader
from settings import setting

HUB_NAMES = {language_model.SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass
class Arguments:
    eval_csv: str = setting("", "a data CSV to score the exported model on, for the card (e.g. test.csv)")
    dtype: str = setting("float32", "the dtype the LLM is saved in and read.py computes in: float32, bfloat16, "
                                    "float16")
    push_to_hub: str = setting("", "a hub repository id (you/name) to upload the folder to")

    def __post_init__(self):
        settings.check(self.dtype in hardware.DTYPES, "dtype", self.dtype, ", ".join(hardware.DTYPES))


def export(checkpoint_folder: Path, out: Path, args: Arguments) -> dict:
    """Write the standalone folder; return reader_config."""
    reader = DiagramReader.from_pretrained(checkpoint_folder, hardware.DTYPES[args.dtype], merge=True)
    out.mkdir(parents=True, exist_ok=True)
    reader.llm.save_pretrained(out / "llm", safe_serialization=True)
    reader.tokenizer.save_pretrained(out / "llm")

    vision = reader.vision
    blocks = len(vision.visual.transformer.resblocks)
    deeper = tuple(f"transformer.resblocks.{i}." for i in range(vision.layer + 1, blocks))  # never run
    save_file({k: v.contiguous() for k, v in vision.visual.state_dict().items() if not k.startswith(deeper)},
              out / "vision.safetensors")
    name = Path(reader.config.clip_model).stem
    (out / "clip").mkdir(exist_ok=True)
    (out / "clip" / f"{name}.json").write_text(json.dumps(vision.architecture, indent=2) + "\n")
    save_file({k: v.detach().float().contiguous() for k, v in reader.projector.state_dict().items()
               if not k.startswith("quadrant_head")}, out / "projector.safetensors")  # the head only trains

    (out / "examples").mkdir(exist_ok=True)
    examples = []
    for i, (image, text) in enumerate(reader.examples):
        image.save(out / "examples" / f"{i}.png")
        examples.append({"image": f"examples/{i}.png", "dsl": text, "dsl_ids": reader.dsl_ids(text)})
    config = {"clip_model": name, "clip_layer": vision.layer, "image_size": vision.visual.image_size[0],
              "patch_merge": vision.merge, "preprocess": vision.visual.preprocess_cfg,
              "instruction": reader.config.instruction, "instruction_ids": reader.instruction_ids,
              "image_start_id": reader.image_start_id, "image_end_id": reader.image_end_id,
              "end_id": reader.end_id, "max_new_tokens": len(reader.dsl_ids(dsl.to_text(FULL_DIAGRAM))) + 8,
              "position_first": reader.position_first, "examples": examples, "dtype": args.dtype,
              "trained_with": reader.config.__dict__}
    (out / "reader_config.json").write_text(json.dumps(config, indent=2, default=list) + "\n")
    shutil.copy(Path(__file__).with_name("read_exported.py"), out / "read.py")

    scores = measure(reader, args.eval_csv) if args.eval_csv else None
    (out / "README.md").write_text(model_card(reader, checkpoint_folder, scores, args))
    return config


def measure(reader: DiagramReader, csv_path: str) -> dict:
    rows = data.read_dataset(csv_path)[0]
    readings = reader.read_images([row.image_path for row in rows])
    scores = dsl.score([r.dsl for r in readings], [row.dsl for row in rows])
    print(f"{csv_path}: exact match {scores['exact_match']:.4f}, element F1 {scores['element_f1']:.4f} "
          f"on {scores['n']} pictures", file=sys.stderr)
    return {"csv": csv_path, "date": time.strftime("%Y-%m-%d"), "machine": hardware.describe(torch.device("cpu")),
            **{k: scores[k] for k in ("n", "exact_match", "element_f1", "valid_rate")}}


def model_card(reader: DiagramReader, checkpoint_folder: Path, scores: dict | None, args: Arguments) -> str:
    config = reader.config
    base = HUB_NAMES.get(config.llm, config.llm)
    state = checkpoint.read_state(checkpoint_folder) if (checkpoint_folder / "state.json").is_file() else {}
    validation = state.get("validation") or {}
    lines = ["---", f"base_model: {base}", "library_name: transformers", "pipeline_tag: image-text-to-text",
             "tags:", *(f"  - {t}" for t in ("diagrams", "dsl", "lora", "clip", "llava", "vision-language")),
             "---", "", "# Diagram reader", "",
             f"Reads pictures of simple diagrams (up to four shapes, one per quadrant) into a small DSL. A frozen "
             f"CLIP {config.clip_model} image tower ({config.clip_pretrained} weights), a projector and "
             f"{base} with a merged LoRA adapter (r={config.lora_r}, on {', '.join(config.lora_target_modules)}) "
             "and the DSL's tags as new tokens.", "", "## Scores", ""]
    if scores:
        lines.append(f"On {scores['csv']} ({scores['n']} pictures), measured {scores['date']} on {scores['machine']}: "
                     f"exact match {scores['exact_match']:.4f}, element F1 {scores['element_f1']:.4f}, valid "
                     f"{scores['valid_rate']:.4f}.")
    if validation:
        lines.append(f"During training: validation exact match {validation['exact_match']:.4f} and element F1 "
                     f"{validation['element_f1']:.4f} at step {state['step']}.")
    if not scores and not validation:
        lines.append("Not measured: export with --eval_csv to put scores here.")
    lines += ["", "## Use", "", "```", "pip install torch transformers open_clip_torch safetensors pillow",
              "python read.py . picture.png", "```", "",
              "`read.py` (in this folder) is the whole reader: it loads `llm/` with `AutoModelForCausalLM`, runs "
              "the image tower up to the block it reads, the projector, and greedy decoding after the prompt "
              f"({config.num_shots} solved example(s), then the picture).", "",
              "The DSL: `<StartDiagram>`, then one line `<Size> <Shape> <Position>` per element (Large, Medium, "
              "Small; Circle, Square, Triangle; TopLeft, TopRight, BottomLeft, BottomRight), then `<EndDiagram>`.", ""]
    return "\n".join(lines)


def push(out: Path, repo_id: str) -> int:
    """Upload the folder; one line and status 1 where the hub cannot be reached."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo_id)
    except Exception as error:  # offline, no token, no rights: all end the same way for the user
        print(f"export.py: could not upload to the hub ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
              f"the folder {out} is complete: upload it later with `hf upload {repo_id} {out}`", file=sys.stderr)
        return 1
    print(f"uploaded {out} to https://huggingface.co/{repo_id}")
    return 0


def main(args: Arguments, checkpoint_path: str, out_dir: str) -> int:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not an empty folder: export into a new one")
    folder, why = checkpoint.find(checkpoint_path)
    print(f"checkpoint {folder} ({why})", file=sys.stderr)
    export(folder, out, args)
    print(f"wrote {out}: read with `python {out / 'read.py'} {out} picture.png`, or load {out / 'llm'} with "
          "AutoModelForCausalLM")
    return push(out, args.push_to_hub) if args.push_to_hub else 0


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
    except (CheckpointError, data.DataError) as error:
        print(f"export.py: error: {error}", file=sys.stderr)
        sys.exit(2)
