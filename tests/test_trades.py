"""The TRADES KL term against values computed by hand, for each reduction, and the adversaries."""
import math

import pytest
import torch

from dist_robust import config
from dist_robust.attacks import pgd
from dist_robust.methods import build_method
from dist_robust.methods.trades import kl_term, trades_adversary
from dist_robust.models import build_model

CLEAN = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
ADV = [[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]]


def _softmax(row):
    z = [math.exp(v) for v in row]
    return [v / sum(z) for v in z]


def _kl_sum_by_hand():
    total = 0.0
    for c, a in zip(CLEAN, ADV):
        p, q = _softmax(c), _softmax(a)
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    return total


@pytest.mark.parametrize("reduction,divisor", [("sum", 1), ("batchmean", 2), ("mean", 6)])
def test_kl_term_matches_the_hand_computed_value(reduction, divisor):
    got = kl_term(torch.tensor(ADV), torch.tensor(CLEAN), reduction, batch=2)
    assert got.item() == pytest.approx(_kl_sum_by_hand() / divisor, rel=1e-6)
    # the reference's nn.KLDivLoss on (log_softmax(adv), softmax(clean)) gives the same number
    ref = torch.nn.KLDivLoss(reduction="sum")(torch.log_softmax(torch.tensor(ADV), 1), torch.softmax(torch.tensor(CLEAN), 1))
    assert got.item() == pytest.approx(ref.item() / divisor, rel=1e-6)


def test_twins_divides_each_wing_by_the_full_batch():
    half = kl_term(torch.tensor(ADV[:1]), torch.tensor(CLEAN[:1]), "batchmean", batch=2)
    p, q = _softmax(CLEAN[0]), _softmax(ADV[0])
    assert half.item() == pytest.approx(sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q)) / 2, rel=1e-6)


@pytest.mark.parametrize("adversary", ["kl", "ce"])
def test_trades_loss_is_ce_plus_beta_kl_and_the_clean_branch_gets_gradient(adversary):
    cfg = config.load_config(None, ["method.name=trades", f"attack.loss={adversary}", "attack.eps=0.1",
                                    "attack.steps=2", "method.beta=3.0"])
    torch.manual_seed(0)
    model = build_model("cnn3", 1, 10, [0.5], [0.5]).train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    torch.manual_seed(1)
    loss, metrics = build_method(cfg).loss(model, x, y)
    assert loss.requires_grad and metrics["n"].item() == 8
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(config.ConfigError, match="attack.loss"):
        config.load_config(None, ["method.name=trades", "attack.loss=cw"])


def test_kl_adversary_starts_near_x_without_a_random_start(monkeypatch):
    """At x the KL to the clean prediction is zero and so is its gradient, up to rounding: started there,
    PGD's first sign step follows rounding noise (or nothing, where it is exactly zero). The KL adversary
    starts at x + 0.001 N(0, I), as the reference, whatever attack.random_start says; it then stays in the
    eps ball and the [0, 1] box and raises the KL."""
    from dist_robust.methods import trades
    starts = []

    def recording_pgd(*args, **kw):
        starts.append(kw["delta0"])
        return pgd(*args, **kw)

    monkeypatch.setattr(trades, "pgd", recording_pgd)
    cfg = config.load_config(None, ["method.name=trades", "attack.loss=kl", "attack.random_start=false",
                                    "attack.eps=0.1", "attack.steps=3"])
    torch.manual_seed(0)
    model = build_model("cnn3", 1, 10, [0.5], [0.5]).train()
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    x_adv = trades_adversary(model, x, y, cfg.attack)
    assert starts[0] is not None and starts[0].shape == x.shape
    assert abs(starts[0].std().item() - 0.001) < 1e-4 and abs(starts[0].mean().item()) < 1e-4
    delta = (x_adv - x).flatten(1).abs()
    assert (delta.amax(1) > 0).all()  # every point moved
    assert delta.max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1  # eps ball and [0, 1] box
    model.eval()
    with torch.no_grad():
        assert kl_term(model(x_adv), model(x), "sum", len(x)).item() > 0


def test_every_restart_of_the_kl_adversary_starts_off_x(monkeypatch):
    """Not only the first restart (the one TRADES seeds): with attack.random_start=false a later KL
    restart starting at x would take its steps along rounding noise too."""
    import importlib
    pgd_module = importlib.import_module("dist_robust.attacks.pgd")  # the package's `pgd` is the function
    firsts = []
    make_step = pgd_module.make_step

    def recording_make_step(*args, **kw):
        step = make_step(*args, **kw)

        def recorded(x, delta, *rest):
            firsts.append(delta.clone())
            return step(x, delta, *rest)
        return recorded

    monkeypatch.setattr(pgd_module, "make_step", recording_make_step)
    torch.manual_seed(0)
    model = build_model("cnn3", 1, 10, [0.5], [0.5]).eval()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    pgd(model, x, y, 0.1, 1, loss="kl", random_init=False, restarts=3)
    assert len(firsts) == 3 and all(d.abs().amax() > 0 for d in firsts)
    ce_firsts = len(firsts)
    pgd(model, x, y, 0.1, 1, loss="ce", random_init=False, restarts=2)
    assert all(d.abs().amax() == 0 for d in firsts[ce_firsts:])  # CE without a random start: x itself
