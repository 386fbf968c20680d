"""Training-loader throughput: images per second of one epoch of augmented batches, per loader.

    .venv/bin/python bench/loaders.py [--scales 1,4,16] [--repeats 3] [--batch 256] [--threads N]

Loaders (all with the same order and the same random crop (padding 4) + flip, as a training run has
them, ending in float batches on the CPU): memory (data/memory.py), FFCV raw and FFCV JPEG (quality
90) (data/ffcv.py, `threads` decoding threads), and a torch DataLoader with 0 and 2 worker processes
(data/torch_loader.py). Data, each at 1x, 4x and 16x its base size:
  mnist28    MNIST train images (28x28x1); 1x = 10,000
  cifar32    the 40 real CIFAR-10/100 test images that ship in PyPI foolbox (32x32x3), repeated; 1x = 10,000
  imagenet224 the 20 real ImageNet images of foolbox, resized to 224x224x3, repeated; 1x = 256
Median over repeats of an epoch after one warm-up epoch (which includes FFCV's compilation), with min
and max. Writes bench/results/loaders.json with the command, the machine, threads and versions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_robust.data import TrainLoader, load_dataset  # noqa: E402
from dist_robust.data.ffcv import FFCVTrainLoader, write_beton  # noqa: E402
from dist_robust.data.sources import Dataset, DatasetInfo  # noqa: E402
from dist_robust.data.torch_loader import TorchTrainLoader  # noqa: E402

BASE = {"mnist28": 10_000, "cifar32": 10_000, "imagenet224": 256}


def foolbox_images(prefixes: tuple[str, ...], side: int) -> np.ndarray:
    """The real test images that ship in foolbox (requirements-nodeps.txt), resized to side x side, as
    uint8 [N, 3, side, side]."""
    import importlib.util

    from PIL import Image
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        raise SystemExit("bench/loaders.py needs foolbox's images: pip install --no-deps foolbox==3.3.4")
    folder = Path(spec.origin).parent / "data"
    files = sorted(f for f in folder.iterdir() if f.name.startswith(prefixes))
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((side, side), Image.BILINEAR)).transpose(2, 0, 1)
                     for f in files])


def dataset(kind: str, scale: int) -> Dataset:
    n = BASE[kind] * scale
    if kind == "mnist28":
        src = load_dataset("mnist", "train")
        reps = -(-n // len(src))
        images, labels = src.images.repeat(reps, 1, 1, 1)[:n], src.labels.repeat(reps)[:n]
        info = src.info
    else:
        real = (foolbox_images(("cifar10_", "cifar100_"), 32) if kind == "cifar32" else
                foolbox_images(("imagenet_",), 224))
        idx = np.arange(n) % len(real)
        images, labels = torch.from_numpy(real[idx]), torch.from_numpy(idx % 10).long()
        side = real.shape[-1]
        info = DatasetInfo(kind, 3, side, 10, (0.5,) * 3, (0.25,) * 3, False)
    return Dataset(images.contiguous(), labels, info)


def epoch_seconds(loader, repeats: int) -> dict:
    times = []
    for epoch in range(repeats + 1):  # the first epoch is the warm-up
        t0 = time.perf_counter()
        for _batch in loader.iter_from(epoch):
            pass
        times.append(time.perf_counter() - t0)
    times = times[1:]
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", default="1,4,16")
    ap.add_argument("--kinds", default="mnist28,cifar32,imagenet224")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    aug = dict(crop_padding=4, flip=True)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            for scale in map(int, args.scales.split(",")):
                ds = dataset(kind, scale)
                n = len(ds)
                loaders = {"memory": lambda ds=ds: TrainLoader(ds, args.batch, **aug),
                           "torch w0": lambda ds=ds: TorchTrainLoader(ds, args.batch, workers=0, **aug),
                           "torch w2": lambda ds=ds: TorchTrainLoader(ds, args.batch, workers=2, **aug)}
                sizes = {}
                for fmt in ("raw", "jpeg"):
                    beton = Path(tmp) / f"{kind}-x{scale}-{fmt}.beton"
                    t0 = time.perf_counter()
                    write_beton(ds, beton, fmt, 90, {"bench": kind}, workers=args.threads)
                    sizes[fmt] = (beton.stat().st_size, time.perf_counter() - t0)
                    data = argparse.Namespace(name=kind, root=None, image_size=None, holdout=0, subset=None,
                                              ffcv_dir=tmp, ffcv_format=fmt, **aug)
                    loaders[f"ffcv {fmt}"] = (lambda b=beton, d=data, info=ds.info: FFCVTrainLoader(
                        d, args.batch, workers=args.threads, beton=b, info=info))
                for name, make in loaders.items():
                    t = epoch_seconds(make(), args.repeats)
                    steps = n // args.batch
                    row = {"data": kind, "scale": scale, "images": n, "loader": name,
                           "images_per_s": steps * args.batch / t["median_s"], **t}
                    if name.startswith("ffcv"):
                        fmt = name.split()[1]
                        row.update(file_mb=sizes[fmt][0] / 2**20, write_s=sizes[fmt][1])
                    rows.append(row)
                    print(f"{kind:12s} x{scale:<3d} {n:7d}  {name:10s} {row['images_per_s']:10.0f} img/s "
                          f"(median {t['median_s']:.3f}s, min {t['min_s']:.3f}, max {t['max_s']:.3f})"
                          + (f"  file {row['file_mb']:.0f} MB, written in {row['write_s']:.1f}s" if "file_mb" in row else ""),
                          flush=True)
    table = ["| data | scale | images | " + " | ".join(sorted({r['loader'] for r in rows})) + " |"]
    names = sorted({r["loader"] for r in rows})
    table.append("|" + "---|" * (3 + len(names)))
    for key in dict.fromkeys((r["data"], r["scale"], r["images"]) for r in rows):
        cells = {r["loader"]: r["images_per_s"] for r in rows if (r["data"], r["scale"], r["images"]) == key}
        table.append(f"| {key[0]} | {key[1]}x | {key[2]} | " + " | ".join(f"{cells[n]:.0f}" for n in names) + " |")
    print("\nimages/s (median epoch)\n" + "\n".join(table))
    import ffcv
    out = Path(__file__).parent / "results" / "loaders.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]), "machine": platform.platform(),
                               "cpus": len(os.sched_getaffinity(0)), "threads": args.threads,
                               "torch": torch.__version__, "ffcv": getattr(ffcv, "__version__", "1.0.2"),
                               "batch": args.batch, "rows": rows, "table": table}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
