"""Synchronised BN on real 2-process gloo groups equals single-process BN on the concatenated batch."""
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import run_cases
from dist_robust.models.sync_bn import SyncBatchNorm2d, convert_sync_bn, revert_sync_bn

C = 5


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, C, 4, 3, generator=g) * 3 + 7  # an offset mean: the shifted sums must cope
    w = torch.randn(12, C, 4, 3, generator=g)          # fixed output weights: loss = sum(w * bn(x))
    return x, w


def _reference(steps):
    """Single-process BN on the whole batch, ``steps`` forward/backward passes."""
    x, w = _batch()
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(C)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.5, 0.5)
    bn.train()
    for _ in range(steps):
        xr = x.clone().requires_grad_(True)
        bn.zero_grad()
        out = bn(xr)
        (out * w).sum().backward()
    return out.detach(), xr.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def _sync_worker(rank, world, rows, steps):
    x, w = _batch()
    lo, hi = rows[rank]
    torch.manual_seed(3)
    bn = convert_sync_bn(nn.BatchNorm2d(C))
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.5, 0.5)
    bn.train()
    for _ in range(steps):
        xr = x[lo:hi].clone().requires_grad_(True)
        bn.zero_grad()
        with warnings.catch_warnings():  # torch's deprecated collectives warned on every rank of every run
            warnings.simplefilter("error", FutureWarning)
            out = bn(xr)
            (out * w[lo:hi]).sum().backward()
    grads = torch.cat([bn.weight.grad, bn.bias.grad])
    dist.all_reduce(grads)  # what DDP would sum (before its division by the world size)
    ref_out, ref_xgrad, ref_wgrad, ref_bgrad, ref_mean, ref_var = _reference(steps)
    torch.testing.assert_close(out.detach(), ref_out[lo:hi], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xr.grad, ref_xgrad[lo:hi], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads, torch.cat([ref_wgrad, ref_bgrad]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, ref_var, atol=1e-5, rtol=1e-5)


LAYOUTS = {"even": ((0, 6), (6, 12)), "uneven": ((0, 9), (9, 12)), "rank1-empty": ((0, 12), (12, 12))}


@pytest.fixture(scope="module")
def sync_outcomes(tmp_path_factory):
    """Every layout in one 2-rank group, two steps each (running statistics compound)."""
    return run_cases(_sync_worker, 2, {name: (rows, 2) for name, rows in LAYOUTS.items()},
                     tmp_path_factory.mktemp("sync_bn"))


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_rank_sync_bn_equals_one_process_bn_on_the_whole_batch(sync_outcomes, layout):
    assert sync_outcomes[layout] == ["ok", "ok"]


def test_without_a_group_or_in_eval_it_is_plain_batchnorm():
    x, _ = _batch()
    torch.manual_seed(3)
    plain = nn.BatchNorm2d(C)
    sync = convert_sync_bn(nn.Sequential(nn.BatchNorm2d(C)))[0]
    sync.load_state_dict(plain.state_dict())
    assert isinstance(sync, SyncBatchNorm2d)
    torch.testing.assert_close(sync(x), plain(x))
    sync.eval(), plain.eval()
    torch.testing.assert_close(sync(x), plain(x))
    back = revert_sync_bn(nn.Sequential(sync))[0]
    assert type(back) is nn.BatchNorm2d
    assert back.state_dict().keys() == plain.state_dict().keys()
