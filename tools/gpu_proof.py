"""The reference configuration on one GPU at Llama-3.1-8B's full shape, offline, in minutes.

    python -m tools.gpu_proof            # a CUDA GPU: all 32 layers
    python -m tools.gpu_proof --small    # anywhere: the same path on 1 full-width layer (the tests run this)

No weights to download: the LLM is llama_shape.py's (Llama-3.1-8B's config and real
tokenizer, random weights) and CLIP ViT-B-32 is random. Three parts, each in a fresh process:

1. FP16 LoRA as configs/llama3-8b.yaml says (batch 4, one shot, FP16 with the gradient
   scaler): benchmark.py's timed steps and generation. Prints the step time, tokens/s, the
   step's share of this GPU's measured FP16 matmul peak (MFU), generation at batch 1 and
   32, and the peak memory allocated.
2. QLoRA (--load_in_4bit): the shape written to a folder, finetune.py on a few generated
   diagrams, its step time and peak memory from log.jsonl; then inference.py reads with
   that adapter on the unquantised FP16 base. (--small, or no bitsandbytes: plain LoRA
   on the same folder, so the path is still exercised.)
3. One summary line per part, then one JSON object.

Offline packages: besides torch, transformers, peft, accelerate and tiktoken, it needs
open_clip_torch, ftfy, wcwidth, llama-models and (for QLoRA) bitsandbytes. On a machine
with internet, download them as wheels (`pip download --no-deps -d .whl open_clip_torch==3.3.0
ftfy wcwidth llama-models==0.3.0 bitsandbytes`), carry .whl over, and there run
`pip install --no-index --no-deps .whl/*.whl`.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import settings
from settings import setting

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = [str(ROOT / "configs/llama3-8b.yaml"), "--clip_pretrained", "none"]  # the LLM is given per part


@dataclass
class ProofConfig:
    small: bool = setting(False, "1 layer, 2 steps, the precision this machine does fast: the whole path in "
                                 "minutes on a CPU")
    steps: int = setting(30, "FP16 training steps timed")
    work_dir: str = setting("", "where the base (16 GB) and the runs go; empty: a temporary folder")


def run(*args: str) -> str:
    """A repo script (or `-m`, a tool) in a fresh process (each part's memory is its own); its stdout."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)
    name = " ".join(args[:2] if args[0] == "-m" else args[:1])
    if result.returncode:
        sys.exit(f"gpu_proof: {name} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    print(f"  ({name} took {time.perf_counter() - started:.0f} s)", flush=True)
    return result.stdout


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def main(proof: ProofConfig) -> dict:
    cuda = torch.cuda.is_available()
    if not cuda and not proof.small:
        sys.exit("gpu_proof.py: no CUDA GPU here; `python -m tools.gpu_proof --small` runs the same path on one layer")
    size = ["--llm_layers", "1", "--dtype", "auto", "--mixed_precision", "no"] if proof.small else []
    steps = "2" if proof.small else str(proof.steps)
    results = {}

    print("1. FP16 LoRA, the reference configuration" + (" (small: 1 layer, dtype auto)" if proof.small else ""))
    bench = last_json(run("-m", "tools.benchmark", *REFERENCE, "--llm", "llama3.1-8b-shape", *size, "--steps", steps,
                          "--generate_images", "4" if proof.small else "32"))
    results["lora"] = bench
    print(f"   step {bench['train_step_seconds']} s, {bench['train_tokens_per_second']} tokens/s, "
          f"{bench['train_step_share_of_peak']:.0%} of the measured {bench['dtype']} matmul peak, "
          f"generation {bench['generate_images_per_second_batch1']} images/s at batch 1 and "
          f"{bench['generate_images_per_second_batch32']} at batch 32, peak "
          f"{bench['peak_memory_gib']} GiB")

    quantize = cuda and not proof.small and importlib.util.find_spec("bitsandbytes") is not None
    print("2. " + ("QLoRA (4-bit NF4 base)" if quantize else "LoRA on a folder base (QLoRA needs a CUDA GPU, "
                                                            "bitsandbytes and the full run)"))
    work = Path(proof.work_dir or tempfile.mkdtemp(prefix="gpu_proof_"))
    base = work / "llama3.1-8b-shape"
    run("llama_shape.py", "--out", str(base), *(["--layers", "1"] if proof.small else []),
        "--dtype", "bfloat16" if proof.small else "float16")  # on disk; each run casts to its --dtype
    run("create_images.py", "--num_samples", "40", "--num_test", "8", "--out_dir", str(work / "data"))
    run_dir = work / "run"
    run("finetune.py", *REFERENCE, "--llm", str(base), *size, "--data_csv", str(work / "data/data.csv"),
        "--output_dir", str(run_dir),
        "--epochs", "1", "--warmup_steps", "1", "--eval_every", "0", "--eval_samples", "4", "--wandb_mode", "disabled",
        *(["--load_in_4bit"] if quantize else []))
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps_logged = [r for r in records if "step_seconds" in r]
    timed = sorted(r["step_seconds"] for r in steps_logged[1:] or steps_logged)
    scores = last_json(run("inference.py", "--checkpoint", str(run_dir), "--llm", str(base), "--csv",
                           str(work / "data/test.csv"), "--eval", "--dtype", "auto" if proof.small else "float16"))
    results["folder_base"] = {"quantized": quantize, "steps": len(steps_logged),
                              "step_seconds": timed[len(timed) // 2],
                              "peak_memory_gib": max(r["peak_memory_gib"] for r in steps_logged),
                              "read_back_on_the_unquantised_base": scores}
    print(f"   {len(steps_logged)} steps, {timed[len(timed) // 2]:.2f} s a step, peak "
          f"{results['folder_base']['peak_memory_gib']:.2f} GiB; its adapter read {scores['n']} test "
          f"images on the unquantised base (valid {scores['valid_rate']:.2f}; random weights: exact is not the point)")
    return results


if __name__ == "__main__":
    proof_config, = settings.parse(sys.argv[1:], ProofConfig, program="python -m tools.gpu_proof")
    print(json.dumps(main(proof_config)))
