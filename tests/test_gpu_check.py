"""scripts/gpu_check.py (make gpu-check) where no GPU is: it refuses in one line; every run it would start is
a valid recipe for its world size; its stages' plumbing (torchrun launches, workers, result parsing, the
2-rank against 1-rank count comparison, the CPU against CPU comparison of stage g) runs on the CPU at a tiny
size, labelled as no GPU result; and its DDP, throughput and report logic run in-process."""
import importlib.util
import json
import sys

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up
spec.loader.exec_module(gpu_check)


def test_without_cuda_it_exits_1_with_one_line(capsys):
    assert gpu_check.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]


class _Ctx:
    def __init__(self, device, tmp_path):
        self.device, self.scale, self.work = device, gpu_check.GPU if device == "cuda" else gpu_check.CPU, tmp_path


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_run_is_a_valid_recipe_for_its_world_size(device, tmp_path):
    import yaml

    from dist_robust.config import load_stages
    from dist_robust.preflight import preflight
    runs = gpu_check.recipes(_Ctx(device, tmp_path))
    assert set(runs) == {"a", "b", "c", "d", "e"}
    for name, (ranks, recipe) in runs.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        stages = load_stages(str(path), [f"run.out_dir={tmp_path}", f"run.name={name}"])
        preflight(stages, world_size=ranks)
        assert all(s.run.device == device for s in stages)
    a = load_stages(str(tmp_path / "a.yaml"))
    assert [s.method.name for s in a] == ["pgd_at", "twins_at"] and all(s.model.sync_bn for s in a)
    assert all(s.dist.backend == "gloo" for s in a) and runs["a"][0] == 2
    c = load_stages(str(tmp_path / "c.yaml"))
    assert [(s.train.precision, s.attack.compile) for s in c] == [("bf16", "on"), ("fp16", "on")]
    assert c[0].train.channels_last and c[0].attack.channels_last
    assert c[1].attack.precision == ("fp16" if device == "cuda" else "bf16")  # the CPU refuses fp16 attacks


def test_the_report_names_each_stage_and_a_failure_fails_the_check(tmp_path):
    stages = {"a": {"status": "ok", "detail": "x | y", "seconds": 1.0},
              "e": {"status": "skipped", "detail": "ffcv is not installed", "seconds": 0.0},
              "g": {"status": "FAILED", "detail": "g.eval_gpu: exit 1: boom", "seconds": 2.0}}
    table, record = gpu_check.report(stages, {}, 3.0, "title")
    assert "| a two_ranks_one_gpu | ok | 1 | x / y |" in table and "| g cpu_vs_gpu | FAILED |" in table
    assert not record["all_ok"] and set(record["stages"]) == {"a_two_ranks_one_gpu", "e_ffcv", "g_cpu_vs_gpu"}
    del stages["g"]
    assert gpu_check.report(stages, {}, 3.0, "title")[1]["all_ok"]  # a skipped stage is said, not failed
    assert gpu_check.default_json("NVIDIA H200", gpu_check.datetime.date(2026, 12, 4)) == \
        ROOT / "results" / "gpu" / "2026-12-04-nvidia-h200.json"
    torchrun_tail = "RuntimeError: boom\n[rank0]: torch.distributed.DistBackendError: x\nChildFailedError: \nFAILED"
    assert gpu_check.error_line(torchrun_tail) == "[rank0]: torch.distributed.DistBackendError: x"
    assert gpu_check.error_line("dist-robust: error: data.name=x: unknown\nTraceback") == \
        "dist-robust: error: data.name=x: unknown"


def test_ffcv_is_skipped_saying_why_where_it_is_not_installed(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name, *a: None if name == "ffcv" else real(name, *a))
    ctx = gpu_check.Context("cpu", gpu_check.CPU, tmp_path, open(tmp_path / "log", "w"), 60)
    out = gpu_check.run_stage(ctx, "e")
    assert out["status"] == "skipped" and "ffcv is not installed" in out["detail"]


def test_a_cpu_record_is_never_written_under_results_gpu(capsys):
    assert gpu_check.main(["--device", "cpu", "--only", "e", "--json", str(ROOT / "results" / "gpu" / "x.json")]) == 2
    assert "no record under results/gpu/" in capsys.readouterr().err


@pytest.mark.slow
def test_the_ddp_check_and_the_throughput_rows_run_on_the_cpu():
    assert gpu_check.nccl_ddp_check(backend="gloo", device="cpu")["same"]
    speed = gpu_check.throughput("cnn3", 8, 4, repeats=1, device="cpu", k=1)
    assert {"fp32", "bf16"} <= speed.keys() and speed["fp32"]["at/bound"] > 0 and speed["bf16"]["pgd/clean"] > 0
    table, _ = gpu_check.report({"f": {"status": "ok", "detail": "", "seconds": 1.0}}, {"cnn3": speed}, 1.0, "t")
    assert "| cnn3 | 8 | 4 | bf16 |" in table


@pytest.mark.multiproc
def test_the_stages_plumbing_runs_on_the_cpu(tmp_path, capsys):
    """Stage a (the gloo probe on 2 ranks, the sync-BN PGD-AT + TWINS-AT pipeline on 2 ranks, its
    evaluation with AutoAttack on 2 ranks and on 1, the counts compared) and stage g (stage b's recipe,
    evaluated by two worker processes), at the CPU plumbing run's size; a record outside results/gpu."""
    record = tmp_path / "cpu.json"
    rc = gpu_check.main(["--device", "cpu", "--only", "a,g", "--json", str(record), "--log", str(tmp_path / "log")])
    out = capsys.readouterr().out
    assert "NOT a GPU result" in out
    res = json.loads(record.read_text())
    assert rc == 0, json.dumps(res["stages"], indent=1)
    a, g = res["stages"]["a_two_ranks_one_gpu"], res["stages"]["g_cpu_vs_gpu"]
    assert res["plumbing_only"] and a["status"] == g["status"] == "ok"
    assert a["counts"]["n"] == gpu_check.CPU.eval_limit and {"clean", "pgd-20", "aa"} <= a["counts"].keys()
    assert set(a["gloo"]) == set(gpu_check.COLLECTIVES) and "gloo carries every probed collective" in a["detail"]
    assert g["counts"]["cpu"]["n"] == gpu_check.CPU.g_limit
