"""The GPU acceptance run (``make gpu-check``): every CUDA path the CPU machines cannot run, in one command
and at most about 8 minutes on one GPU. Prints a table, writes bench/results/gpu.json, exits 1 if any
check fails, and at once, with one line, on a machine without CUDA.

Checks (real runs of the CLI on digits, or of the engine's own pieces, on cuda:0):
  nccl_ddp            an nccl group (world 1) and the DDP wrapper: bf16 PGD-AT steps through DDP give
                      the parameters the same steps give without it
  sync_bn             2 ranks on the one GPU (gloo carries CUDA tensors), model.sync_bn, train bf16
  fp16                train.precision=fp16 (GradScaler), attack.precision=fp16 with the compiled attack
                      step, evaluated by a compiled fp16 PGD-10 and AutoAttack on the GPU
  ffcv                data.loader=ffcv: the loaders' transfer to the GPU, train bf16
  deepspeed_zero2     dist.engine=deepspeed, ZeRO-2, train bf16
Throughput (random images, one process): PGD-10 adversarial-training images/s of preact_resnet18 at
32 px and resnet50 at 224 px, fp32 and bf16, against the (2k+3)/3 bound from the same run's clean
step, each pair timed interleaved (bench/timing.py).

    make gpu-check                  # or: .venv/bin/python scripts/gpu_check.py [--only NAME,...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RECIPE = "configs/quickstart.yaml"
TINY = ["data.name=digits", "data.subset=null", "data.batch_size=64", "model.name=cnn3", "method.name=pgd_at",
        "attack.eps=0.1", "attack.steps=2", "optim.lr=0.2", "train.epochs=3", "eval.limit=200", "eval.attacks=[clean,pgd-10]",
        "run.device=cuda"]
# name -> (ranks, overrides): runs of the CLI under torchrun
RUNS = {
    "sync_bn": (2, ["model.sync_bn=true", "dist.backend=gloo", "train.precision=bf16", "attack.precision=bf16"]),
    "fp16": (1, ["train.precision=fp16", "attack.precision=fp16", "attack.compile=on", "eval.precision=fp16",
                 "eval.attacks=[clean,pgd-10,aa]", "eval.limit=64"]),
    "ffcv": (1, ["data.loader=ffcv", "train.precision=bf16"]),
    "deepspeed_zero2": (1, ["dist.engine=deepspeed", "dist.zero_stage=2", "train.precision=bf16"]),
}
THROUGHPUT = {"preact_resnet18": (32, 128), "resnet50": (224, 64)}  # model -> (image size, batch)
K = 10


def run_args(name: str, out_dir: str) -> list[str]:
    """The CLI arguments of one run check."""
    return ["train", RECIPE, *TINY, *RUNS[name][1], f"run.out_dir={out_dir}", f"run.name={name}"]


def run_check(name: str, out_dir: str, timeout: int = 150) -> dict:
    ranks, _ = RUNS[name]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           "-m", "dist_robust", *run_args(name, out_dir)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "4"})
    results = Path(out_dir) / name / "results.json"
    if r.returncode != 0 or not results.is_file():
        return {"ok": False, "detail": (r.stdout + r.stderr).strip().splitlines()[-1:] or ["no output"]}
    res = json.loads(results.read_text())
    accs = {"clean": res["clean"]["acc"], **{k: v["acc"] for k, v in res["attacks"].items()}}
    learned = accs["clean"] > 0.5  # this recipe in bf16 on the CPU: 85.5% clean, 38.5% PGD-10
    return {"ok": learned, "detail": " ".join(f"{k} {100 * v:.1f}%" for k, v in accs.items())}


def nccl_ddp_check(backend: str = "nccl", device: str = "cuda") -> dict:
    """bf16 PGD-AT steps of cnn3 through DDP on an nccl group of one rank, against the same steps without
    DDP from the same weights: the same parameters (one rank: DDP's all_reduce averages one gradient).
    (gloo and the CPU: the same logic, tested on the CPU machines.)"""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from dist_robust.config import load_config
    from dist_robust.methods import build_method
    from dist_robust.models import build_model
    from dist_robust.utils import autocast
    cfg = load_config(None, [*TINY, "attack.precision=bf16"], training=False)
    method = build_method(cfg)
    store = dist.FileStore(tempfile.mktemp(prefix="gpu-check-"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        x, y = torch.rand(64, 1, 28, 28, device=device), torch.randint(0, 10, (64,), device=device)
        params = []
        for wrap in (False, True):
            torch.manual_seed(0)
            model = build_model("cnn3", 1, 10, [0.5], [0.25]).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            net = DDP(model, device_ids=[0] if device == "cuda" else None) if wrap else model
            for _ in range(3):
                torch.manual_seed(1)
                with autocast("bf16", device):
                    loss, _ = method.loss(net, x, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            params.append([p.detach().clone() for p in model.parameters()])
        same = all(torch.equal(a, b) for a, b in zip(*params))
        return {"ok": same, "detail": f"loss {loss.item():.3f}, DDP {'=' if same else '!='} plain"}
    finally:
        dist.destroy_process_group()


def throughput(model_name: str, size: int, batch: int, repeats: int, device: str = "cuda") -> dict:
    """Clean and PGD-K AT steps, fp32 and bf16, timed interleaved; images/s and AT / bound."""
    import torch
    from precision import engine_step
    from timing import interleaved
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    out = {"image_size": size, "batch": batch, "k": K}
    for precision in ("fp32", "bf16"):
        extra = [] if precision == "fp32" else ["train.precision=bf16", "attack.precision=bf16"]
        steps = {name: engine_step(model_name, method, [f"attack.steps={K}", *extra], x, y, device=device)
                 for name, method in (("clean", "standard"), ("at", "pgd_at"))}
        res = interleaved(steps, repeats)
        bound = (2 * K + 3) / 3
        out[precision] = {"clean_img_s": batch / res["clean"]["median_s"], "at_img_s": batch / res["at"]["median_s"],
                          "bound_img_s": batch / (bound * res["clean"]["median_s"]),
                          "at/bound": res["at"]["ratio"] / bound, "min": res["at"]["ratio_min"] / bound,
                          "max": res["at"]["ratio_max"] / bound}
    return out


def report(checks: dict, speed: dict, seconds: float) -> tuple[str, dict]:
    """The printed table and the JSON record of a gpu-check."""
    lines = ["| check | ok | detail |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if c['ok'] else 'NO'} | {c['detail']} |" for name, c in checks.items()]
    if speed:
        lines += ["", "| model | px | batch | precision | clean img/s | PGD-10 AT img/s | bound img/s | AT / bound |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, s in speed.items():
            for p in ("fp32", "bf16"):
                r = s[p]
                lines.append(f"| {name} | {s['image_size']} | {s['batch']} | {p} | {r['clean_img_s']:.0f} | "
                             f"{r['at_img_s']:.0f} | {r['bound_img_s']:.0f} | {r['at/bound']:.2f} "
                             f"[{r['min']:.2f}, {r['max']:.2f}] |")
    record = {"checks": checks, "throughput": speed, "seconds": round(seconds, 1),
              "all_ok": all(c["ok"] for c in checks.values())}
    return "\n".join(lines), record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated checks (nccl_ddp, the runs, throughput)")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False): run it on a GPU machine",
              file=sys.stderr)
        return 1
    wanted = set(args.only.split(",")) if args.only else {"nccl_ddp", *RUNS, "throughput"}
    t0, checks, speed = time.perf_counter(), {}, {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as out_dir:
        for name in ["nccl_ddp", *RUNS]:
            if name not in wanted:
                continue
            try:
                checks[name] = nccl_ddp_check() if name == "nccl_ddp" else run_check(name, out_dir)
            except Exception as e:  # one broken path must not hide the others
                checks[name] = {"ok": False, "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            print(f"{name}: {'ok' if checks[name]['ok'] else 'FAILED'} ({checks[name]['detail']})", flush=True)
    if "throughput" in wanted:
        for model_name, (size, batch) in THROUGHPUT.items():
            try:
                speed[model_name] = throughput(model_name, size, batch, args.repeats)
            except Exception as e:
                checks[f"throughput_{model_name}"] = {"ok": False, "detail": f"{type(e).__name__}: {e}"[:200]}
    table, record = report(checks, speed, time.perf_counter() - t0)
    record.update(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, command=" ".join(sys.argv))
    print(table)
    out = ROOT / "bench" / "results" / "gpu.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"-> {out} ({record['seconds']:.0f} s)")
    return 0 if record["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
