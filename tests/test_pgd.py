"""PGD: eps ball and [0,1] box, modes and requires_grad restored (also on errors), no parameter
gradients written, robust accuracy <= clean accuracy on a model trained here."""
import pytest
import torch
from torch import nn

from dist_robust.attacks import attack_mode, pgd_linf
from dist_robust.data import load_dataset
from dist_robust.engine.evaluate import evaluate
from dist_robust.models import build_model


@pytest.fixture(scope="module")
def trained():
    """cnn3 trained for a few seconds on 3,000 MNIST images (clean accuracy well above chance)."""
    torch.manual_seed(0)
    ds = load_dataset("mnist", "train")
    x = ds.images[:3000].float() / 255
    y = ds.labels[:3000]
    model = build_model("cnn3", 1, 10, ds.info.mean, ds.info.std)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for i in range(0, 3000, 100):
            loss = nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model, load_dataset("mnist", "test")


def _batch(test, n=64):
    return test.images[:n].float() / 255, test.labels[:n]


@pytest.mark.parametrize("eps,steps,random_start", [(0.3, 5, True), (0.1, 3, False), (8 / 255, 1, True)])
def test_perturbation_in_eps_ball_and_box(trained, eps, steps, random_start):
    model, test = trained
    x, y = _batch(test)
    x_adv = pgd_linf(model, x, y, eps, steps, random_start=random_start)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


def test_modes_flags_and_grads_restored(trained):
    model, test = trained
    x, y = _batch(test, 16)
    model.train()
    model.features.stage1.eval()  # a mixed state must come back exactly
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    stats = [b.clone() for b in model.buffers()]
    pgd_linf(model, x, y, 0.3, 3)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    # eval-mode BN during the attack: running statistics untouched
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    frozen.requires_grad_(True)
    model.eval()


def test_restored_when_the_attack_raises(trained):
    model, _ = trained
    model.train()

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with attack_mode(model) as net:
            assert not net.training and not any(p.requires_grad for p in net.parameters())
            raise Boom()
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    model.eval()


def test_attack_lowers_accuracy_and_robust_at_most_clean(trained):
    model, test = trained
    res = evaluate(model, test, ["clean", "pgd-10"], eps=0.3, batch_size=250, device="cpu", limit=500)
    clean, robust = res["clean"]["acc"], res["attacks"]["pgd-10"]["acc"]
    assert res["n"] == 500
    assert clean > 0.7           # the model learned something
    assert robust <= clean
    assert robust < clean - 0.3  # a non-robust model falls to a real attack at eps 0.3
    # the attack finds points a weaker attack misses, never fewer
    weak = evaluate(model, test, ["pgd-1"], eps=0.3, batch_size=250, device="cpu", limit=500)
    assert robust <= weak["attacks"]["pgd-1"]["acc"]
