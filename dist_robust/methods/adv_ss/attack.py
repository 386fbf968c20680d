"""Adv-SS losses and the ensemble's joint attack (here, not in attacks/: it needs the views of one
``PretextNet``)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...attacks.pgd import ascend, attack_mode, random_start

# ---------------------------------------------------------------- losses and the joint attack

def task_loss(task: str, scores: torch.Tensor, labels: Optional[torch.Tensor], faithful: bool = False) -> torch.Tensor:
    """Per-sample loss of a task. Selfie: CE over the T candidates summed over the T positions, with
    CE applied to softmax probabilities when ``faithful`` (the authors' double softmax)."""
    if task != "selfie":
        return F.cross_entropy(scores, labels, reduction="none")
    b, t, _ = scores.shape
    if faithful:
        scores = scores.softmax(-1)
    target = torch.arange(t, device=scores.device).repeat(b)
    return F.cross_entropy(scores.reshape(b * t, t), target, reduction="none").view(b, t).sum(1)


def _correct(task: str, scores: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    if task == "selfie":  # per image, the fraction of its target positions filled right
        return (scores.argmax(-1) == torch.arange(scores.shape[1], device=scores.device)).float().mean(1).sum()
    return (scores.argmax(1) == labels).sum().float()


def logdet_penalty(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean_b log det(G_b^T G_b + 1e-5 I), G_b = [g_1 / |g_1|, ..., g_T / |g_T|] the flattened input
    gradients of sample b, each L2-normalised (+1e-10 in the norm, as the authors). Large when the
    tasks' gradients point in different directions. In fp32 at least: logdet is unstable in half."""
    cols = []
    for g in grads:
        g = g.flatten(1)
        if g.dtype in (torch.float16, torch.bfloat16):
            g = g.float()
        cols.append(g / (g.norm(dim=1, keepdim=True) + 1e-10))
    G = torch.stack(cols, 2)  # [B, D, T]
    gram = G.transpose(1, 2) @ G + 1e-5 * torch.eye(len(cols), dtype=G.dtype, device=G.device)
    return torch.logdet(gram).mean()


def task_gradients(net: nn.Module, views: dict, labels: dict, positions, faithful: bool = False):
    """(scores, batch-mean losses, input gradients with create_graph=True) of every task; ``views``
    must be leaves that require grad. Each view feeds only its task's loss, so one autograd.grad of
    the sum gives every task's gradient."""
    scores = net(views, positions)
    losses = {t: task_loss(t, scores[t], labels[t], faithful).mean() for t in views}
    grads = torch.autograd.grad(sum(losses.values()), list(views.values()), create_graph=True)
    return scores, losses, dict(zip(views, grads))


def joint_attack(model: nn.Module, views: dict, labels: dict, positions: Optional[torch.Tensor], eps: float,
                 steps: int, *, lam: float, norm: str = "Linf", step_size: Optional[float] = None,
                 random_init: bool = True, bn_mode: str = "eval", faithful: bool = False) -> dict:
    """The ensemble's adversary (the authors' PGD_attack_3module): each step moves every view along
    sign(g_task + lam * dh/dx_task) (the normalised direction for L2), then projects it onto the eps
    ball and [0, 1]. Runs on the unwrapped model in ``attack_mode``; returns detached views."""
    alpha = eps / 4 if step_size is None else step_size
    with attack_mode(model, bn_mode) as net:
        x0 = {t: v.detach() for t, v in views.items()}
        delta = {t: ((x + random_start(x, eps, norm)).clamp(0, 1) - x) if random_init else torch.zeros_like(x)
                 for t, x in x0.items()}
        for _ in range(steps):
            xs = {t: (x0[t] + delta[t]).requires_grad_(True) for t in x0}
            _, _, grads = task_gradients(net, xs, labels, positions, faithful)
            h_grads = torch.autograd.grad(logdet_penalty(list(grads.values())), list(xs.values()))
            delta = {t: ascend(x0[t], delta[t], grads[t].detach() + lam * hg, eps, alpha, norm)
                     for t, hg in zip(xs, h_grads)}
    return {t: (x0[t] + delta[t]).detach() for t in x0}
