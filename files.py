"""Files and folders written whole or not at all.

Everything the repo writes goes to a temporary name beside its place, is flushed to the disk
(fsync), and is then renamed over it: a crash or a kill at any point leaves the old version,
the new one, or nothing, never half of one. A full disk is a `DiskFull` error naming the path,
raised after the temporary files are gone.

    with files.replacing("data.csv") as temporary:      # a file written by other code
        write_csv(temporary)
    files.write_text("best", "epoch-01\\n")            # a small file in one go
    with files.replacing_folder("exported") as temporary:  # a whole folder
        write_everything_into(temporary)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
from pathlib import Path

TEMPORARY, OLD = ".tmp-", ".old-"  # prefixes of the names a write uses beside its target


class DiskFull(OSError):
    """No space left on the device; the message names what was being written."""

    def __str__(self):
        return self.strerror  # one line for the user, without "[Errno 28]"


def is_disk_full(error: BaseException) -> bool:
    # Libraries written in Rust or C (safetensors, PIL) report ENOSPC in their message only.
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


def disk_full(path: Path) -> DiskFull:
    return DiskFull(errno.ENOSPC, f"the disk is full: could not write {path}; nothing half-written was left. "
                                  "Free some space and run again")


def sync_folder(folder: Path):
    """Make a rename or a new file inside `folder` durable (the folder's own entry list)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_tree(folder: Path):
    """fsync every file under `folder` and every folder's entry list, deepest first."""
    for parent, _, names in os.walk(folder, topdown=False):
        for name in names:
            with open(os.path.join(parent, name), "rb+") as f:
                os.fsync(f.fileno())
        sync_folder(Path(parent))


def _temporary_name(path: Path) -> Path:
    # The suffix stays last, so that code choosing a format by it (PIL's save) still can.
    return path.with_name(f"{TEMPORARY}{os.getpid()}-{path.name}")


@contextlib.contextmanager
def replacing(path: str | Path, durable: bool = True):
    """Yield a temporary path beside `path` to write; when the block ends without an error,
    the file is synced and renamed to `path`. On an error it is removed. `durable=False`
    skips the syncs (the rename alone is whole against a kill, not a power cut): for many
    small files that the caller syncs at once (os.sync) before anything names them."""
    path = Path(path)
    temporary = _temporary_name(path)
    try:
        yield temporary
        if durable:
            with open(temporary, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(temporary, path)
        if durable:
            sync_folder(path.parent)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, Exception) and is_disk_full(error):
            raise disk_full(path) from None
        raise


def write_bytes(path: str | Path, content: bytes):
    with replacing(path) as temporary:
        Path(temporary).write_bytes(content)


def write_text(path: str | Path, text: str):
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value):
    write_text(path, json.dumps(value, indent=2) + "\n")


@contextlib.contextmanager
def replacing_folder(path: str | Path):
    """Yield an empty temporary folder beside `path` to fill; when the block ends without an
    error, everything in it is synced and the folder takes `path`'s place (an older `path` is
    moved aside first, then removed). On an error the temporary folder is removed. A kill
    between the two renames leaves the old folder as `.old-NAME`: `recover` puts it back."""
    path = Path(path)
    temporary = path.with_name(TEMPORARY + path.name)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        yield temporary
        sync_tree(temporary)
        if path.exists():
            old = path.with_name(OLD + path.name)
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            temporary.rename(path)
            sync_folder(path.parent)
            shutil.rmtree(old)
        else:
            temporary.rename(path)
            sync_folder(path.parent)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, Exception) and is_disk_full(error):
            raise disk_full(path) from None
        raise


def recover(folder: str | Path):
    """Tidy `folder` after a crash: a `.old-NAME` whose NAME is missing was moved aside by an
    interrupted `replacing_folder` and is the last whole version: it goes back; other
    `.old-*` and every `.tmp-*` are leftovers and are removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for leftover in sorted(folder.glob(OLD + "*")):
        target = folder / leftover.name[len(OLD):]
        if target.exists():
            _remove(leftover)
        else:
            leftover.rename(target)
    for leftover in folder.glob(TEMPORARY + "*"):
        _remove(leftover)


def _remove(path: Path):
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def append_line(path: str | Path, line: str):
    """Append one line and flush it to the disk. A kill or a full disk can tear only this last
    line, which `read_jsonl` then drops."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        if is_disk_full(error):
            raise disk_full(Path(path)) from None
        raise


def read_jsonl(path: str | Path, program: str = "") -> list:
    """The records of a JSON-lines file; a torn last line (a kill during its write) is dropped
    with a one-line warning. A bad line elsewhere is an error: the file was not ours to tear."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[number:]):
                raise ValueError(f"{path}: line {number} is not JSON") from None
            print(f"{program or 'warning'}: {path}: dropped a torn last line (a write interrupted)",
                  file=sys.stderr)
    return records
