"""RiFT (Zhu et al., ICCV 2023): module robust criticality, weight interpolation, alpha selection.

The three library pieces of the method (design/methods.md section 3); stage wiring lives elsewhere:

1. ``module_robust_criticality``: for every Conv2d/Linear weight W, the largest increase of the robust
   loss over a fixed adversarial set that a perturbation of W alone, inside the relative Frobenius ball
   ||W - W0||_F <= eps_w * ||W0||_F, can cause (MRC). Parallel over modules: rank r takes modules
   r, r + world, ... and the table is gathered, so every rank returns the same table.
2. ``interpolate_state``: theta(alpha) = alpha * theta_tuned + (1 - alpha) * theta_robust.
3. ``select_alpha``: the best clean accuracy among the alphas that keep robust accuracy
   >= robust(alpha=0) - tau.

Plus writers for the MRC table and the alpha curve (JSON, Markdown, PNG). Writers write whatever they
are given: call them on the main rank only.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ... import dist

__all__ = ["critical_modules", "interpolate_state", "module_robust_criticality", "project_relative",
           "rank_modules", "select_alpha", "write_alpha_curve", "write_mrc_table"]


# ---------------------------------------------------------------- module robust criticality

def critical_modules(model: nn.Module) -> list[str]:
    """Names (as in the unwrapped model's ``named_modules``) of every Conv2d and Linear, in
    registration order, which is forward order for every model in ``dist_robust.models``. BN is not a
    "module" for MRC (the official code perturbs conv and linear weights only)."""
    return [n for n, m in dist.unwrap(model).named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def project_relative(w: torch.Tensor, w0: torch.Tensor, eps_w: float) -> torch.Tensor:
    """w projected onto the ball ||w - w0||_F <= eps_w * ||w0||_F: the difference is rescaled onto
    the sphere when it lies outside, and w is returned unchanged (the same values) when it lies inside."""
    diff = w - w0
    # Norms in float64: the float32 rounding of a large tensor's norm could leave w just outside.
    d, radius = diff.double().norm().item(), eps_w * w0.double().norm().item()
    if d <= radius:
        return w
    return w0 + diff * (radius / d)  # radius == 0 (a zero W0) collapses w onto w0


def _relative_distance(w: torch.Tensor, w0: torch.Tensor) -> float:
    n0, d = w0.double().norm().item(), (w - w0).double().norm().item()
    return d / n0 if n0 > 0 else (0.0 if d == 0 else math.inf)


@torch.no_grad()
def _full_set_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(mean CE, accuracy) over the whole set. Per-sample losses are summed in float64, so the value
    does not depend (beyond float64 rounding) on how the set is cut into batches; in eval mode BN
    uses running statistics, so each sample's loss does not depend on its batch either."""
    total, correct = torch.zeros((), dtype=torch.float64, device=x.device), 0
    for i in range(0, len(x), batch_size):
        logits = net(x[i:i + batch_size])
        total += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum").double()
        correct += int((logits.argmax(1) == y[i:i + batch_size]).sum())
    return total.item() / len(x), correct / len(x)


def _module_mrc(net: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor, loss0: float, acc0: float,
                eps_w: float, epochs: int, lr: float, batch_size: int) -> dict:
    """Worst-case perturbation of ``name``'s weight by projected gradient ascent; ``net`` is a private
    copy in eval mode whose parameters all have requires_grad off. The weight is restored on return."""
    w = net.get_submodule(name).weight
    w0 = w.detach().clone()
    # The unperturbed weight is in the ball, so it is a candidate ("epoch 0"): MRC >= 0 as the paper
    # defines it (a max over the ball). The official code keeps only the projected epochs, so an ascent
    # that overshoots (lr too large for this layer) gives it a negative MRC and makes the module look
    # least critical; here it reads 0 with epoch 0, which flags the failed ascent instead.
    best = {"loss": loss0, "acc": acc0, "epoch": 0}
    w.requires_grad_(True)
    try:
        for epoch in range(1, epochs + 1):
            # One ascent "epoch", as the official code: SGD(lr) on -CE, batch mean, batches in a fixed
            # order; the projection comes only at the end of the epoch.
            for i in range(0, len(x), batch_size):
                loss = F.cross_entropy(net(x[i:i + batch_size]), y[i:i + batch_size])
                # autograd.grad: no .grad buffers, and no weight-gradient work for the other layers.
                (g,) = torch.autograd.grad(loss, w)
                with torch.no_grad():
                    w.add_(g, alpha=lr)
            with torch.no_grad():
                w.copy_(project_relative(w, w0, eps_w))
            loss_e, acc_e = _full_set_loss(net, x, y, batch_size)
            if loss_e > best["loss"]:  # strict: the earliest epoch wins a tie
                best = {"loss": loss_e, "acc": acc_e, "epoch": epoch}
        rel = _relative_distance(w.detach(), w0)
    finally:
        w.requires_grad_(False)
        with torch.no_grad():
            w.copy_(w0)
    return {"mrc": best["loss"] - loss0, "loss": best["loss"], "loss0": loss0, "acc": best["acc"],
            "acc0": acc0, "acc_drop": acc0 - best["acc"], "epoch": best["epoch"], "rel_dist": rel}


def module_robust_criticality(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor,
                              names: Optional[Sequence[str]] = None, eps_w: float = 0.1, epochs: int = 10,
                              lr: float = 1.0, batch_size: int = 512, done: Optional[dict] = None,
                              after_round: Optional[Callable[[dict], None]] = None) -> dict[str, dict]:
    """MRC of every module in ``names`` (default: ``critical_modules(model)``), on the fixed
    adversarial set (x_adv, y), which should live on the model's device.

    Returns ``{name: entry}`` in ``names`` order, the same on every rank. An entry holds:
    ``mrc`` (max loss - L0, >= 0), ``loss`` (that max over the unperturbed weight and the projected
    epochs), ``loss0`` (L0, unperturbed), ``acc`` (robust accuracy at the max), ``acc0``, ``acc_drop``
    (acc0 - acc), ``epoch`` (1-based epoch of the max; 0 when no epoch beat the unperturbed weight, i.e.
    the ascent failed, typically lr too large for that layer) and ``rel_dist`` (||W - W0||_F / ||W0||_F
    after the last epoch, <= eps_w).

    Losses are means over the whole set accumulated in float64 (``_full_set_loss``). Each module's
    computation is the same sequence of operations whichever rank runs it, so the table does not depend
    on the world size (the 2-rank test agrees with 1 rank to 1e-6; on CUDA, cuDNN's non-deterministic
    kernels can add noise unless ``torch.backends.cudnn.deterministic`` is set). The ascent steps use
    batch means, so ``batch_size`` is part of the method (the official 512), not a memory knob. Under
    torch.distributed, modules go round-robin by index to ranks, one round of one module per rank at a
    time, and each round's entries are gathered with all_gather_object: every rank must call this.
    ``done``: entries computed earlier (a resumed stage), not computed again; ``after_round(table)`` is
    called on every rank after each round with the entries so far (the stage saves them there, and may
    stop).
    """
    names = list(critical_modules(model) if names is None else names)
    if eps_w < 0 or epochs < 1 or batch_size < 1 or len(x_adv) == 0 or len(x_adv) != len(y):
        raise ValueError(f"MRC needs eps_w >= 0, epochs >= 1, batch_size >= 1 and a non-empty set with one "
                         f"label per image (eps_w={eps_w}, epochs={epochs}, batch_size={batch_size}, "
                         f"{len(x_adv)} images, {len(y)} labels)")
    # One private copy per rank: eval mode (BN uses running statistics, nothing in the model changes
    # but the perturbed weight, which _module_mrc restores), every parameter frozen.
    net = copy.deepcopy(dist.unwrap(model)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    for n in names:
        m = dict(net.named_modules()).get(n)
        if not isinstance(getattr(m, "weight", None), torch.Tensor):
            raise ValueError(f"{n!r} is not a module of the model with a weight")
    x_adv, y = x_adv.detach(), y.detach()
    loss0, acc0 = _full_set_loss(net, x_adv, y, batch_size)

    table = {n: e for n, e in (done or {}).items() if n in names}
    todo, rank, world = [n for n in names if n not in table], dist.rank(), dist.world_size()
    for start in range(0, len(todo), world):  # a round: one module per rank, then every rank has them all
        part = todo[start:start + world]
        mine = {part[rank]: _module_mrc(net, part[rank], x_adv, y, loss0, acc0, eps_w, epochs, lr, batch_size)
                } if rank < len(part) else {}
        for entries in dist.all_gather_objects(mine):
            table.update(entries)
        if after_round is not None:
            after_round(table)
    return {n: table[n] for n in names}


def rank_modules(table: dict[str, dict]) -> list[str]:
    """Module names by ascending MRC (ties keep the table's order, i.e. forward order)."""
    return sorted(table, key=lambda n: table[n]["mrc"])


# ---------------------------------------------------------------- interpolation and alpha selection

def interpolate_state(state_robust: dict[str, torch.Tensor], state_tuned: dict[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """alpha * tuned + (1 - alpha) * robust for every floating entry, BN running statistics included
    (as the official code: the statistics drift during fine-tuning and are interpolated too).

    Written as that sum, not robust + alpha * (tuned - robust), so alpha=0 gives the robust entries
    and alpha=1 the tuned ones exactly. Integer entries (BN's num_batches_tracked), which cannot be
    interpolated, come from the nearer end: tuned when alpha >= 0.5, else robust. They are unused by BN
    with the default momentum, so the choice only keeps the state loadable.
    """
    if state_robust.keys() != state_tuned.keys():
        diff = sorted(set(state_robust) ^ set(state_tuned))
        raise ValueError(f"the two states have different keys, e.g. {diff[:5]}")
    out = {}
    for k, r in state_robust.items():
        t = state_tuned[k]
        if r.shape != t.shape or r.dtype != t.dtype:
            raise ValueError(f"entry {k}: robust {tuple(r.shape)} {r.dtype} vs tuned {tuple(t.shape)} {t.dtype}")
        if r.is_floating_point():
            out[k] = alpha * t.detach() + (1 - alpha) * r.detach()
        else:
            out[k] = (t if alpha >= 0.5 else r).detach().clone()
    return out


def select_alpha(curve: Sequence[dict], tau: float = 0.0) -> float:
    """The alpha with the best clean accuracy among those with robust >= robust(alpha=0) - tau;
    ties go to the smaller alpha (closer to the robust model). ``curve``: [{alpha, clean, robust}]."""
    if len({float(c["alpha"]) for c in curve}) != len(curve):
        raise ValueError("the alpha curve has a repeated alpha")
    base = [c for c in curve if float(c["alpha"]) == 0.0]
    if not base:
        raise ValueError("the alpha curve has no alpha=0 point (the robust model), which the "
                         "robustness constraint is measured against")
    floor = base[0]["robust"] - tau
    ok = [c for c in curve if c["robust"] >= floor]  # never empty: alpha=0 itself qualifies (tau >= 0)
    if not ok:
        raise ValueError(f"no alpha keeps robust accuracy >= {floor} (tau={tau} < 0?)")
    return float(min(ok, key=lambda c: (-c["clean"], float(c["alpha"])))["alpha"])


# ---------------------------------------------------------------- reports

def _figure(width: float, height: float):
    # The Agg canvas directly, not pyplot: no global backend or figure state, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def write_mrc_table(table: dict[str, dict], out_dir: str | Path) -> list[Path]:
    """mrc.json and mrc.md (modules by ascending MRC) and mrc.png (MRC per module in forward order,
    the lowest in another colour). Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = rank_modules(table)
    rows = [{"module": n, **table[n]} for n in order]
    (out / "mrc.json").write_text(json.dumps({"order": "ascending mrc", "modules": rows}, indent=2) + "\n")

    lines = ["| rank | module | MRC | max loss | L0 | robust acc | drop | epoch | rel dist |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['module']} | {r['mrc']:.4f} | {r['loss']:.4f} | {r['loss0']:.4f} | "
                     f"{100 * r['acc']:.2f} | {100 * r['acc_drop']:.2f} | {r['epoch']} | {r['rel_dist']:.4f} |")
    (out / "mrc.md").write_text("\n".join(lines) + "\n")

    names = list(table)
    fig = _figure(max(4.0, 0.35 * len(names) + 1.5), 4.0)
    ax = fig.add_subplot()
    colours = ["tab:green" if order and n == order[0] else "tab:blue" for n in names]
    ax.bar(range(len(names)), [table[n]["mrc"] for n in names], color=colours)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("MRC (max robust loss - L0)")
    ax.set_title("Module robust criticality (green: lowest)")
    fig.tight_layout()
    fig.savefig(out / "mrc.png", dpi=100)
    return [out / "mrc.json", out / "mrc.md", out / "mrc.png"]


def write_alpha_curve(curve: Sequence[dict], chosen: float, out_dir: str | Path) -> list[Path]:
    """alpha_curve.json/.md/.png: clean and robust accuracy against alpha, the chosen alpha marked."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pts = sorted(curve, key=lambda c: float(c["alpha"]))
    (out / "alpha_curve.json").write_text(json.dumps({"chosen": chosen, "curve": list(pts)}, indent=2) + "\n")

    lines = ["| alpha | clean | robust | |", "|---:|---:|---:|---|"]
    for c in pts:
        mark = "chosen" if float(c["alpha"]) == float(chosen) else ""
        lines.append(f"| {float(c['alpha']):.2f} | {100 * c['clean']:.2f} | {100 * c['robust']:.2f} | {mark} |")
    (out / "alpha_curve.md").write_text("\n".join(lines) + "\n")

    fig = _figure(5.0, 3.5)
    ax = fig.add_subplot()
    alphas = [float(c["alpha"]) for c in pts]
    ax.plot(alphas, [100 * c["clean"] for c in pts], "o-", label="clean")
    ax.plot(alphas, [100 * c["robust"] for c in pts], "s-", label="robust")
    ax.axvline(float(chosen), color="gray", linestyle="--", label=f"chosen alpha={float(chosen):g}")
    ax.set_xlabel("alpha (0 = robust model, 1 = fine-tuned)")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "alpha_curve.png", dpi=100)
    return [out / "alpha_curve.json", out / "alpha_curve.md", out / "alpha_curve.png"]
