"""Bad settings end in one clear line and status 2, before any data or model loads; --help
works everywhere; two runs cannot share an output folder."""

import os
import signal
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from hypothesis import strategies as st

import checkpoint
import create_images
import finetune
import inference
import model
import settings
from conftest import ROOT
from test_finetune import run_script, run_tool

SCRIPTS = ["finetune.py", "inference.py", "create_images.py", "export.py", "llama_shape.py"]
TOOLS = ["benchmark", "check", "memory", "gpu_proof", "robustness", "other_renderer", "learning_curve", "vision_probe",
         "other_mermaid", "grammar_cost"]


@pytest.mark.parametrize("script", SCRIPTS + [f"tools.{t}" for t in TOOLS])
def test_help_works_for_every_script_and_tool(script):
    result = run_tool(script.split(".")[1], "--help") if script.startswith("tools.") else run_script(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "Traceback" not in result.stderr


BAD = [  # (script, arguments, what the one line must say)
    ("finetune.py", ["--learning_rate", "1e-3"], "--learning_rate (did you mean --lr?)"),
    ("finetune.py", ["--lr", "-1"], "--lr -1.0: a learning rate above 0"),
    ("finetune.py", ["--batch_size", "0"], "--batch_size 0: at least 1"),
    ("finetune.py", ["--batch_size", "eight"], "invalid int value: 'eight'"),
    ("finetune.py", ["--patch_merge", "3"], "--patch_merge 3: does not divide the 8 x 8 patch grid"),
    ("finetune.py", ["--lora_dropout", "1.5"], "--lora_dropout 1.5"),
    ("finetune.py", ["--llm_layers", "31", "--data_csv", "none.csv"], "--llm_layers 31: smollm2 has 30 layers"),
    ("finetune.py", ["nope.yaml"], "nope.yaml: no such config file"),
    ("finetune.py", ["BAD_YAML"], "line 2: not valid YAML"),
    ("inference.py", ["--batch_sise", "8"], "--batch_sise (did you mean --batch_size?)"),
    ("create_images.py", ["--damage", "2"], "--damage is a share"),
    ("tools.robustness", ["--num", "x"], "invalid int value"),
]


@pytest.mark.parametrize("script, arguments, message", BAD, ids=[" ".join([s, *a]) for s, a, _ in BAD])
def test_a_bad_setting_is_one_line_and_status_2(script, arguments, message, tmp_path):
    if arguments == ["BAD_YAML"]:
        (tmp_path / "bad.yaml").write_text("epochs: 2\nlr: 1e-3: oops\n")
        arguments = [str(tmp_path / "bad.yaml")]
    before = sorted(tmp_path.iterdir())
    result = run_tool(script.split(".")[1], *arguments) if script.startswith("tools.") else \
        run_script(script, *arguments, cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_an_unreadable_checkpoint_names_the_file(tmp_path):
    folder = tmp_path / "run" / "epoch-01"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{llm: smollm2,\n")
    result = run_script("inference.py", "--checkpoint", str(folder), str(ROOT / "example.png"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{folder / 'config.json'}: not a readable JSON file" in result.stderr


PARSERS = [lambda argv: finetune.parse_configs(argv),
           lambda argv: settings.parse(argv, inference.Arguments, positional=("image_paths", {"nargs": "*"})),
           lambda argv: settings.parse(argv, create_images.Arguments)]
FLAGS = sorted({f"--{name}" for c in (model.ModelConfig, finetune.TrainConfig, inference.Arguments,
                                      create_images.Arguments) for name in c.__dataclass_fields__})
WORDS = st.one_of(st.sampled_from(FLAGS), st.sampled_from(["--learning_rate", "--lr=", "-x", "--", "--help_me"]),
                  st.sampled_from(["0", "-1", "1e9", "nan", "inf", "-0.5", "abc", "", "true", "3"]), st.text(max_size=6))


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(PARSERS))), st.lists(WORDS, max_size=6))
def test_mangled_command_lines_never_escape_as_a_traceback(parser_index, argv):
    """Whatever the command line, a parser returns settings or exits with argparse's status 2."""
    if "-h" in argv or any(a.startswith("--h") and "--help".startswith(a.split("=")[0]) for a in argv):
        return  # --help (or an abbreviation of it) prints and exits 0: tested above
    try:
        PARSERS[parser_index](argv)
    except SystemExit as exit:
        assert exit.code == 2


def test_two_runs_cannot_share_an_output_dir_and_a_dead_one_does_not_block(tmp_path):
    first = checkpoint.hold(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=f"in use by another training run \\(pid {os.getpid()}\\)"):
        checkpoint.hold(tmp_path)
    first.close()
    checkpoint.hold(tmp_path).close()  # released: the next run takes it

    # A run killed while holding the folder leaves no lock behind.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, checkpoint; "
                               f"lock = checkpoint.hold({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(checkpoint.CheckpointError, match=f"pid {holder.pid}"):
        checkpoint.hold(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    checkpoint.hold(tmp_path).close()
