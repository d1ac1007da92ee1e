"""tools/benchmark.py --vs_trainer: the same model, adapter and batches through transformers' Trainer."""

import json

from test_finetune import run_tool, tiny_args


def test_benchmark_times_the_same_steps_through_transformers_trainer(tiny_llm, tiny_clip, tiny_dataset, tmp_path):
    result = run_tool("benchmark", *tiny_args(tiny_llm, tiny_clip, tiny_dataset, tmp_path), "--steps", "3",
                      "--generate_images", "2", "--vs_trainer", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["trainer_step_seconds"] > 0
    ratio = numbers["trainer_step_seconds"] / numbers["train_step_seconds"]  # of rounded times: not exact
    assert abs(numbers["trainer_over_ours_per_picture"] - ratio) <= 0.05 * ratio + 0.01
    assert "trainer_over_ours_per_picture" in result.stdout.splitlines()[-2]
