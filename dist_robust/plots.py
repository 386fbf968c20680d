"""``dist-robust report --plot DIR``: PNGs of training curves, accuracy against eps, and clean vs robust.

matplotlib is imported here only, and report.py imports this module only when --plot is given, so a
plain table stays fast. The Agg backend renders to files: no display is needed (clusters, CI).
"""
from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: it picks its backend on import
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .report import Found, format_eps, model_name, radii, read_log, run_label

PERCENT = FuncFormatter(lambda v, _: f"{v:g}%")


def write_plots(found: Found, out: Path) -> list[Path]:
    """Every plot the paths allow, written into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    plt.rcParams.update({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3, "savefig.dpi": 120})
    written = [curves(found.run_dirs, out / "curves.png"),
               eps_curves([(p, r) for p, r in found.results if isinstance(r.get("radii"), list)], out / "eps.png"),
               scatter(found.comparisons, out / "scatter.png"),
               clean_robust(found.results, out / "clean_vs_robust.png")]
    return [p for p in written if p is not None]


def _save(fig, path: Path) -> Path | None:
    if fig is None:
        return None
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------- training curves

def _labels(run_dirs: list[Path]) -> list[str]:
    """Run folder names; the parent too where two runs share a name (stages of two pipelines)."""
    names = [d.name for d in run_dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in run_dirs]


def _series(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """A run's log as (epoch, value) series. Steps are placed at fractional epochs (step / steps per
    epoch) so runs with different batch sizes line up. A resumed run logs some steps twice: the last
    record of a step wins."""
    steps = {r["step"]: r for r in records if r.get("kind") == "step" and "step" in r}
    epochs = {r["epoch"]: r for r in records if r.get("kind") == "epoch" and "epoch" in r}
    vals = {r["epoch"]: r for r in records if r.get("kind") == "val" and "epoch" in r}
    ref = next((e for e in epochs.values() if e.get("step") and e["epoch"]), None)
    if ref is not None:
        per_epoch = ref["step"] / ref["epoch"]
    else:  # epoch 1 unfinished: its last logged step is the best estimate
        per_epoch = max([s for s, r in steps.items() if r.get("epoch") == 1] or [1])
    at = lambda r: r["step"] / per_epoch if "step" in r else float(r["epoch"])
    fine = sorted(steps.values(), key=at) or sorted(epochs.values(), key=at)  # step lines, else epoch lines
    out = {"loss": [(at(r), r["loss"]) for r in fine if "loss" in r],
           "lr": [(at(r), r["lr"]) for r in fine if "lr" in r],
           "train_acc": [(e, 100 * r["train_acc"]) for e, r in sorted(epochs.items()) if "train_acc" in r],
           "val_clean": [(e, 100 * r["clean"]["acc"]) for e, r in sorted(vals.items())
                         if isinstance(r.get("clean"), dict) and "acc" in r["clean"]]}
    for e, r in sorted(vals.items()):
        for name, a in (r.get("attacks") or {}).items():
            if isinstance(a, dict) and "acc" in a:
                out.setdefault(f"val:{name}", []).append((e, 100 * a["acc"]))
    return out


def _line(ax, points, **kw):
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, **kw)


def curves(run_dirs: list[Path], path: Path) -> Path | None:
    return _save(curves_figure(run_dirs), path)


def curves_figure(run_dirs: list[Path]):
    """Loss, training accuracy, learning rate and (when logged) validation accuracy against epochs,
    the runs overlaid in one colour each."""
    runs = [(label, _series(read_log(d))) for label, d in zip(_labels(run_dirs), run_dirs)]
    runs = [(label, s) for label, s in runs if s["loss"] or s["train_acc"]]
    if not runs:
        return None
    has_val = any(k.startswith("val") and v for _, s in runs for k, v in s.items())
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5)) if has_val else plt.subplots(1, 3, figsize=(15, 4.2))
    axes = list(axes.flat)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    val_styles = ["-", "--", "-.", (0, (5, 1))]
    for i, (label, s) in enumerate(runs):
        c = colours[i % len(colours)]
        _line(axes[0], s["loss"], color=c, label=label)
        _line(axes[1], s["train_acc"], color=c, marker="o", markersize=4, label=label)
        # runs often share a schedule: earlier runs drawn thicker, so an identical later one leaves them visible
        _line(axes[2], s["lr"], color=c, label=label, linewidth=1.5 + 1.5 * (len(runs) - 1 - i))
        if has_val:
            _line(axes[3], s["val_clean"], color=c, linestyle=":", marker="o", markersize=3)
            attacks = sorted(k for k in s if k.startswith("val:"))
            for j, k in enumerate(attacks):
                _line(axes[3], s[k], color=c, linestyle=val_styles[j % len(val_styles)], marker="o", markersize=4)
    titles = ["training loss", "training accuracy (on the batches trained on:\nadversarial ones for AT methods)",
              "learning rate", "validation accuracy (held-out split)"]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].yaxis.set_major_formatter(PERCENT)
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("accuracy")
    axes[2].set_ylabel("learning rate")
    if has_val:
        axes[3].yaxis.set_major_formatter(PERCENT)
        axes[3].set_ylabel("accuracy")
        kinds = sorted({k[4:] for _, s in runs for k in s if k.startswith("val:")})
        key = [plt.Line2D([], [], color="grey", linestyle=":", marker="o", markersize=3, label="clean")]
        key += [plt.Line2D([], [], color="grey", linestyle=val_styles[j % len(val_styles)], label=name)
                for j, name in enumerate(kinds)]
        axes[3].legend(handles=key, fontsize=9, loc="best")
    # One legend of the runs for the whole figure, hung below the figure's bottom edge: inside it, a
    # legend of many runs (with its title) grew up over the lower panels' "epoch" labels. The saved
    # PNG's tight bounding box takes it in.
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(runs), 4), bbox_to_anchor=(0.5, 0),
               frameon=False, title="run")
    return fig


# ---------------------------------------------------------------- accuracy against eps

def eps_curves(results: list[tuple[Path, dict]], path: Path) -> Path | None:
    """One line per multi-radius eval file and attack: clean accuracy at eps 0, then each radius."""
    if not results:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    radii_seen, norms = set(), set()
    for p, r in results:
        name = model_name(r["checkpoint"]) if r.get("checkpoint") else p.stem
        clean = (r.get("clean") or {}).get("acc")
        attacks = sorted({a for x in r["radii"] for a in (x.get("attacks") or {})}, key=lambda a: (len(a), a))
        for a in attacks:
            points = [(0.0, 100 * clean)] if isinstance(clean, (int, float)) else []
            for x in r["radii"]:
                acc = ((x.get("attacks") or {}).get(a) or {}).get("acc")
                if isinstance(x.get("eps"), (int, float)) and isinstance(acc, (int, float)):
                    points.append((x["eps"], 100 * acc))
                    radii_seen.add(x["eps"])
            _line(ax, sorted(points), marker="o", label=f"{name}: {a}")
        norms.add(r.get("norm") or "?")
    ax.set_xticks(sorted(radii_seen | {0.0}))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_eps(v) if v else "0\n(clean)"))
    ax.yaxis.set_major_formatter(PERCENT)
    ax.set_ylim(0, 100)
    ax.set_xlabel(f"eps ({', '.join(sorted(norms))})")
    ax.set_ylabel("accuracy")
    ax.set_title("robust accuracy against the attack radius")
    ax.legend(fontsize=9, loc="best")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- clean vs robust (method comparison)

def _mean_std(values: list[float]) -> tuple[float, float]:
    return 100 * statistics.mean(values), 100 * statistics.stdev(values) if len(values) > 1 else 0.0


def scatter(comparisons: list[tuple[Path, dict]], path: Path) -> Path | None:
    """Clean against PGD-20 accuracy of each method of a results/finetune.json (runs -> pair -> method
    -> seed -> {clean, pgd20}), mean and std over seeds, one panel per transfer pair."""
    pairs = [(pair, methods) for _, c in comparisons for pair, methods in c["runs"].items()
             if isinstance(methods, dict) and methods]
    if not pairs:
        return None
    method_names = list(dict.fromkeys(m for _, methods in pairs for m in methods))
    colours = plt.get_cmap("tab10").colors
    markers = "osD^vP*Xh<>"
    style = {m: (colours[i % len(colours)], markers[i % len(markers)]) for i, m in enumerate(method_names)}
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs) + 2.2, 4.8), squeeze=False)
    for ax, (pair, methods) in zip(axes[0], pairs):
        for m, seeds in methods.items():
            rows = [r for r in seeds.values() if isinstance(r, dict) and "clean" in r and "pgd20" in r]
            if not rows:
                continue
            (cx, sx), (cy, sy) = _mean_std([r["clean"] for r in rows]), _mean_std([r["pgd20"] for r in rows])
            colour, marker = style[m]
            ax.errorbar(cx, cy, xerr=sx, yerr=sy, fmt=marker, color=colour, markersize=8, capsize=3, label=m)
        ax.set_title(pair.replace("_to_", " → ").replace("_", " "))
        ax.set_xlabel("clean accuracy")
        ax.set_ylabel("robust accuracy (PGD-20)")
        ax.xaxis.set_major_formatter(PERCENT)
        ax.yaxis.set_major_formatter(PERCENT)
    handles = {}
    for ax in axes[0]:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
               title="method")
    fig.suptitle("Fine-tuning methods: clean against robust accuracy (mean ± std over seeds)")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- clean vs robust (any runs)

def clean_robust(results: list[tuple[Path, dict]], path: Path) -> Path | None:
    return _save(clean_robust_figure(results), path)


def clean_robust_figure(results: list[tuple[Path, dict]]):
    """One point per results file (per radius for a multi-radius eval): clean against robust accuracy,
    labelled with its name in the table. Robust: the attack every file has, first in the first file's
    order; where none is shared, each file's first attack (the axis label says which)."""
    points = []  # (label, clean, {attack: acc})
    for p, r in results:
        clean, groups = (r.get("clean") or {}).get("acc"), radii(r)
        for eps, _, accs in groups:
            accs = {a: v for a, v in accs.items() if isinstance(v, (int, float))}
            if isinstance(clean, (int, float)) and accs:
                points.append((run_label(p, r) + (f" ({format_eps(eps)})" if len(groups) > 1 else ""), clean, accs))
    if not points:
        return None
    shared = [a for a in points[0][2] if all(a in accs for _, _, accs in points)]
    picked = [shared[0] if shared else next(iter(accs)) for _, _, accs in points]
    fig, ax = plt.subplots(figsize=(7, 5.5))
    xs, ys = [100 * c for _, c, _ in points], [100 * accs[a] for (_, _, accs), a in zip(points, picked)]
    ax.scatter(xs, ys, s=40, zorder=3)
    middle = (min(xs) + max(xs)) / 2
    for (label, _, _), x, y in zip(points, xs, ys):  # labels point inwards, to stay inside the axes
        right = x > middle
        ax.annotate(label, (x, y), xytext=(-4 if right else 4, 4), textcoords="offset points", fontsize=9,
                    ha="right" if right else "left")
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel(f"robust accuracy ({shared[0]})" if shared else
                  f"robust accuracy (each run's first attack: {', '.join(dict.fromkeys(picked))})")
    ax.xaxis.set_major_formatter(PERCENT)
    ax.yaxis.set_major_formatter(PERCENT)
    ax.margins(0.15)  # room for the labels of the outermost points
    ax.set_title("clean against robust accuracy")
    fig.tight_layout()
    return fig
