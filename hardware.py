"""What this machine is, and which precision is fast on it, by measurement.

CPUs differ more than their names say: without AVX-512-BF16 or AMX a bfloat16 matmul is
emulated, far slower than float32; with them it is faster (docs/LOG.md). So `--dtype auto`
times one matmul of the model's own shape in each precision at start-up and takes the fastest.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import resource
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The flags that decide matmul speed on x86 CPUs, as /proc/cpuinfo names them.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# bfloat16 must beat float32 by this much to be chosen: it costs precision.
BF16_MARGIN = 1.25


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def cpu_flags() -> list[str]:
    """Which of CPU_FLAGS this CPU has (Linux; empty elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return []
    for line in cpuinfo.read_text(errors="ignore").splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in CPU_FLAGS if flag in present]
    return []


def describe(device: torch.device) -> str:
    """One line: the GPU and its memory, or the CPU, its threads and its matmul flags."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB)"
    name = platform.processor() or platform.machine()
    for line in (Path("/proc/cpuinfo").read_text(errors="ignore").splitlines()
                 if Path("/proc/cpuinfo").is_file() else []):
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
            break
    flags = " ".join(cpu_flags()) or "none of " + "/".join(CPU_FLAGS)
    return (f"CPU {name}, {torch.get_num_threads()} threads, flags: {flags} "
            f"(torch kernels: {torch.backends.cpu.get_cpu_capability()})")


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(dtype: torch.dtype, m: int, k: int, n: int, device: torch.device,
                  seconds: float = 0.05) -> float:
    """GFLOP/s of an [m, k] @ [k, n] matmul: one warm-up, then repeats for about `seconds`
    (at least one, however slow)."""
    generator = torch.Generator().manual_seed(0)  # its own: timing leaves the run's random stream alone
    a = torch.randn(m, k, generator=generator).to(device, dtype)
    b = torch.randn(k, n, generator=generator).to(device, dtype)
    a @ b
    synchronize(device)
    start, repeats = time.perf_counter(), 0
    while repeats == 0 or time.perf_counter() - start < seconds:
        a @ b
        repeats += 1
        synchronize(device)
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def choose_dtype(requested: str, device: torch.device, mlp_shape, tokens: int = 128) -> tuple[str, str]:
    """(dtype name, a line saying why). `requested` other than "auto" is obeyed as it is.

    On CUDA: bfloat16 where the GPU supports it, else float16 (trained with a gradient
    scaler). On a CPU: float32 or bfloat16, whichever multiplies a [tokens, hidden] by a
    [hidden, intermediate] matrix (the LLM's MLP) faster, bfloat16 by at least BF16_MARGIN.
    `mlp_shape()` gives (hidden, intermediate); it is called only when measuring, so that
    an LLM's config is read only then.
    """
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, not {requested!r}")
        return requested, f"dtype {requested} (as asked)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "dtype auto: bfloat16 (this GPU supports it)"
        return "float16", "dtype auto: float16 with a gradient scaler (this GPU has no bfloat16)"
    if device.type != "cpu":
        return "float32", f"dtype auto: float32 (on {device.type})"
    hidden_size, intermediate_size = mlp_shape()
    speed = {name: matmul_gflops(DTYPES[name], tokens, hidden_size, intermediate_size, device)
             for name in ("float32", "bfloat16")}
    chosen = "bfloat16" if speed["bfloat16"] >= BF16_MARGIN * speed["float32"] else "float32"
    figures = ", ".join(f"{name} {gflops:.1f} GFLOP/s" for name, gflops in speed.items())
    return chosen, f"dtype auto: {chosen} ({figures}, measured on a {tokens}x{hidden_size} @ " \
                   f"{hidden_size}x{intermediate_size} matmul)"


def peak_gflops(dtype: torch.dtype, device: torch.device, mlp_shape, tokens: int = 128) -> float:
    """The matmul speed a run's work is measured against: on a CPU the LLM's MLP matmul, the
    one --dtype auto times, the fastest of six short timings (a shared machine slows some of
    them); on a GPU one large enough to reach its peak."""
    if device.type == "cuda":
        return matmul_gflops(dtype, 8192, 8192, 8192, device, seconds=0.5)
    shape = mlp_shape()
    return max(matmul_gflops(dtype, tokens, *shape, device, seconds=0.05) for _ in range(6))


def mixed_precision_for(dtype: str, requested: str = "auto") -> str:
    """accelerate's mixed precision: FP16 weights train under FP16 autocast with a gradient
    scaler (small gradients underflow in FP16 otherwise); bfloat16 and float32 need neither."""
    if requested != "auto":
        return requested
    return "fp16" if dtype == "float16" else "no"


def reset_peak_memory(device):
    """Forget the peak so far (model loading's), so the next reading is the step's own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc: hand memory freed while loading back to the system
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the process's peak RSS (VmHWM)


def peak_memory_gib(device) -> float:
    """GPU: the most memory allocated since the reset; CPU: the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cache_dir() -> Path:
    """Where files made once on this machine are kept (converted models and tokenizers)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diagram-reader"
