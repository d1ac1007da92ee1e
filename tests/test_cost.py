"""cost.RunCost: FLOPs counted by torch, once per shape where asked, phase by phase."""

import torch

import cost


def matmul(n):
    torch.ones(n, n) @ torch.ones(n, n)  # 2 n^3 FLOPs


def test_each_phase_gets_its_work_and_the_training_phases_make_train_flops():
    run = cost.RunCost(peak_gflops=100.0, train_flops=5)
    for _ in range(3):
        with run.count("training steps", shape=(8, 30)):
            matmul(16)
    with run.count("training steps", shape=(8, 31)):
        matmul(32)
    with run.count("validation"):
        matmul(8)
    with run.count("validation"):  # no shape: counted again, whatever it does
        matmul(16)
    run.add("CLIP features", 1000, 0.5)
    assert run.phases["training steps"]["flops"] == 3 * 2 * 16 ** 3 + 2 * 32 ** 3
    assert run.phases["validation"]["flops"] == 2 * 8 ** 3 + 2 * 16 ** 3
    assert run.train_flops == 5 + run.phases["training steps"]["flops"]  # CLIP and validation are not training
    assert run.by_shape == {("training steps", (8, 30)): 2 * 16 ** 3, ("training steps", (8, 31)): 2 * 32 ** 3}
    table = run.table()
    assert table["CLIP features"] == {"flops": 1000, "seconds": 0.5, "share_of_peak": round(1000 / 0.5 / 1e9 / 100, 4)}
    assert table["in all"]["flops"] == 1000 + run.phases["training steps"]["flops"] + run.phases["validation"]["flops"]
    assert "share of the peak" in run.report() and "in all" in run.report()
