"""MART (methods/mart.py): its loss against a hand computation, and the same gradient on 2 ranks as on 1."""
import math

import pytest
import torch

from conftest import run_ranks, save_shard_gradients
from dist_robust import config
from dist_robust.methods import build_method, mart
from dist_robust.models import build_model
from dist_robust.models.partial import configure_finetuning

CLEAN = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]
ADV = [[0.5, 1.5, -0.5], [1.0, -1.0, 0.0]]
Y = [0, 2]
BETA = 6.0


def _by_hand() -> float:
    """The reference's formula written out per point, in plain Python."""
    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]
    boosted = kl_term = 0.0
    for clean, adv, y in zip(CLEAN, ADV, Y):
        p, q = softmax(clean), softmax(adv)
        ranked = sorted(range(3), key=lambda k: q[k])
        runner_up = ranked[-2] if ranked[-1] == y else ranked[-1]
        boosted += -math.log(q[y]) - math.log(1.0001 - q[runner_up] + 1e-12)
        kl = sum(p[k] * (math.log(p[k]) - math.log(q[k] + 1e-12)) for k in range(3))
        kl_term += kl * (1.0000001 - p[y])
    return boosted / len(Y) + BETA * kl_term / len(Y)


def test_mart_loss_matches_the_hand_computed_value():
    got = mart.mart_loss(torch.tensor(CLEAN), torch.tensor(ADV), torch.tensor(Y), BETA)
    assert got.item() == pytest.approx(_by_hand(), rel=1e-6)
    # the runner-up of point 0 is class 1 (its adversarial top class is not y): the boost reads it
    no_kl = mart.mart_loss(torch.tensor(CLEAN), torch.tensor(ADV), torch.tensor(Y), 0.0)
    assert no_kl.item() < got.item()


def test_mart_keys_and_its_adversary_are_checked():
    cfg = config.load_config(None, ["method.name=mart", "method.beta=5.0"])
    assert cfg.method.beta == 5.0
    with pytest.raises(config.ConfigError, match="attack.loss='kl'"):
        config.load_config(None, ["method.name=mart", "attack.loss=kl"])
    with pytest.raises(config.ConfigError, match="method.beta=-1.0"):
        config.load_config(None, ["method.name=mart", "method.beta=-1"])


def _setup():
    """A model whose forward treats every sample alone (BN on its source statistics), a batch of 16,
    and an adversary that is a fixed function of x (the test compares gradients, not attacks)."""
    torch.manual_seed(0)
    model = configure_finetuning(build_model("cnn3", 1, 10, [0.5], [0.5], width=4), tuned_bn="freeze_stats")
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 1, 12, 12, generator=g), torch.randint(0, 10, (16,), generator=g)
    return model.train(), x, y, build_method(config.load_config(None, ["method.name=mart"]))


def _fixed_pgd(model, x, y, eps, steps, **kw):
    return (x + 0.1 * torch.sin(97 * x).sign()).clamp(0, 1)


def _grad_worker(rank, world, out_dir):
    mart.pgd = _fixed_pgd
    save_shard_gradients(*_setup(), rank, world, out_dir)


@pytest.mark.multiproc
def test_mart_gradient_on_two_ranks_equals_one_rank_at_the_same_global_batch(tmp_path, monkeypatch):
    run_ranks(_grad_worker, 2, str(tmp_path))
    two = torch.load(tmp_path / "grads.pt")
    monkeypatch.setattr(mart, "pgd", _fixed_pgd)
    model, x, y, method = _setup()
    loss, metrics = method.loss(model, x, y)
    loss.backward()
    assert metrics["n"].item() == 16 and 0 <= metrics["clean_correct"].item() <= 16
    for name, p in model.named_parameters():
        torch.testing.assert_close(two[name], p.grad, rtol=0, atol=1e-6, msg=name)
