"""The README stays true: its file table names files that exist (and every script and tool
is in it), its links lead somewhere, and every command in its code blocks (and in
docs/PERFORMANCE.md's, docs/GUIDE.md's and the Makefile's) parses with the settings of the
script or tool it runs. No model loads: each command's flags go through the same parser the
script's `__main__` uses, and nothing runs after that.
"""

import argparse
import contextlib
import io
import re
import shlex
import subprocess

import pytest

from conftest import ROOT

README = ROOT / "README.md"
DOCS = [README, ROOT / "docs" / "LOG.md", ROOT / "docs" / "PERFORMANCE.md", ROOT / "docs" / "GUIDE.md"]
# Files whose fenced code blocks hold commands of today's code. docs/LOG.md is left out:
# it keeps each command as it was run at its commit.
COMMAND_FILES = [README, ROOT / "docs" / "PERFORMANCE.md", ROOT / "docs" / "GUIDE.md"]
# "VAR=value ... python X.py ...", "python -m tools.NAME ...", "accelerate launch ... X.py ..."
COMMAND = re.compile(r"^(?:[A-Za-z_]\w*=\S*\s+)*(?:python3?\s|accelerate\s+launch\s)")


def file_table() -> list[str]:
    """The paths in the first column of the tables under README's `## Files`."""
    section = README.read_text(encoding="utf-8").split("\n## Files\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)


def test_the_file_table_names_files_that_exist():
    paths = file_table()
    assert len(paths) > 20, "README's `## Files` table is missing or nearly empty"
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README's file table names files that do not exist: {missing}"


def repo_files() -> list[str]:
    """The repo's files: git's list where there is one (so that work not yet added does not
    count), else what is on disk."""
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return listed.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]


def test_every_script_tool_and_document_is_in_the_file_table():
    listed = set(file_table())
    wanted = re.compile(r"^(?:[^/]+\.py|tools/[^/]+\.py|docs/[^/]+\.(?:py|md)|configs/[^/]+)$")
    unlisted = sorted(p for p in repo_files() if wanted.match(p) and p not in listed)
    assert not unlisted, f"files missing from README's file table: {unlisted}"


@pytest.mark.parametrize("document", DOCS, ids=lambda p: p.name)
def test_links_lead_somewhere(document):
    text = document.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    broken = [t for t in targets if not t.startswith(("http://", "https://", "#"))
              and not (document.parent / t.split("#")[0]).exists()]
    assert not broken, f"{document.name}: links to nothing: {broken}"


@pytest.mark.parametrize("document", DOCS, ids=lambda p: p.name)
def test_numbers_carry_dates_not_sessions(document):
    """A number says when, on which commit and machine it was measured, not who measured it."""
    text = document.read_text(encoding="utf-8")
    for pattern in (r"\bsessions?\b", r"\bprevious\b", r"\bissues?\s+#?\d+", r"(?<![\w&/])#\d+\b"):
        found = re.search(pattern, text, flags=re.IGNORECASE)
        assert not found, f"{document.name}: {found.group(0)!r} near {text[max(0, found.start() - 60):found.end() + 60]!r}"


# ---------------------------------------------------------------------------- commands

def commands_in(path) -> list[tuple[str, str]]:
    """(where, command line) for each command of a script or tool in `path`: in fenced code
    blocks of a Markdown file (continued lines joined), or `$(BIN)/python` lines of a Makefile."""
    found = []
    if path.name == "Makefile":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if "$(BIN)/python " in line:
                found.append((f"Makefile:{number}", line.strip().replace("$(BIN)/python", "python", 1)))
        return found
    fenced, pending, start = False, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced, pending = not fenced, ""
            continue
        if not fenced:
            continue
        if not pending:
            start = number
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if COMMAND.match(pending):
            found.append((f"{path.name}:{start}", pending))
        pending = ""
    return found


def script_and_arguments(line: str) -> tuple[str, list[str]] | None:
    """("finetune.py" or "tools.check", its arguments), or None for a command that runs no
    script or tool of this repo (python -m pytest, ...)."""
    tokens = [t for t in shlex.split(line, comments=True) if t != "..."]
    while re.match(r"^[A-Za-z_]\w*=", tokens[0]):  # environment variables before the command
        tokens.pop(0)
    if tokens[0] == "accelerate":
        at = next(i for i, t in enumerate(tokens) if t.endswith(".py"))
        return tokens[at], tokens[at + 1:]
    if tokens[1] == "-m":
        return (tokens[2], tokens[3:]) if tokens[2].startswith("tools.") else None
    return tokens[1], tokens[2:]


class Parsed(Exception):
    """Raised right after renderer.py's argparse parsed its command line: nothing runs."""


def parse_renderer(argv, monkeypatch):
    # renderer.py parses with plain argparse inside main(); stop main() as soon as its own
    # parser has accepted the command line, before it reads or writes any file.
    import renderer

    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse_args(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed):
        renderer.main(argv)


def parse(script: str, argv: list[str], monkeypatch):
    """Parse argv as `script`'s __main__ does; SystemExit (parser.error) on a bad command line."""
    import settings

    positional = None
    if script == "renderer.py":
        return parse_renderer(argv, monkeypatch)
    if script in ("finetune.py", "tools.check", "tools.memory"):
        import finetune
        return finetune.parse_configs(argv)
    if script == "tools.benchmark":
        import finetune
        from tools import benchmark
        return finetune.parse_configs(argv, benchmark.BenchmarkConfig)
    if script == "tools.vision_probe":
        import finetune
        from tools import vision_probe
        return finetune.parse_configs(argv, vision_probe.Arguments)
    if script == "inference.py":
        import inference
        classes, positional = (inference.Arguments,), ("image_paths", {"nargs": "*"})
    elif script == "create_images.py":
        import create_images
        classes = (create_images.Arguments,)
    elif script == "llama_shape.py":
        import llama_shape
        classes = (llama_shape.Arguments,)
    elif script == "tools.robustness":
        from tools import robustness
        classes = (robustness.Arguments,)
    elif script == "tools.other_renderer":
        from tools import other_renderer
        classes = (other_renderer.Arguments,)
    elif script == "tools.gpu_proof":
        from tools import gpu_proof
        classes = (gpu_proof.ProofConfig,)
    elif script == "tools.learning_curve":
        from tools import learning_curve
        classes, positional = (learning_curve.Arguments,), ("run_dirs", {"nargs": "*"})
    else:
        pytest.fail(f"no parser known for {script}: add it to tests/test_readme.py's parse()")
    return settings.parse(argv, *classes, positional=positional)


COMMANDS = [c for path in [*COMMAND_FILES, ROOT / "Makefile"] for c in commands_in(path)]


def test_the_readme_has_commands():
    assert sum(where.startswith("README.md") for where, _ in COMMANDS) >= 10


@pytest.mark.parametrize("where,line", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_command_parses(where, line, monkeypatch):
    found = script_and_arguments(line)
    if found is None:
        return  # not a script or tool of this repo
    script, argv = found
    argv = [a for a in argv if a not in ("--help", "-h")]  # --help would print and exit 0
    monkeypatch.chdir(ROOT)  # config files are named relative to the repo's root
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parse(script, argv, monkeypatch)
    except SystemExit as exit:
        pytest.fail(f"{where}: `{line}` does not parse (exit {exit.code}): {errors.getvalue().strip()}")
