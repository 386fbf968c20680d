"""The GPU acceptance run (``make gpu-check``): every CUDA path that the CPU machines cannot run, within a
budget of 450 s on one GPU (one device call of at most 8 minutes with the install). Prints one table, writes
results/gpu/<YYYY-MM-DD>-<gpu>.json, and exits 1 if a stage fails; on a machine without CUDA it exits 1
at once, with one line.

Stages (each a real run of the CLI on scikit-learn's digits, or of the engine's own pieces, on cuda:0; each
named in the table, with its own time limit, and the failing step named in its detail):
  a  two_ranks_one_gpu  2 ranks sharing the GPU over gloo (nccl refuses two ranks on one device): first a
                        probe of which collectives gloo carries for CUDA tensors (named when one fails);
                        then PGD-AT with model.sync_bn and TWINS-AT from it (one pipeline); then clean,
                        PGD-20 and AutoAttack on 200 test points on 2 ranks and on 1: the counts must be equal
  b  nccl_one_rank      DDP on the cpu:gloo,cuda:nccl group a CUDA run makes (world 1): bf16 PGD-AT steps give
                        the parameters they give without DDP, and the group sums a CPU and a CUDA tensor; then a
                        1-rank training and evaluation with dist.backend=nccl
  c  precision          bf16 training and attacks with channels_last and the compiled attack step, then fp16
                        (loss scaler) with fp16 compiled attacks and an fp16 evaluation (one pipeline)
  d  deepspeed_zero2    dist.engine=deepspeed, ZeRO-2, bf16
  e  ffcv               data.loader=ffcv feeding the GPU (skipped, saying why, where ffcv is not installed)
  f  throughput         clean train step, PGD step / train step, PGD-10 AT images/s of preact_resnet18 at
                        32 px and resnet50 at 224 px, fp32 and bf16, each against the (2k+3)/3 bound of the
                        same run's clean step (bench/timing.py's interleaved timing, bench/precision.py's
                        engine_step)
  g  cpu_vs_gpu         stage b's model (else stage a's) evaluated on the CPU and on the GPU (the same 1,797
                        points, the same random starts): clean and PGD-20 accuracy within 0.5 point

On the lent GPU machine (no package registry; its own python3 and torch), with .gpu-bundle/ from
``make gpu-bundle`` named in the device tool's carry (this is the whole command):

    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .gpu-bundle/*.whl && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --log "$OUT/gpu-check.log" --copy-to "$OUT"

Elsewhere: ``make gpu-check`` (scripts/gpu_check.sh: this checkout's .venv, else python3 with the bundle).
``--only a,f`` picks stages; ``--device cpu`` runs the same stages' plumbing on the CPU at a tiny size, for
the tests: it is labelled as no GPU result and writes nothing under results/gpu/.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

K = 10  # PGD steps of the throughput stage's AT step
EPS = 0.1


@dataclass(frozen=True)
class Scale:
    """How big each stage's runs are: ``GPU`` for the acceptance run, ``CPU`` for the plumbing run."""
    subset: int | None          # training images of digits (None: all 1,437)
    epochs: int
    eval_limit: int             # stage a's evaluation points (AutoAttack included), split into 2 blocks
    run_eval_limit: int         # the runs' own end-of-training evaluation
    min_clean: float            # a run "learned" above this clean accuracy (the CPU plumbing run: no bound)
    throughput: dict            # model -> (image size, batch)
    repeats: int
    k: int                      # PGD steps of the AT step
    g_splits: tuple             # stage g's points: digits' test (360) and train (1,437) splits
    g_limit: int | None         # ... the first this many of each (None: all)
    budget_s: int               # all stages together
    limits_s: dict = field(default_factory=dict)  # stage -> its time limit


GPU = Scale(subset=None, epochs=2, eval_limit=200, run_eval_limit=200, min_clean=0.5,
            throughput={"preact_resnet18": (32, 128), "resnet50": (224, 64)}, repeats=10, k=K,
            g_splits=("test", "train"), g_limit=None, budget_s=450,
            limits_s={"a": 200, "b": 75, "c": 150, "d": 75, "e": 75, "f": 100, "g": 60})
CPU = Scale(subset=96, epochs=1, eval_limit=16, run_eval_limit=16, min_clean=0.0,
            throughput={"cnn3": (8, 4)}, repeats=1, k=1, g_splits=("test",), g_limit=32, budget_s=600,
            limits_s={"a": 150, "b": 90, "c": 240, "d": 120, "e": 90, "f": 90, "g": 90})

RUN_ORDER = "abgdefc"  # the compiling stage last: a check cut short by its budget loses the least
STAGES = {  # letter -> name (the table's row)
    "a": "two_ranks_one_gpu", "b": "nccl_one_rank", "c": "precision", "d": "deepspeed_zero2", "e": "ffcv",
    "f": "throughput", "g": "cpu_vs_gpu",
}
# collectives the gloo probe tries on the run's device tensors (the engine itself uses all_reduce, the
# autograd-aware all_reduce of models/sync_bn.py, broadcast, all_gather_object and barrier)
COLLECTIVES = ("all_reduce", "functional_all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all_single", "send_recv",
               "all_gather_object", "barrier")


class StageFailed(Exception):
    """A stage's named failure: its message is the table's detail."""


class Skipped(Exception):
    """A stage that cannot run here, and why (never a pass)."""


# ---------------------------------------------------------------- recipes

def base_recipe(ctx, **sections) -> dict:
    """The tiny recipe every run starts from: cnn3 on digits, PGD-2 adversarial training at eps 0.1."""
    s = ctx.scale
    recipe = {
        "data": {"name": "digits", "subset": s.subset, "batch_size": 64, "eval_batch_size": 100},
        "model": {"name": "cnn3"},
        "method": {"name": "pgd_at"},
        "attack": {"eps": EPS, "steps": 2, "compile": "off"},
        "optim": {"lr": 0.2},
        # CPU plumbing: one thread per rank (two on a busy 2-core machine made AutoAttack's tiny steps 8x slower)
        "train": {"epochs": s.epochs, "log_every": 5, **({"threads": 1} if ctx.device == "cpu" else {})},
        "eval": {"attacks": ["clean", "pgd-10"], "limit": s.run_eval_limit},
        "run": {"device": ctx.device},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def recipes(ctx) -> dict:
    """name -> (ranks, recipe) of every CLI training run the stages start."""
    twins_stages = [
        {"name": "at", "method": {"name": "pgd_at"}, "eval": {"at_end": False}},
        {"name": "twins", "method": {"name": "twins_at"}, "model": {"init_from": "stage:at"},
         "optim": {"lr": 0.05}},  # fine-tuning: at 0.2 it diverged (a non-finite loss)
    ]
    half = "fp16" if ctx.device == "cuda" else "bf16"  # fp16 attacks run on CUDA only (the CPU refuses them)
    precision_stages = [
        {"name": "bf16", "train": {"precision": "bf16", "channels_last": True},
         "attack": {"precision": "bf16", "compile": "on", "channels_last": True}},
        {"name": "fp16", "train": {"precision": "fp16"}, "attack": {"precision": half, "compile": "on"},
         "eval": {"precision": half}},
    ]
    return {
        "a": (2, {**base_recipe(ctx, model={"sync_bn": True}, dist={"backend": "gloo"}), "stages": twins_stages}),
        "b": (1, base_recipe(ctx, dist={"backend": "nccl" if ctx.device == "cuda" else "auto"})),
        "c": (1, {**base_recipe(ctx), "stages": precision_stages}),
        "d": (1, base_recipe(ctx, dist={"engine": "deepspeed", "zero_stage": 2},
                             train={"precision": "bf16"}, attack={"precision": "bf16"})),
        "e": (1, base_recipe(ctx, data={"loader": "ffcv", "ffcv_dir": str(ctx.work / "ffcv")},
                             train={"precision": "bf16"})),
    }


def eval_args(run: Path, out: Path, limit: int) -> list[str]:
    """Stage a's evaluation: two blocks of limit/2 points (the AutoAttack blocks too), so 2 ranks attack
    exactly the batches that 1 rank attacks one after the other."""
    half = str(max(1, limit // 2))
    return ["eval", "--checkpoint", str(run), "--dataset", "digits", "--limit", str(limit),
            "--attacks", "clean,pgd-20,aa", "--batch-size", half, "--aa-block-size", half, "--out", str(out)]


# ---------------------------------------------------------------- running things

class Context:
    """The run's device, scale, work folder, log and deadlines; starts the subprocesses."""

    def __init__(self, device: str, scale: Scale, work: Path, log, budget_s: float):
        self.device, self.scale, self.work, self.log = device, scale, work, log
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.stage_deadline = self.deadline
        self.runs: dict = {}  # what later stages reuse (stage b's run folder)
        path = [str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": "1" if device == "cpu" else "4"}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(k, None)  # a check started inside a torchrun rank must still start its own groups

    def left(self) -> float:
        return min(self.stage_deadline, self.deadline) - time.monotonic()

    def run(self, step: str, args: list[str], nproc: int = 1, module: bool = True) -> str:
        """``torchrun -m dist_robust ARGS`` on nproc ranks, as a user launches it (a bare process would not
        do: DeepSpeed then looks for MPI), or this script (module=False; under torchrun for nproc > 1), in
        its own session so that a time-out stops torchrun and its ranks; its output goes to the log.
        StageFailed names the step (exit status or time-out and the last error line); returns the output."""
        target = ["-m", "dist_robust"] if module else [str(Path(__file__).resolve())]
        cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                 if nproc > 1 or module else []), *target, *args]
        timeout = self.left()
        if timeout < 5:
            raise StageFailed(f"{step}: not started, the stage's time was spent")
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
        try:
            out, _ = p.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            out, timed_out = stop(p), True
        seconds = time.monotonic() - t0
        self.log.write(f"\n$ {' '.join(cmd)}\n{out}\n[{step}: exit {p.returncode}, {seconds:.1f} s]\n")
        self.log.flush()
        if timed_out or p.returncode != 0:
            why = f"timed out after {seconds:.0f} s" if timed_out else f"exit {p.returncode}"
            tail = out.strip().splitlines()[-25:]
            print(f"--- {step} failed ({why}); its last lines:\n" + "\n".join(tail), file=sys.stderr, flush=True)
            raise StageFailed(f"{step}: {why}: {error_line(out)}")
        return out

    def worker(self, step: str, kind: str, nproc: int = 1, **args) -> dict:
        """One of this script's workers (below) in a process of its own; its JSON answer."""
        out = self.work / f"{step}.json"
        self.run(step, ["--worker", kind, "--device", self.device, "--worker-out", str(out),
                        "--worker-args", json.dumps(args)], nproc=nproc, module=False)
        return json.loads(out.read_text())

    def train(self, step: str, name: str, ranks: int, recipe: dict) -> Path:
        """A CLI training run of ``recipe`` on ``ranks`` ranks; its run folder."""
        import yaml
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        self.run(step, ["train", str(path), f"run.out_dir={self.work / 'runs'}", f"run.name={name}"], nproc=ranks)
        return self.work / "runs" / name


def stop(p: subprocess.Popen) -> str:
    """Stop a timed-out launch: SIGTERM to its session (torchrun passes it to its ranks and waits for them),
    then SIGKILL what is left; the output it printed."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return p.communicate(timeout=wait)[0] or ""
        except subprocess.TimeoutExpired:
            continue
    return ""


def error_line(output: str) -> str:
    """The line of a failed run's output that says what went wrong: the CLI's own one-line error, else the
    last Python exception line (not torchrun's summary of its failed children), else the last line."""
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    patterns = (re.compile(r"^dist-robust( \[rank \d+\])?: error: "),
                re.compile(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception|Interrupt)\b: ?\S"))
    for pattern in patterns:
        for line in reversed(lines):
            if pattern.search(line) and "ChildFailedError" not in line:
                return line[:300]
    return lines[-1][:300] if lines else "no output"


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def accuracies(res: dict) -> dict:
    return {"clean": res["clean"]["acc"], **{k: v["acc"] for k, v in res["attacks"].items()}}


def learned(ctx, name: str, run: Path) -> str:
    """A run's clean and robust accuracy, as the detail says them; StageFailed when it did not learn."""
    accs = accuracies(results(run))
    said = f"{name} " + " ".join(f"{k} {100 * v:.1f}%" for k, v in accs.items())
    if not accs["clean"] > ctx.scale.min_clean:  # this recipe reaches about 85% clean on the CPU
        raise StageFailed(f"{said}: did not learn (clean accuracy at most {100 * ctx.scale.min_clean:.0f}%)")
    return said


# ---------------------------------------------------------------- the stages

def stage_a(ctx) -> dict:
    probe = ctx.worker("a.gloo_probe", "gloo_probe", nproc=2)
    failed = {k: v for k, v in probe.items() if v != "ok"}
    carried = "gloo carries every probed collective" if not failed else \
        "gloo cannot carry " + "; ".join(f"{k} ({v})" for k, v in failed.items())
    try:
        ranks, recipe = recipes(ctx)["a"]
        pipeline = ctx.train("a.train", "a", ranks, recipe)
        said = [learned(ctx, "TWINS-AT", pipeline / "twins")]
        ctx.runs["a"] = pipeline / "twins"
        counts = {}
        for world in (2, 1):
            out = ctx.work / f"a-eval-{world}.json"
            ctx.run(f"a.eval_{world}_rank{'s' if world > 1 else ''}",
                    eval_args(pipeline / "twins", out, ctx.scale.eval_limit), nproc=world)
            res = json.loads(out.read_text())
            counts[world] = {"n": res["n"], "clean": res["clean"]["correct"],
                             **{k: v["correct"] for k, v in res["attacks"].items()}}
    except StageFailed as e:
        raise StageFailed(f"{e}; {carried}") from None
    same = counts[2] == counts[1]
    said.append(f"eval of {counts[1]['n']} points, 2 ranks {'=' if same else '!='} 1 rank: "
                + ", ".join(f"{k} {counts[2][k]}" + ("" if counts[2][k] == counts[1][k] else f" vs {counts[1][k]}")
                            for k in counts[1] if k != "n"))
    said.append(carried)
    if not same:
        raise StageFailed("; ".join(said))
    return {"detail": "; ".join(said), "counts": counts[2], "gloo": probe}


def stage_b(ctx) -> dict:
    ddp = ctx.worker("b.ddp", "nccl_ddp")
    if not ddp["same"]:
        raise StageFailed(f"b.ddp: {ddp['detail']}")
    ranks, recipe = recipes(ctx)["b"]
    run = ctx.train("b.train", "b", ranks, recipe)
    ctx.runs["b"] = run
    return {"detail": f"{ddp['detail']}; {learned(ctx, '1-rank run', run)} (world 1: no process group)"}


def stage_c(ctx) -> dict:
    ranks, recipe = recipes(ctx)["c"]
    pipeline = ctx.train("c.train", "c", ranks, recipe)
    said = [learned(ctx, "bf16+channels_last+compiled attack", pipeline / "bf16")]
    said.append(learned(ctx, "fp16+compiled attack", pipeline / "fp16"))
    epochs = [json.loads(ln) for ln in (pipeline / "fp16" / "log.jsonl").read_text().splitlines() if ln.strip()]
    last = [e for e in epochs if e.get("kind") == "epoch"][-1]
    said.append(f"fp16 scaler: {last['skipped_steps']} skipped steps, scale {last['loss_scale']:g}")
    return {"detail": "; ".join(said)}


def stage_d(ctx) -> dict:
    if importlib.util.find_spec("deepspeed") is None:
        raise StageFailed("deepspeed is not installed (make gpu-bundle carries it)")
    ranks, recipe = recipes(ctx)["d"]
    return {"detail": learned(ctx, "ZeRO-2 bf16", ctx.train("d.train", "d", ranks, recipe))}


def stage_e(ctx) -> dict:
    if importlib.util.find_spec("ffcv") is None:
        raise Skipped("ffcv is not installed: no wheel of ffcv 1.0.2 exists for this Python, and building it "
                      "needs OpenCV's and libjpeg-turbo's development files (libopencv-dev, libturbojpeg0-dev), "
                      "which this machine lacks")
    ranks, recipe = recipes(ctx)["e"]
    return {"detail": learned(ctx, "FFCV loader, bf16", ctx.train("e.train", "e", ranks, recipe))}


def stage_f(ctx) -> dict:
    rows = ctx.worker("f.throughput", "throughput", models=ctx.scale.throughput, repeats=ctx.scale.repeats,
                      k=ctx.scale.k)
    bad = [f"{m} {p}" for m, r in rows.items() for p in ("fp32", "bf16")
           if not all(math.isfinite(v) and v > 0 for v in r[p].values() if isinstance(v, float))]
    if bad:
        raise StageFailed(f"no finite timing for {', '.join(bad)}")
    said = [f"{m} {p}: AT/bound {r[p]['at/bound']:.2f}, PGD step/clean step {r[p]['pgd/clean']:.2f}"
            for m, r in rows.items() for p in ("fp32", "bf16")]
    return {"detail": "; ".join(said), "throughput": rows}


def stage_g(ctx) -> dict:
    run = ctx.runs.get("b") or ctx.runs.get("a")
    if run is None:  # stages b and a were not run or failed before training: train b's recipe here
        ranks, recipe = recipes(ctx)["b"]
        run = ctx.train("g.train", "g", ranks, recipe)
    # the plumbing run has no GPU: it compares two evaluations on the CPU
    pair = (("cpu", "cpu"), ("gpu", "cuda")) if ctx.device == "cuda" else (("cpu", "cpu"), ("cpu_again", "cpu"))
    res = {label: ctx.worker(f"g.eval_{label}", "evaluate", eval_device=dev, checkpoint=str(run / "model.json"),
                             splits=list(ctx.scale.g_splits), limit=ctx.scale.g_limit) for label, dev in pair}
    (a, ra), (b, rb) = res.items()
    gap = {k: 100 * abs(ra[k] - rb[k]) / ra["n"] for k in ("clean", "pgd-20")}
    said = (f"{ra['n']} points: {a} clean {ra['clean']} PGD-20 {ra['pgd-20']}, {b} clean {rb['clean']} PGD-20 "
            f"{rb['pgd-20']} (apart: " + ", ".join(f"{k} {v:.2f} pt" for k, v in gap.items()) + ")")
    if max(gap.values()) > 0.5:
        raise StageFailed(f"{said}: more than 0.5 point apart")
    return {"detail": said, "counts": res}


STAGE_FNS = {"a": stage_a, "b": stage_b, "c": stage_c, "d": stage_d, "e": stage_e, "f": stage_f, "g": stage_g}


def run_stage(ctx, letter: str) -> dict:
    """One stage under its time limit: {status: ok | FAILED | skipped, detail, seconds, ...}."""
    t0 = time.monotonic()
    ctx.stage_deadline = t0 + ctx.scale.limits_s[letter]
    try:
        if ctx.deadline - t0 < 10:
            raise StageFailed(f"not started: the check's {ctx.scale.budget_s} s were spent")
        out = {"status": "ok", **STAGE_FNS[letter](ctx)}
    except Skipped as e:
        out = {"status": "skipped", "detail": str(e)}
    except StageFailed as e:
        out = {"status": "FAILED", "detail": str(e)}
    except Exception as e:  # a bug or a broken path in one stage must not hide the others
        ctx.log.write(traceback.format_exc())
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        out = {"status": "FAILED", "detail": f"{type(e).__name__}: {first}"}
    out["seconds"] = round(time.monotonic() - t0, 1)
    print(f"{letter} {STAGES[letter]}: {out['status']} in {out['seconds']:.0f} s ({out['detail']})", flush=True)
    return out


# ---------------------------------------------------------------- workers (each in a process of its own)

def worker_gloo_probe(device: str, out: Path) -> None:
    """Under torchrun, 2 ranks: a gloo group, and each collective of COLLECTIVES tried on tensors on the
    run's device (both ranks on cuda:0 on one GPU). Rank 0 writes {collective: ok | what failed}."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from dist_robust.models.sync_bn import all_reduce as bn_all_reduce
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()) \
        if device == "cuda" else torch.device("cpu")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    t = lambda v, n=4: torch.full((n,), float(v), device=dev)
    every, total = torch.stack([t(r) for r in range(world)]), float(sum(range(1, world + 1)))

    def in_place(op, x, *args, **kw):  # a collective that writes into x; x afterwards
        op(x, *args, **kw)
        return x

    def gathered(op, *args):
        bufs = [t(0) for _ in range(world)] if op is dist.all_gather or rank == 0 else None
        op(*((bufs, t(rank)) if op is dist.all_gather else (t(rank), bufs)), *args)
        return torch.stack(bufs) if bufs is not None else every

    def send_recv():
        if rank == 0:
            dist.send(t(7), dst=1)
            return t(7)
        return in_place(dist.recv, t(0), src=0)

    def bn_summed():  # the synchronised BN's all_reduce, forward and backward (the gradients summed too)
        x = t(rank + 1).requires_grad_(True)
        y = bn_all_reduce(x)
        y.backward(t(1))
        return y.detach() if torch.equal(x.grad.cpu(), t(world).cpu()) else t(-1)

    def objects():
        got = [None] * world
        dist.all_gather_object(got, {"rank": rank})
        return t(7) if got == [{"rank": r} for r in range(world)] else t(-1)

    probes = {  # name -> (the collective, on this rank; what it must give)
        "all_reduce": (lambda: in_place(dist.all_reduce, t(rank + 1)), t(total)),
        "functional_all_reduce": (bn_summed, t(total)),
        "broadcast": (lambda: in_place(dist.broadcast, t(rank + 5), src=0), t(5)),
        "all_gather": (lambda: gathered(dist.all_gather), every),
        "all_gather_into_tensor": (lambda: in_place(dist.all_gather_into_tensor, t(0, 4 * world), t(rank)),
                                   every.flatten()),
        "reduce_scatter_tensor": (lambda: in_place(dist.reduce_scatter_tensor, t(0), t(1, 4 * world)), t(world)),
        "reduce": (lambda: in_place(dist.reduce, t(rank + 1), dst=0) if rank == 0 else
                   (dist.reduce(t(rank + 1), dst=0), t(total))[1], t(total)),
        "gather": (lambda: gathered(dist.gather, 0), every),
        "scatter": (lambda: in_place(dist.scatter, t(-1), list(every) if rank == 0 else None, src=0), t(rank)),
        "all_to_all_single": (lambda: in_place(dist.all_to_all_single, t(0, world), t(rank, world)),
                              torch.arange(world, dtype=torch.float32, device=dev)),
        "send_recv": (send_recv, t(7)),
        "all_gather_object": (objects, t(7)),
        "barrier": (lambda: (dist.barrier(), t(0))[1], t(0)),
    }
    found = {}
    for name in COLLECTIVES:
        fn, expected = probes[name]
        try:
            got = fn()
            found[name] = "ok" if torch.equal(got.cpu(), expected.cpu()) else f"wrong values {got.cpu().tolist()}"
        except Exception as e:  # the collective is named with what refused it
            found[name] = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:160]
        if device == "cuda":
            torch.cuda.synchronize()
    answers = [None] * world
    dist.all_gather_object(answers, found)
    if rank == 0:  # a collective counts as carried only when every rank says so
        out.write_text(json.dumps({k: next((a[k] for a in answers if a[k] != "ok"), "ok") for k in COLLECTIVES}))
    dist.barrier()
    # no teardown: a rank of this probe was seen to abort while destroying the group after the point-to-point
    # and functional collectives ("terminate called without an active exception"), its answer written
    sys.stdout.flush()
    os._exit(0)


def nccl_ddp_check(backend: str = "cpu:gloo,cuda:nccl", device: str = "cuda") -> dict:
    """bf16 PGD-AT steps of cnn3 through DDP on a group of one rank made as a CUDA run makes it
    (cpu:gloo,cuda:nccl), against the same steps without DDP from the same weights: the same parameters
    (one rank: DDP's all_reduce averages one gradient); and the group sums a CPU and a device tensor.
    (gloo and the CPU: the same logic, for the plumbing run and the tests.)"""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dist_robust.config import load_config
    from dist_robust.methods import build_method
    from dist_robust.models import build_model
    from dist_robust.utils import autocast
    cfg = load_config(None, ["data.name=digits", "model.name=cnn3", "method.name=pgd_at", f"attack.eps={EPS}",
                             "attack.steps=2", "attack.precision=bf16"], training=False)
    method = build_method(cfg)
    store = dist.FileStore(tempfile.mktemp(prefix="gpu-check-store-"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1,
                            device_id=torch.device("cuda", 0) if "nccl" in backend else None)
    try:
        sums = []
        for dev in dict.fromkeys(["cpu", device]):
            x = torch.ones(3, device=dev)
            dist.all_reduce(x)
            sums.append(f"{dev} {'ok' if x.tolist() == [1.0] * 3 else x.tolist()}")
        x, y = torch.rand(64, 1, 8, 8, device=device), torch.randint(0, 10, (64,), device=device)
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
    finally:
        dist.destroy_process_group()
    return {"same": same, "detail": f"DDP on a {backend} group (world 1): bf16 PGD-AT loss {loss.item():.3f}, "
                                    f"DDP {'=' if same else '!='} plain; all_reduce {', '.join(sums)}; "
                                    f"{own_group_evaluation(backend.split(',')[-1].split(':')[-1], device)}"}


def own_group_evaluation(backend: str, device: str) -> str:
    """evaluate_model inside a caller's own group of this one backend (nccl-only on the GPU: the common
    user script), whose host-side counts dist.all_reduce_sum must carry on a device the group serves."""
    import torch
    import torch.distributed as dist

    from dist_robust import evaluate_model
    from dist_robust.models import build_model
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=torch.device("cuda", 0) if backend == "nccl" else None)
    try:
        torch.manual_seed(0)
        model = build_model("cnn3", 1, 10, [0.5], [0.25]).to(device)
        data = (torch.rand(48, 1, 8, 8), torch.randint(0, 10, (48,)))
        res = evaluate_model(model, dataset=data, attacks=["clean", "pgd-2"], eps=EPS, batch_size=16, device=device)
    finally:
        dist.destroy_process_group()
    return f"evaluate_model in an own {backend}-only group: n={res['n']}, world {res['world_size']}"


def pgd_step(model_name: str, precision: str, x, y):
    """One PGD step (random start, forward, input-gradient backward, projection) on the eval-mode model."""
    import torch

    from dist_robust.attacks import pgd
    from dist_robust.models import build_model
    torch.manual_seed(0)
    c = x.shape[1]
    model = build_model(model_name, c, 10, [0.5] * c, [0.25] * c).to(x.device).eval()

    def step():
        pgd(model, x, y, 8 / 255, 1, precision=precision, compile="off")
        if x.is_cuda:
            torch.cuda.synchronize()
    return step


def throughput(model_name: str, size: int, batch: int, repeats: int, device: str = "cuda", k: int = K) -> dict:
    """Clean train step, PGD step and PGD-k AT step, fp32 and bf16, timed interleaved; images/s, the PGD
    step against the clean step, and the AT step against the (2k+3)/3 bound."""
    import torch
    from precision import engine_step
    from timing import interleaved
    channels = 1 if model_name == "cnn3" else 3
    x = torch.rand(batch, channels, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    bound = (2 * k + 3) / 3
    out = {"image_size": size, "batch": batch, "k": k, "bound_clean_steps": round(bound, 3)}
    for precision in ("fp32", "bf16"):
        extra = [] if precision == "fp32" else ["train.precision=bf16", "attack.precision=bf16"]
        steps = {"clean": engine_step(model_name, "standard", extra, x, y, device=device),
                 "pgd": pgd_step(model_name, precision, x, y),
                 "at": engine_step(model_name, "pgd_at", [f"attack.steps={k}", *extra], x, y, device=device)}
        res = interleaved(steps, repeats)
        clean_s = res["clean"]["median_s"]
        out[precision] = {"clean_img_s": batch / clean_s, "pgd_img_s": batch / res["pgd"]["median_s"],
                          "at_img_s": batch / res["at"]["median_s"], "bound_img_s": batch / (bound * clean_s),
                          "pgd/clean": res["pgd"]["ratio"], "at/bound": res["at"]["ratio"] / bound,
                          "min": res["at"]["ratio_min"] / bound, "max": res["at"]["ratio_max"] / bound}
    return out


def worker_evaluate(device: str, out: Path, eval_device: str, checkpoint: str, splits: list,
                    limit: int | None = None) -> None:
    """Stage g: the exported model of ``checkpoint`` evaluated on ``eval_device`` by the exact evaluator, eager
    on both devices (evaluate_model's compile=auto would compile on CUDA only): clean and PGD-20 counts over
    the given splits of digits. Each point's random start is seeded and drawn on the CPU, so both devices
    start from the same points."""
    import torch

    from dist_robust.checkpoint import read_sidecar
    from dist_robust.data import load_dataset
    from dist_robust.engine.train import exported_model
    from dist_robust.evaluate import evaluate
    dev = torch.device(eval_device)
    cfg = read_sidecar(Path(checkpoint))["config"]
    model = exported_model(Path(checkpoint), dev)
    total = {"n": 0, "clean": 0, "pgd-20": 0, "device": eval_device}
    for split in splits:
        r = evaluate(model, load_dataset("digits", split), ["pgd-20"], cfg["attack"]["eps"], 500, dev, limit=limit,
                     attack_opts={"compile": "off", "precision": "fp32", "channels_last": False})
        total["n"] += r["n"]
        total["clean"] += r["clean"]["correct"]
        total["pgd-20"] += r["attacks"]["pgd-20"]["correct"]
    out.write_text(json.dumps(total))


def worker(kind: str, device: str, out: Path, args: dict) -> int:
    if kind == "gloo_probe":
        worker_gloo_probe(device, out)
    elif kind == "nccl_ddp":
        out.write_text(json.dumps(nccl_ddp_check(*(("cpu:gloo,cuda:nccl", "cuda") if device == "cuda"
                                                   else ("gloo", "cpu")))))
    elif kind == "throughput":
        out.write_text(json.dumps({m: throughput(m, size, batch, args["repeats"], device=device, k=args["k"])
                                   for m, (size, batch) in args["models"].items()}))
    elif kind == "evaluate":
        worker_evaluate(device, out, **args)
    else:
        raise SystemExit(f"gpu_check: unknown worker {kind!r}")
    return 0


# ---------------------------------------------------------------- report

def report(stages: dict, speed: dict, seconds: float, title: str) -> tuple[str, dict]:
    """The printed table and the JSON record of a check."""
    lines = [f"## {title}", "", "| stage | status | s | detail |", "|---|---|---|---|"]
    lines += [f"| {letter} {STAGES[letter]} | {s['status']} | {s['seconds']:.0f} | {s['detail'].replace('|', '/')} |"
              for letter, s in stages.items()]
    if speed:
        lines += ["", "| model | px | batch | precision | clean img/s | PGD step / clean step | PGD-k AT img/s "
                      "| bound img/s | AT / bound [min, max] |", "|---|---|---|---|---|---|---|---|---|"]
        for name, s in speed.items():
            for p in ("fp32", "bf16"):
                r = s[p]
                lines.append(f"| {name} | {s['image_size']} | {s['batch']} | {p} | {r['clean_img_s']:.0f} | "
                             f"{r['pgd/clean']:.2f} | {r['at_img_s']:.0f} | {r['bound_img_s']:.0f} | "
                             f"{r['at/bound']:.2f} [{r['min']:.2f}, {r['max']:.2f}] |")
        k = next(iter(speed.values()))["k"]
        lines.append(f"\n(k = {k}: the bound is (2k+3)/3 = {(2 * k + 3) / 3:.2f} clean steps per AT step, a PGD "
                     "step at 2/3 of a clean step)")
    record = {"stages": {f"{letter}_{STAGES[letter]}": s for letter, s in stages.items()}, "throughput": speed,
              "seconds": round(seconds, 1), "all_ok": all(s["status"] != "FAILED" for s in stages.values())}
    return "\n".join(lines), record


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def default_json(gpu: str, today: datetime.date | None = None) -> Path:
    return ROOT / "results" / "gpu" / f"{(today or datetime.date.today()).isoformat()}-{slug(gpu)}.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated stages, by letter or name (default: all)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the stages' plumbing at a tiny size on the CPU (no GPU result; writes no results/gpu)")
    ap.add_argument("--budget", type=int, default=None, help="seconds for all stages (default 420 on a GPU)")
    ap.add_argument("--json", default=None, help="the record (default on a GPU: results/gpu/DATE-GPU.json)")
    ap.add_argument("--log", default=None, help="every step's command and output (default: kept in the work folder "
                    "only while the check runs)")
    ap.add_argument("--copy-to", default=None, help="also copy the record there (the device tool's $OUT)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (runs, recipes) and say where")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.device, Path(args.worker_out), json.loads(args.worker_args))

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False): run it on a GPU machine",
              file=sys.stderr)
        return 1
    names = {**STAGES, **{v: k for k, v in STAGES.items()}}
    wanted = [s.strip() for s in args.only.split(",")] if args.only else list(STAGES)
    unknown = [s for s in wanted if s not in names]
    if unknown:
        print(f"gpu-check: --only: unknown stage {', '.join(unknown)} (a-g or {', '.join(STAGES.values())})",
              file=sys.stderr)
        return 2
    letters = [k for k in STAGES if k in {s if s in STAGES else names[s] for s in wanted}]
    scale = GPU if args.device == "cuda" else CPU
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none"
    out_json = Path(args.json) if args.json else (default_json(gpu) if args.device == "cuda" else None)
    if args.device == "cpu" and out_json is not None and (ROOT / "results" / "gpu") in out_json.resolve().parents:
        print("gpu-check: --device cpu writes no record under results/gpu/ (it is no GPU result)", file=sys.stderr)
        return 2
    title = (f"gpu-check on {gpu} (torch {torch.__version__}, CUDA {torch.version.cuda})" if args.device == "cuda"
             else f"gpu-check --device cpu: the stages' plumbing on the CPU at a tiny size, NOT a GPU result "
                  f"(torch {torch.__version__})")
    print(title, flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    log_path = Path(args.log) if args.log else work / "gpu-check.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0, stages = time.monotonic(), {}
    try:
        with open(log_path, "w") as log:
            ctx = Context(args.device, scale, work, log, args.budget or scale.budget_s)
            for letter in sorted(letters, key=RUN_ORDER.index):
                stages[letter] = run_stage(ctx, letter)
    finally:
        if args.keep:
            print(f"gpu-check: work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    stages = {k: stages[k] for k in letters}  # the table in the stages' order
    speed = stages.get("f", {}).pop("throughput", {})
    table, record = report(stages, speed, time.monotonic() - t0, title)
    record.update(command=" ".join([Path(sys.executable).name, *sys.argv]), device=args.device,
                  gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0],
                  date=datetime.date.today().isoformat(), plumbing_only=args.device == "cpu")
    print(table)
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(record, indent=1) + "\n")
        if args.copy_to:
            Path(args.copy_to).mkdir(parents=True, exist_ok=True)
            shutil.copy(out_json, Path(args.copy_to) / out_json.name)
        print(f"-> {out_json}")
    failed = [f"{k} {STAGES[k]}" for k, s in stages.items() if s["status"] == "FAILED"]
    print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all stages passed'} ({record['seconds']:.0f} s)",
          flush=True)
    return 0 if record["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
