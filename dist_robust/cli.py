"""dist-robust: train | eval | report.

Single process:   dist-robust train configs/quickstart.yaml optim.lr=0.05
One node, N ranks: torchrun --nproc_per_node=N -m dist_robust train configs/quickstart.yaml
Several nodes:    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 \\
                      -m dist_robust train CONFIG
The config is validated in every process before the process group exists, so a mistake exits with
status 2 and one line on stderr before any rank starts training.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from pathlib import Path

from . import (
    dist,
    lock,
    orphan,  # first of the project: it records the launcher's pid before torch's import
)
from .attacks.registry import known as known_attacks
from .config import ConfigError, from_dict, load_stages, parse_fraction, validate
from .preflight import check_run, check_same_view, preflight, run_folder_view
from .utils import unwritable

USAGE_ERROR, RUN_ERROR = 2, 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-robust", description="Distributed adversarially robust fine-tuning.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train or fine-tune with a recipe, then evaluate")
    t.add_argument("config", help="YAML recipe (see configs/)")
    t.add_argument("overrides", nargs="*", metavar="section.key=value")
    e = sub.add_parser("eval", help="evaluate a checkpoint or any timm/torchvision model: clean and robust "
                       "accuracy, exact over ranks")
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="model .safetensors, its .json sidecar, or a run folder")
    what.add_argument("--model", help="timm:ARCH or torchvision:ARCH, with --weights (and --normalize)")
    e.add_argument("--weights", help="--model's weights: .safetensors, or .pth/.pt (read with weights_only)")
    e.add_argument("--normalize", default=None, help="--model's input normalisation: imagenet, cifar10, "
                   "dataset (the dataset's own statistics) or MEAN,MEAN,MEAN/STD,STD,STD (default: imagenet)")
    e.add_argument("--dataset", required=True)
    e.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="val: the training images the run held out (data.holdout)")
    e.add_argument("--limit", "--n-ex", type=int, default=None, help="evaluate the first N points")
    e.add_argument("--attacks", default="clean,pgd-20", help=f"comma-separated: {known_attacks()}")
    e.add_argument("--eps", default=None, help="radius, 8/255 or 0.0314; a list (0.05,0.1,0.2) evaluates each, "
                   "into one results file (default: the checkpoint's attack.eps; required with --model)")
    e.add_argument("--norm", default=None, choices=["Linf", "L2"], help="default: the checkpoint's attack.norm")
    e.add_argument("--restarts", type=int, default=1, help="pgd-K / cw-K: worst case over this many starts")
    e.add_argument("--compile", default=None, choices=["on", "off", "auto"], help="fused PGD step")
    e.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="PGD / CW precision (default: the checkpoint's eval.precision; never its attack.precision)")
    e.add_argument("--batch-size", type=int, default=None, help="per-rank evaluation batch")
    e.add_argument("--aa-block-size", type=int, default=None,
                   help="AutoAttack points per block (sharding and seeding unit; default: points / 8, at most 500)")
    e.add_argument("--root", default=None, help="data folder for user-provided datasets")
    e.add_argument("--seed", type=int, default=0, help="seed of the per-point random starts")
    e.add_argument("--out", default=None, help="results file (default: eval-DATASET-SPLIT.json by the checkpoint)")
    pr = sub.add_parser("prepare", help="write FFCV .beton files of a dataset (data.loader=ffcv reads them)")
    pr.add_argument("dataset", help="a registered dataset (mnist, cifar10, imagefolder, ...)")
    pr.add_argument("--split", default="train,test", help="comma-separated: train, test (default both)")
    pr.add_argument("--format", default="raw", choices=["raw", "jpeg"], help="raw: exact uint8; jpeg: smaller")
    pr.add_argument("--quality", type=int, default=90, help="JPEG quality, 1-100")
    pr.add_argument("--out", default="data/ffcv", help="folder of the .beton files (data.ffcv_dir)")
    pr.add_argument("--root", default=None, help="data folder for user-provided datasets")
    pr.add_argument("--image-size", type=int, default=None, help="imagefolder: side of the square images")
    pr.add_argument("--workers", type=int, default=0, help="writer processes (default: the CPUs)")
    pr.add_argument("--verify", action="store_true", help="check the prepared files in full against their "
                    "manifests (sha256) and record their stamp, instead of writing them")
    r = sub.add_parser("report", help="print a table of results; --plot DIR draws them",
                       description="A Markdown table of results: one row per results file and attack radius.")
    r.add_argument("runs", nargs="+", metavar="PATH",
                   help="a run folder, a folder of runs (searched for results.json and eval-*.json), a results "
                        "file (results.json, or one written by dist-robust eval), or a comparison of methods "
                        "(results/finetune.json, drawn by --plot); unreadable paths and unfinished runs are "
                        "skipped with a warning each")
    r.add_argument("--plot", metavar="DIR", default=None,
                   help="also write PNGs into DIR: curves.png (loss, training accuracy, lr and validation "
                        "accuracy of the runs with a log.jsonl), eps.png (accuracy against eps of the "
                        "multi-radius eval files), scatter.png (clean against PGD-20 accuracy of a "
                        "results/finetune.json), clean_vs_robust.png (clean against robust accuracy, one point "
                        "per results file)")
    return p


# The eval command's flags and the config keys they set: a mistake is reported under the flag the user typed.
EVAL_FLAGS = {"data.name": "--dataset", "data.root": "--root", "data.eval_batch_size": "--batch-size",
              "eval.split": "--split", "eval.limit": "--limit", "eval.attacks": "--attacks", "eval.eps": "--eps",
              "eval.norm": "--norm", "eval.restarts": "--restarts", "eval.precision": "--precision",
              "eval.aa_block_size": "--aa-block-size", "eval.seed": "--seed", "attack.compile": "--compile",
              "model.name": "--model", "model.weights": "--weights", "model.normalize": "--normalize"}


def _flag_names(message: str) -> str:
    for key, flag in EVAL_FLAGS.items():
        message = re.sub(rf"(?<![\w.]){re.escape(key)}\b", flag, message)
    return message


def _radii(text: str | None) -> list[float] | None:
    """--eps: one radius or a comma-separated list, each a number or a fraction such as 8/255."""
    if text is None:
        return None
    try:
        radii = [float(parse_fraction(t.strip())) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--eps={text}: each radius must be a number or a fraction such as 8/255") from None
    if not radii or len(set(radii)) != len(radii):
        raise ConfigError(f"--eps={text}: one radius, or a list of different radii")
    return radii


def _eval_config(args):
    """The run config of an evaluation, with the command line's settings; config mistakes name the flag."""
    try:
        return _eval_settings(args)
    except ConfigError as e:
        raise ConfigError(_flag_names(str(e))) from None


def _writable(out: Path, args) -> Path:
    """The results file's place, checked before any model is loaded or point attacked."""
    why = f"{out} is a folder" if out.is_dir() else unwritable(out.parent)
    if why:
        flag = f"--out={args.out}" if args.out else f"the results file beside the model ({out}; choose --out)"
        raise ConfigError(f"{flag}: {why}")
    return out


def _model_config(args):
    """``--model``: a default config around an external model and its weights file."""
    from .config import Config
    if not args.weights:
        raise ConfigError(f"--model={args.model}: give its weights with --weights (nothing is downloaded)")
    if _ours(args.weights):  # else it loads with missing keys (exit 1), the sidecar's model unused
        raise ConfigError(f"--weights={args.weights}: a dist_robust checkpoint (its sidecar names its model and "
                          f"normalisation): evaluate it with --checkpoint {args.weights}, without --model")
    if args.eps is None:
        raise ConfigError(f"--model={args.model}: give the radius with --eps (e.g. --eps 8/255)")
    cfg = Config()
    cfg.model.name, cfg.model.weights = args.model, args.weights
    cfg.model.normalize = "imagenet" if args.normalize is None else args.normalize
    return cfg


def _ours(path: str) -> bool:
    """Whether ``path`` is one of this project's checkpoints: a model file with its sidecar, a sidecar,
    or a run folder (what --checkpoint reads)."""
    from .checkpoint import CheckpointError, read_sidecar, resolve
    try:
        return bool(read_sidecar(resolve(path)))
    except CheckpointError:
        return False


def _eval_settings(args):
    from .checkpoint import read_sidecar, resolve
    from .methods import METHODS
    if args.model is None and (args.weights or args.normalize):
        raise ConfigError("--weights and --normalize go with --model (a checkpoint carries its own)")
    sidecar = resolve(args.checkpoint) if args.checkpoint else None
    cfg = from_dict(read_sidecar(sidecar)["config"]) if sidecar else _model_config(args)
    if sidecar and METHODS[cfg.method.name].pretext:
        run = sidecar.parent.parent if sidecar.parent.name == "checkpoints" else sidecar.parent
        raise ConfigError(f"{sidecar} is a pretext model ({cfg.method.name}): its head predicts the pretext task, "
                          f"not classes; fine-tune it (model.init_from={run / 'model.json'}) and evaluate that run")
    cfg.data.name, cfg.data.root = args.dataset, args.root if args.root is not None else cfg.data.root
    cfg.model.init_from = None
    cfg.eval.split, cfg.eval.limit, cfg.eval.seed = args.split, args.limit, args.seed
    cfg.eval.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    radii = _radii(args.eps)
    cfg.eval.eps, cfg.eval.norm, cfg.eval.restarts = radii[0] if radii else None, args.norm, args.restarts
    if args.compile is not None:
        cfg.attack.compile = args.compile
    if args.precision is not None:
        cfg.eval.precision = args.precision
    if args.batch_size is not None:
        cfg.data.eval_batch_size = args.batch_size
    if args.aa_block_size is not None:
        cfg.eval.aa_block_size = args.aa_block_size
    validate(cfg, training=False)
    for r in radii or ():  # each radius checked; the config records the first
        cfg.eval.eps = r
        validate(cfg, training=False)
    cfg.eval.eps = radii[0] if radii else None
    check_run(cfg, training=False)
    if sidecar is None:  # an external model: its weights name the results file
        weights = Path(args.weights)
        out = Path(args.out) if args.out else weights.with_name(f"eval-{weights.stem}-{args.dataset}-{args.split}.json")
        return cfg, None, _writable(out, args), radii
    from .checkpoint import model_header
    from .data import dataset_info
    from .models import head_classes
    info = dataset_info(cfg.data.name, cfg.data.root, cfg.data.image_size, cfg.data.channels)
    shapes = model_header(sidecar)
    classes = head_classes(shapes) or info.num_classes
    channels = shapes.get("normalize.mean", [1, info.channels])[1]
    if (classes, channels) != (info.num_classes, info.channels):
        raise ConfigError(f"--dataset={cfg.data.name}: {info.num_classes} classes of {info.channels}-channel images; "
                          f"the checkpoint's model expects {classes} and {channels}")
    # Epoch and step checkpoints share a folder: each gets its own results (and AutoAttack state).
    suffix = "" if sidecar.stem == "model" else f"-{sidecar.stem}"
    out = Path(args.out) if args.out else sidecar.parent / f"eval-{args.dataset}-{args.split}{suffix}.json"
    return cfg, sidecar, _writable(out, args), radii


def _run_eval(cfg, sidecar, out, radii, device):
    from .evaluate import evaluate_run
    if sidecar is None:
        from .data import data_info, data_stats
        from .models.external import load_external
        info = data_info(cfg.data)
        stats = data_stats(cfg.data) if cfg.model.normalize == "dataset" else (None, None)  # else not needed
        model = load_external(cfg.model.name, cfg.model.weights, cfg.model.normalize, info.channels,
                              *stats).to(device)
        return evaluate_run(cfg, model, device, checkpoint=cfg.model.weights, out=out, radii=radii)
    from .engine.train import exported_model
    return evaluate_run(cfg, exported_model(sidecar, device), device, checkpoint=str(sidecar), out=out, radii=radii)


def _prepare(args) -> int:
    """``dist-robust prepare``: one process, no process group."""
    try:
        from .data.ffcv import FFCVDataError, beton_path, prepare, verify
    except ImportError as e:
        print(f"dist-robust: error: FFCV is not installed ({e}): run make install", file=sys.stderr)
        return RUN_ERROR
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    try:
        bad = [s for s in splits if s not in ("train", "test")]
        if bad or not splits:
            raise FFCVDataError(f"--split={args.split}: each split must be train or test")
        why = unwritable(Path(args.out))
        if why:
            raise FFCVDataError(f"--out={args.out}: {why}")
        for split in splits:
            if args.verify:
                verify(beton_path(args.out, args.dataset, split, args.format))
                print(f"{beton_path(args.out, args.dataset, split, args.format)}: verified")
                continue
            path, written = prepare(args.dataset, split, args.out, args.format, args.quality, root=args.root,
                                    image_size=args.image_size, workers=args.workers or len(os.sched_getaffinity(0)))
            print(f"{path}: {'written' if written else 'up to date'}")
    except (FFCVDataError, ValueError, FileNotFoundError) as e:
        print(f"dist-robust: error: {e}", file=sys.stderr)
        return RUN_ERROR if getattr(e, "kind", None) == "corrupt" else USAGE_ERROR  # a damaged file: not a usage error
    return 0


def _report(paths: list[str], plot_dir: str | None = None) -> int:
    """Print the table of every readable results file (a warning on stderr for each path skipped) and,
    with ``plot_dir``, write the plots there. Exit status 1 only when nothing at all could be used."""
    if plot_dir is not None and Path(plot_dir).exists() and not Path(plot_dir).is_dir():
        print(f"dist-robust: error: --plot={plot_dir}: not a folder", file=sys.stderr)
        return USAGE_ERROR
    why = unwritable(Path(plot_dir)) if plot_dir is not None else None
    if why:  # found now, not after every results file is read
        print(f"dist-robust: error: --plot={plot_dir}: {why}", file=sys.stderr)
        return USAGE_ERROR
    from .report import collect, results_table
    found = collect(paths)
    if plot_dir is None:
        found.skipped += [f"{p}: a comparison of methods: only --plot DIR draws it (scatter.png)"
                          for p, _ in found.comparisons]
    for line in found.skipped:
        print(f"dist-robust: warning: skipped {line}", file=sys.stderr)
    usable = found.results or (plot_dir is not None and (found.comparisons or found.run_dirs))
    if not usable:
        print("dist-robust: error: nothing to report: no readable results.json or eval-*.json"
              + (", log.jsonl or comparison file" if plot_dir is not None else "") + " among the paths",
              file=sys.stderr)
        return RUN_ERROR
    if found.results:
        print(results_table(found.results))
    if plot_dir is None:
        return 0
    try:
        from .plots import write_plots
        written = write_plots(found, Path(plot_dir))
    except ImportError as e:
        print(f"dist-robust: error: --plot needs matplotlib (pip install matplotlib): {e}", file=sys.stderr)
        return RUN_ERROR
    except OSError as e:
        print(f"dist-robust: error: --plot={plot_dir}: {e}", file=sys.stderr)
        return RUN_ERROR
    if not written:
        print("dist-robust: warning: --plot: nothing to plot (no run with a log.jsonl, multi-radius eval or "
              "comparison file among the paths)", file=sys.stderr)
    for p in written:
        print(p)
    return 0


def _set_threads(requested, env) -> None:
    """train.threads, else the CPUs this process may run on (a slurm allocation or a cpuset, not the whole
    node) shared out over the node's ranks. OMP_NUM_THREADS is not read: torchrun sets it to 1 itself."""
    import torch
    threads = requested or max(1, len(os.sched_getaffinity(0)) // env.local_world_size)
    torch.set_num_threads(threads)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the `deepspeed` launcher adds --local_rank=N unless told --no_local_rank; ranks come from the environment
    args = _parser().parse_args([a for a in argv if not a.startswith("--local_rank")])
    if args.command == "report":
        return _report(args.runs, args.plot)
    orphan.watch()  # a rank stops (SIGTERM) when its launcher dies: torchrun's ranks have sessions of their own
    if args.command == "prepare":
        return _prepare(args)

    env = dist.read_env()
    say = lambda msg: print(f"dist-robust: error: {msg}" if env.rank == 0 else
                            f"dist-robust [rank {env.rank}]: error: {msg}", file=sys.stderr)
    from .checkpoint import CheckpointError
    held = None  # the run folder's lock (lock.py): rank 0 holds it while training
    try:  # every user mistake is caught here, before the process group exists
        try:
            dist.rendezvous_env(env)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if args.command == "train":
            stages = load_stages(args.config, args.overrides)
            preflight(stages, env.world_size)
            cfg = stages[0]
            folder = Path(os.path.commonpath([Path(s.run.out_dir) / s.run.name for s in stages]))  # a pipeline's
            held = lock.acquire(folder) if env.rank == 0 else lock.check(folder)
        else:
            if args.limit is not None and args.limit <= 0:
                raise ConfigError(f"--limit={args.limit}: must be > 0")
            cfg, sidecar, out, radii = _eval_config(args)
    except (ConfigError, CheckpointError) as e:
        if env.rank == 0:
            say(e)
        return USAGE_ERROR

    try:
        return _run(args, env, cfg, stages if args.command == "train" else None,
                    None if args.command == "train" else (sidecar, out, radii), say)
    finally:
        if held is not None:
            lock.release(held)


def _run(args, env, cfg, stages, evaluation, say) -> int:
    """Join the process group and train or evaluate; the exit status."""
    from .checkpoint import CheckpointError
    from .engine.preempt import Stopped
    _set_threads(cfg.train.threads, env)
    try:  # run.device=cuda without a GPU, dist.backend=nccl on a CPU
        device = dist.pick_device(cfg.run.device, env.local_rank)
        dist.backend_for(device, cfg.dist.backend)
    except (RuntimeError, ValueError) as e:
        say(e)
        return USAGE_ERROR
    dist.init(env, device, cfg.dist.backend, cfg.dist.timeout_s)
    dist.setup_logging(env.rank == 0)
    if args.command == "train" and env.world_size > 1:
        try:  # every rank finds it: a run folder the nodes do not share (they would hang at a collective)
            check_same_view(stages, dist.all_gather_objects(run_folder_view(stages)),
                            dist.all_gather_objects(socket.gethostname()))
        except ConfigError as e:
            if env.rank == 0:
                say(e)
            dist.cleanup()
            return USAGE_ERROR
    try:
        if args.command == "train":
            from .engine.stages import run_stages
            from .engine.train import train
            if len(stages) == 1 and stages[0].stage.kind == "train":
                train(cfg, device)  # a plain recipe: its run folder, no stage marker
            else:
                run_stages(stages, device)
        else:
            _run_eval(cfg, *evaluation, device)
    except Stopped as e:  # a stop signal, honoured by every rank at one step: its checkpoint is written
        if env.rank == 0:
            print(f"dist-robust: {e}", file=sys.stderr)
        dist.cleanup(finished=True)
        return e.status
    except (CheckpointError, OSError, ValueError, FloatingPointError) as e:  # OSError: a full disk, say
        say(e)
        dist.cleanup()
        return RUN_ERROR
    except BaseException:
        dist.cleanup()
        raise
    dist.cleanup(finished=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
