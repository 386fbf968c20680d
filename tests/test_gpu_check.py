"""scripts/gpu_check.py (make gpu-check) where no GPU is: it refuses in one line, every run it would start
is a valid recipe for its world size, and its DDP and throughput logic run on the CPU."""
import importlib.util

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_without_cuda_it_exits_1_with_one_line(capsys):
    assert gpu_check.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]


@pytest.mark.parametrize("name", list(gpu_check.RUNS))
def test_each_run_is_a_valid_recipe(name, tmp_path):
    from dist_robust.config import load_config
    from dist_robust.preflight import preflight
    args = gpu_check.run_args(name, str(tmp_path))
    assert args[:2] == ["train", gpu_check.RECIPE]
    cfg = load_config(str(ROOT / args[1]), args[2:])
    preflight([cfg], world_size=gpu_check.RUNS[name][0])
    assert cfg.run.device == "cuda"


@pytest.mark.slow
def test_the_ddp_check_and_the_throughput_rows_run_on_the_cpu():
    assert gpu_check.nccl_ddp_check(backend="gloo", device="cpu")["ok"]
    speed = gpu_check.throughput("cnn3", 32, 8, repeats=1, device="cpu")
    assert {"fp32", "bf16"} <= speed.keys() and speed["fp32"]["at/bound"] > 0
    table, record = gpu_check.report({"nccl_ddp": {"ok": True, "detail": ""}, "fp16": {"ok": False, "detail": "x"}},
                                     {"cnn3": speed}, 1.0)
    assert not record["all_ok"] and "| fp16 | NO |" in table and "| cnn3 | 32 | 8 | bf16 |" in table
