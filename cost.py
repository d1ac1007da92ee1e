"""What a training run costs, phase by phase: its work in FLOPs (numbers no machine changes),
its seconds, and the share of the machine's matmul peak it reached. finetune.py prints the
table at its end and logs it (log.jsonl's last record, W&B's summary)."""

from __future__ import annotations

import contextlib
import functools
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# The phases whose FLOPs make a run's train_flops (logged every step, kept in state.json).
TRAINING_PHASES = ("projector warm-up", "training steps")


class RunCost:
    """FLOPs are counted by torch's FlopCounterMode (as tools/benchmark.py counts a step).
    Where a piece of work's count depends only on its shape (a training step's packed tokens
    and targets), each shape is counted once and the count reused: counting slows the work it
    counts."""

    def __init__(self, peak_gflops: float = 0.0, train_flops: int = 0):
        self.peak_gflops, self.train_flops = peak_gflops, train_flops
        self.phases: dict[str, dict] = {}  # name -> {"flops", "seconds"}, this process's share of the run
        self.by_shape: dict[tuple, int] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def count(self, phase: str, shape: tuple | None = None, processes: int = 1):
        """Time the work inside as part of `phase` and add its FLOPs (those of all `processes`):
        counted once per `shape`, or every time where shape is None."""
        started = time.perf_counter()
        if shape is not None and (phase, shape) in self.by_shape:
            yield
            flops = self.by_shape[phase, shape]
        else:
            with FlopCounterMode(display=False) as counter:
                yield
            flops = counter.get_total_flops() * processes
            if shape is not None:
                self.by_shape[phase, shape] = flops
        self.add(phase, flops, time.perf_counter() - started)

    @contextlib.contextmanager
    def count_calls(self, phase: str, *modules):
        """Time the work inside as part of `phase` and add the FLOPs of its calls of `modules`
        (each call's forward, counted once per call_shape): for work made of calls whose
        shapes repeat in an order that varies, as decoding with a cache does. The work's
        FLOPs outside those calls are not counted."""
        started, flops = time.perf_counter(), 0

        def counted(module, forward):
            @functools.wraps(forward)  # its signature too: transformers' generate reads it to choose arguments
            def forward_counted(*args, **kwargs):
                nonlocal flops
                key = (phase, type(module).__name__, call_shape(args, kwargs))
                if key in self.by_shape:
                    out = forward(*args, **kwargs)
                else:
                    with FlopCounterMode(display=False) as counter:
                        out = forward(*args, **kwargs)
                    self.by_shape[key] = counter.get_total_flops()
                flops += self.by_shape[key]
                return out
            return forward_counted

        own = [(module, vars(module).get("forward")) for module in modules]
        for module in modules:
            module.forward = counted(module, module.forward)
        try:
            yield
        finally:
            for module, forward in own:
                if forward is None:
                    del module.forward  # the class's own again
                else:
                    module.forward = forward
        self.add(phase, flops, time.perf_counter() - started)

    def add(self, phase: str, flops: int, seconds: float):
        entry = self.phases.setdefault(phase, {"flops": 0, "seconds": 0.0})
        entry["flops"] += flops
        entry["seconds"] += seconds
        if phase in TRAINING_PHASES:
            self.train_flops += flops

    def table(self) -> dict:
        """Each phase and the whole run so far: FLOPs, seconds and share of the peak; "other" is
        the time in no phase (loading, batching, logging, checkpoints)."""
        rows = dict(self.phases)
        seconds = time.perf_counter() - self.started
        rows["other"] = {"flops": 0, "seconds": max(0.0, seconds - sum(r["seconds"] for r in self.phases.values()))}
        rows["in all"] = {"flops": sum(r["flops"] for r in self.phases.values()), "seconds": seconds}
        return {name: {"flops": row["flops"], "seconds": round(row["seconds"], 2),
                       "share_of_peak": round(self.share(row["flops"], row["seconds"]), 4)}
                for name, row in rows.items()}

    def share(self, flops: float, seconds: float) -> float:
        return flops / seconds / 1e9 / self.peak_gflops if seconds and self.peak_gflops else 0.0

    def report(self) -> str:
        """The table, as text."""
        lines = [f"{'phase':20}{'TFLOP':>9}{'seconds':>10}{'share of the peak':>19}"
                 f"  (peak: {self.peak_gflops:.0f} GFLOP/s, the LLM's matmul as timed)"]
        for name, row in self.table().items():
            share = f"{row['share_of_peak']:.2f}" if row["flops"] else "-"
            lines.append(f"{name:20}{row['flops'] / 1e12:>9.2f}{row['seconds']:>10.1f}{share:>19}")
        return "\n".join(lines)


def call_shape(args: tuple, kwargs: dict) -> tuple:
    """What a forward call's FLOPs depend on: its tensors' shapes, its plain values and the
    length of a cache it is given."""
    def shape(value):
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        if hasattr(value, "get_seq_length"):  # transformers' caches
            return ("cache", value.get_seq_length())
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return type(value).__name__
    return tuple(map(shape, args)) + tuple((name, shape(value)) for name, value in sorted(kwargs.items()))
