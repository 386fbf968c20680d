"""The PGD family: eps ball and [0,1] box for every norm, loss and restart setting; modes, flags,
branches and gradients restored (also when the loss raises); agreement with torchattacks; the fused
(compiled) step equals the eager one."""
import pytest
import torch
import torchattacks
from torch import nn

from dist_robust.attacks import pgd
from dist_robust.attacks.fused import eager_step
from dist_robust.data import load_dataset
from dist_robust.evaluate import evaluate
from dist_robust.models import build_model


@pytest.fixture(scope="module")
def trained():
    """cnn3 trained for a few seconds on 3,000 MNIST images (clean accuracy well above chance)."""
    torch.manual_seed(0)
    ds = load_dataset("mnist", "train")
    x = ds.images[:3000].float() / 255
    y = ds.labels[:3000]
    # width 16 (not 32): the attacks are under test, and a narrow model keeps them 4x cheaper
    model = build_model("cnn3", 1, 10, ds.info.mean, ds.info.std, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):
        for i in range(0, 3000, 100):
            loss = nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval(), load_dataset("mnist", "test")


def _batch(test, n=64, start=0):
    return test.images[start:start + n].float() / 255, test.labels[start:start + n]


def _custom_loss(net, x_adv, y):  # e.g. a pretext task: any per-sample differentiable loss
    return net(x_adv).logsumexp(1)


def _dist(a, b, norm):
    d = (a - b).flatten(1)
    return d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.3), ("L2", 2.0)])
@pytest.mark.parametrize("loss", ["ce", "cw", "kl", _custom_loss])
@pytest.mark.parametrize("restarts,random_init", [(1, True), (2, True), (1, False)])
def test_perturbation_in_ball_and_box(trained, norm, eps, loss, restarts, random_init):
    model, test = trained
    x, y = _batch(test, 32)
    x_adv = pgd(model, x, y, eps, 3, norm=norm, loss=loss, restarts=restarts, random_init=random_init)
    assert (_dist(x_adv, x, norm) <= eps * (1 + 1e-5) + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad and x_adv.shape == x.shape
    if loss in ("ce", "cw"):  # the attack must hurt: fewer correct than clean on a non-robust model
        with torch.no_grad():
            assert (model(x_adv).argmax(1) == y).sum() < (model(x).argmax(1) == y).sum()


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 1.5)])
@pytest.mark.slow
def test_bf16_attack_on_the_cpu_stays_in_bounds_and_is_as_strong(trained, norm, eps):
    """precision=bf16 on the CPU: the forward and input gradient under bf16 autocast, the perturbation
    and its projection in fp32, so the result is fp32, in the ball and the box, and about as strong as
    the fp32 attack from the same starts; fp16 stays CUDA-only."""
    model, test = trained
    x, y = _batch(test, 256, start=1000)
    adv = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        adv[precision] = pgd(model, x, y, eps, 10, norm=norm, precision=precision)
    low = adv["bf16"]
    assert low.dtype == torch.float32 and not torch.equal(low, adv["fp32"])  # bf16 really ran
    assert (_dist(low, x, norm) <= eps * (1 + 1e-5) + 1e-6).all() and low.min() >= 0 and low.max() <= 1
    with torch.no_grad():
        acc = {p: (model(a).argmax(1) == y).float().mean().item() for p, a in adv.items()}
    assert acc["bf16"] < (model(x).argmax(1) == y).float().mean().item() - 0.1  # it attacks
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.02, acc  # within 5 of 256 points
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        pgd(model, x[:2], y[:2], eps, 1, norm=norm, precision="fp16")


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_an_attack_inside_a_bf16_training_forward_keeps_its_own_precision(trained, loss):
    """train.precision=bf16 wraps the method's loss, attack included, in bf16 autocast: an fp32 attack
    there gives bitwise what it gives outside, and a bf16 one what a bf16 one gives outside."""
    model, test = trained
    x, y = _batch(test, 32)
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        outside = pgd(model, x, y, 0.1, 3, loss=loss, precision=precision)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = pgd(model, x, y, 0.1, 3, loss=loss, precision=precision)
        assert torch.equal(inside, outside), precision


def test_targeted_attack_reaches_its_targets(trained):
    model, test = trained
    x, y = _batch(test, 64)
    target = (y + 1) % 10
    x_adv = pgd(model, x, target, 0.3, 20, targeted=True)
    with torch.no_grad():
        hit = (model(x_adv).argmax(1) == target).float().mean()
    assert hit > 0.5 and (x_adv - x).abs().max() <= 0.3 + 1e-6


def test_fgsm_is_the_one_step_case(trained):
    model, test = trained
    x, y = _batch(test, 64)
    x_adv = pgd(model, x, y, 0.1, 1, step_size=0.1, random_init=False)
    x_req = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(nn.functional.cross_entropy(model(x_req), y, reduction="sum"), x_req)
    assert torch.equal(x_adv, (x + 0.1 * grad.sign()).clamp(0, 1))


def test_restarts_keep_the_worst_case(trained):
    model, test = trained
    x, y = _batch(test, 128, start=500)
    torch.manual_seed(3)
    one = pgd(model, x, y, 0.1, 2)
    torch.manual_seed(3)  # same first start: restarts can only add fooled points
    five = pgd(model, x, y, 0.1, 2, restarts=5)
    with torch.no_grad():
        assert (model(five).argmax(1) == y).sum() <= (model(one).argmax(1) == y).sum()


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
    pgd(model, x, y, 0.3, 3)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    # eval-mode BN during the attack: running statistics untouched
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    frozen.requires_grad_(True)
    model.eval()


def test_restored_when_the_loss_raises(trained):
    model, test = trained
    x, y = _batch(test, 8)
    model.train()

    class Boom(RuntimeError):
        pass

    def exploding(net, x_adv, y):
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        raise Boom()

    with pytest.raises(Boom):
        pgd(model, x, y, 0.3, 3, loss=exploding)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    model.eval()


class TwoBranchBN(nn.Module):
    """A stand-in for TWINS's dual BN: two BN layers, the active one chosen by ``bn_branch``."""
    bn_branches = ("frozen", "adaptive")

    def __init__(self, c):
        super().__init__()
        self.frozen, self.adaptive, self.bn_branch = nn.BatchNorm2d(c), nn.BatchNorm2d(c), "adaptive"
        self.seen = []

    def forward(self, x):
        self.seen.append(self.bn_branch)
        return getattr(self, self.bn_branch)(x)


def test_bn_branch_is_selected_and_restored():
    torch.manual_seed(0)
    bn = TwoBranchBN(4)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), bn, nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    net(x)
    bn.seen.clear()
    pgd(net, x, y, 0.1, 2, bn_branch="frozen")
    assert bn.seen and set(bn.seen) == {"frozen"} and bn.bn_branch == "adaptive"
    with pytest.raises(ValueError, match="not one of"):
        pgd(net, x, y, 0.1, 2, bn_branch="nonesuch")
    with pytest.raises(ValueError, match="no module with several BN branches"):
        pgd(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), x, y, 0.1, 1, bn_branch="frozen")


@pytest.mark.parametrize("norm,eps,alpha,cls", [("Linf", 0.1, 0.025, torchattacks.PGD),
                                                ("L2", 1.5, 0.3, torchattacks.PGDL2)])
@pytest.mark.slow
def test_robust_accuracy_agrees_with_torchattacks(trained, norm, eps, alpha, cls):
    """Same model, points, eps, step and steps: deterministic (no random start) runs agree to the
    point; random-start runs within 1 point on 500 points."""
    model, test = trained
    x, y = _batch(test, 500, start=1000)
    for random_init, tolerance in ((False, 0.002), (True, 0.01)):
        torch.manual_seed(0)
        ours = pgd(model, x, y, eps, 10, norm=norm, step_size=alpha, random_init=random_init)
        ref = cls(model, eps=eps, alpha=alpha, steps=10, random_start=random_init)(x, y)
        with torch.no_grad():
            acc_ours = (model(ours).argmax(1) == y).float().mean().item()
            acc_ref = (model(ref).argmax(1) == y).float().mean().item()
        assert abs(acc_ours - acc_ref) <= tolerance, (norm, random_init, acc_ours, acc_ref)


@pytest.mark.slow
def test_attack_lowers_accuracy_and_robust_at_most_clean(trained):
    model, test = trained
    res = evaluate(model, test, ["clean", "pgd-10", "cw-10"], eps=0.3, batch_size=250, device="cpu", limit=250)
    clean, robust = res["clean"]["acc"], res["attacks"]["pgd-10"]["acc"]
    assert res["n"] == 250 and res["attacks"]["cw-10"]["loss"] == "cw"
    assert clean > 0.5           # the model learned something (chance: 0.1; 0.70-0.72 measured, by CPU)
    assert robust <= clean and res["attacks"]["cw-10"]["acc"] <= clean
    assert robust < clean - 0.3  # a non-robust model falls to a real attack at eps 0.3
    two = evaluate(model, test, ["pgd-10"], eps=0.3, batch_size=250, device="cpu", limit=250, restarts=2)
    assert two["attacks"]["pgd-10"]["correct"] <= res["attacks"]["pgd-10"]["correct"]  # restart 0 is shared


@pytest.mark.slow
def test_fused_step_equals_eager():
    """The compiled step against the eager one on random inputs (a small model keeps the one-off
    compilation short). L2 steps are continuous and must agree to fp32 tolerance; L-inf steps take
    a sign, which may flip only where the gradient is ~0."""
    from dist_robust.attacks.fused import make_step
    torch.manual_seed(0)
    net = build_model("cnn3", 1, 10, [0.5], [0.25], width=4).eval().requires_grad_(False)
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    delta = torch.empty_like(x).uniform_(-0.05, 0.05)
    for norm, eps, alpha in (("L2", 1.0, 0.2), ("Linf", 0.1, 0.02)):
        fused = make_step(net, "ce", norm, False, 0.0, "fp32", "on", x)
        eager = eager_step(net, "ce", norm, False, 0.0, "fp32")
        a, b = fused(x, delta, y, None, eps, alpha), eager(x, delta, y, None, eps, alpha)
        if norm == "L2":
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        else:
            assert (a != b).float().mean() < 1e-3
        # a smaller (last) batch runs padded to the compiled size and gives the same rows
        c = fused(x[:5], delta[:5], y[:5], None, eps, alpha)
        torch.testing.assert_close(c, a[:5], atol=1e-6, rtol=0)
