"""--dtype auto: the fastest safe precision on the device at hand, by measurement."""

import pytest
import torch

import hardware

CPU = torch.device("cpu")


def favour(monkeypatch, fast: torch.dtype):
    """Make the measurement say that `fast` runs 10x faster than the others."""
    monkeypatch.setattr(hardware, "matmul_gflops", lambda dtype, *a, **k: 100.0 if dtype == fast else 10.0)


def test_auto_picks_bfloat16_where_its_matmuls_are_fast(monkeypatch):
    favour(monkeypatch, torch.bfloat16)
    dtype, why = hardware.choose_dtype("auto", CPU, lambda: (576, 1536))
    assert dtype == "bfloat16"
    assert "float32 10.0 GFLOP/s" in why and "bfloat16 100.0 GFLOP/s" in why


def test_auto_picks_float32_where_bfloat16_is_emulated(monkeypatch):
    favour(monkeypatch, torch.float32)
    assert hardware.choose_dtype("auto", CPU, lambda: (576, 1536))[0] == "float32"


def test_bfloat16_must_win_by_a_margin(monkeypatch):
    speeds = {torch.float32: 100.0, torch.bfloat16: 100.0 * hardware.BF16_MARGIN * 0.9}
    monkeypatch.setattr(hardware, "matmul_gflops", lambda dtype, *a, **k: speeds[dtype])
    assert hardware.choose_dtype("auto", CPU, lambda: (576, 1536))[0] == "float32"


@pytest.mark.parametrize("asked", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_obeyed_without_measuring(monkeypatch, asked):
    monkeypatch.setattr(hardware, "matmul_gflops", lambda *a, **k: pytest.fail("measured"))
    assert hardware.choose_dtype(asked, CPU, lambda: (576, 1536))[0] == asked
    with pytest.raises(ValueError, match="float64"):
        hardware.choose_dtype("float64", CPU, lambda: (576, 1536))


@pytest.mark.parametrize("bf16, expected", [(True, "bfloat16"), (False, "float16")])
def test_auto_on_cuda_follows_the_gpu(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(hardware, "matmul_gflops", lambda *a, **k: pytest.fail("measured"))
    dtype, _ = hardware.choose_dtype("auto", torch.device("cuda"), lambda: (4096, 14336))
    assert dtype == expected
    assert hardware.mixed_precision_for(dtype) == ("fp16" if dtype == "float16" else "no")


def test_the_real_measurement_is_quick_and_positive():
    speed = hardware.matmul_gflops(torch.float32, 128, 576, 1536, CPU, seconds=0.01)
    assert speed > 0.1
    assert isinstance(hardware.describe(CPU), str) and "threads" in hardware.describe(CPU)
