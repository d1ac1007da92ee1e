"""Kill a writer at random points: the harness of the tests that every file is whole or absent.

`kill_at_random_points(write, check)` runs `write()` in a forked child (the test's imports and
fixtures are already in it, so a run costs only the write) and SIGKILLs it after a seeded random
delay within the time a whole write takes; after each kill `check(kill_number)` asserts on what
is left. Nothing in the child can tidy up: SIGKILL runs no handler, no `finally`.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time


def run_in_child(write, deadline: float = 120.0) -> tuple[int, float]:
    """(exit status, seconds) of write() run to its end in a forked child."""
    started = time.perf_counter()
    pid = _fork(write)
    status = _wait(pid, deadline)
    return status, time.perf_counter() - started


def kill_at_random_points(write, check, kills: int = 20, seed: int = 0, before=None) -> list[float]:
    """Time one whole write, then `kills` times: `before()` (to lay the old state), fork, kill
    after a delay drawn uniformly over that time, and `check(i)`. Returns the delays."""
    if before:
        before()
    status, whole = run_in_child(write)
    assert status == 0, f"the write itself failed (status {status})"
    rng = random.Random(seed)
    delays = []
    for i in range(kills):
        if before:
            before()
        delay = rng.uniform(0, whole)
        pid = _fork(write)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _wait(pid, 120.0)
        delays.append(delay)
        check(i)
    return delays


def _fork(write) -> int:
    pid = os.fork()
    if pid == 0:  # the child: write, then leave without running the parent's exit handlers
        if "torch" in sys.modules:  # the parent's OpenMP threads are not in the child: waiting on them hangs
            sys.modules["torch"].set_num_threads(1)
        status = 0
        try:
            write()
        except BaseException:  # noqa: BLE001 (a failed write is a status, seen by the parent)
            import traceback

            traceback.print_exc()
            status = 1
        os._exit(status)
    return pid


def _wait(pid: int, deadline: float) -> int:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the writer (pid {pid}) did not end within {deadline} s")
