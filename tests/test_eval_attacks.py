"""Evaluation attacks as plug-ins (attacks/registry.py): FGSM stays in the eps ball and the [0, 1] box,
leaves the model as it was and agrees with torchattacks' FGSM; a copy of fgsm.py under a new name is
evaluable with no other edit and counts as the original does; names are parsed by their families and an
unknown one lists every family's grammar."""
import importlib
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchattacks

from dist_robust import evaluate_model
from dist_robust.attacks import registry
from dist_robust.attacks.registry import EVAL_ATTACKS, parse_attack
from dist_robust.data import load_dataset
from dist_robust.models import build_model

EPS = 0.05


@pytest.fixture(scope="module")
def trained():
    """(cnn3 of width 4 trained for about a second on digits, in eval mode; its first 64 test points)."""
    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = build_model("cnn3", 1, 10, train.info.mean, train.info.std, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = train.images.float() / 255, train.labels
    for _ in range(5):
        for i in range(0, len(y), 64):
            loss = F.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval(), test.images[:64].float() / 255, test.labels[:64]


def _fgsm(model, x, y, eps, norm):
    spec = parse_attack("fgsm")
    return spec.family.attack(model, x, y, spec.settings, eps, norm, None, {})


@pytest.mark.parametrize("norm,eps", [("Linf", EPS), ("L2", 0.5)])
def test_fgsm_stays_in_the_ball_and_box_and_restores_the_model(trained, norm, eps):
    model, x, y = trained
    model.train()
    x_adv = _fgsm(model, x, y, eps, norm)
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1 and not x_adv.requires_grad
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).sum() < (model(x).argmax(1) == y).sum()  # it hurts


def test_fgsm_agrees_with_torchattacks(trained):
    """One signed step of size eps from x, clipped: the same points as torchattacks.FGSM, to float rounding
    (we clip the perturbation, x + ((x + d).clamp(0, 1) - x), it clips x + d)."""
    model, x, y = trained
    ours = _fgsm(model, x, y, EPS, "Linf")
    ref = torchattacks.FGSM(model, eps=EPS)(x, y)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert torch.equal(model(ours).argmax(1), model(ref).argmax(1))


@pytest.fixture
def copied_fgsm():
    """fgsm.py copied under a fresh module and attack name (``name = "fgsm"`` rewritten, nothing else);
    removed with its registration afterwards."""
    package = Path(registry.__file__).parent
    name = f"fgsm_copy_{uuid.uuid4().hex[:8]}"
    path = package / f"{name}.py"
    source = (package / "fgsm.py").read_text()
    assert source.count('name = "fgsm"') == 1
    path.write_text(source.replace('name = "fgsm"', f'name = "{name}"'))
    importlib.invalidate_caches()
    try:
        yield name
    finally:
        path.unlink(missing_ok=True)
        EVAL_ATTACKS.pop(name, None)
        sys.modules.pop(f"dist_robust.attacks.{name}", None)


def test_a_copied_attack_file_is_evaluable_with_no_other_edit(trained, copied_fgsm):
    model, x, y = trained
    x, y = x[:24], y[:24]
    original = evaluate_model(model, (x, y), ["clean", "fgsm"], eps=EPS, batch_size=10, progress=False)
    copy = evaluate_model(model, (x, y), ["clean", copied_fgsm], eps=EPS, batch_size=10, progress=False)
    untimed = lambda d: {k: v for k, v in d.items() if k != "time_s"}  # noqa: E731
    assert copy["n"] == original["n"] == 24 and untimed(copy["clean"]) == untimed(original["clean"])
    assert untimed(copy["attacks"][copied_fgsm]) == untimed(original["attacks"]["fgsm"])
    assert original["attacks"]["fgsm"]["correct"] < original["clean"]["correct"]
    with pytest.raises(ValueError, match=copied_fgsm):  # the known list comes from the registry
        parse_attack("nonesuch")


def test_names_are_parsed_by_their_families():
    got = {n: (parse_attack(n).family.name, parse_attack(n).shape, parse_attack(n).settings)
           for n in ("pgd-20", "cw-5", "fgsm", "aa", "aa-plus", "aa-rand")}
    assert got == {"pgd-20": ("pgd", "batch", {"steps": 20}), "cw-5": ("cw", "batch", {"steps": 5}),
                   "fgsm": ("fgsm", "batch", {}), "aa": ("aa", "whole", {"version": "standard"}),
                   "aa-plus": ("aa", "whole", {"version": "plus"}), "aa-rand": ("aa", "whole", {"version": "rand"})}
    assert parse_attack("clean").shape == "clean"
    for bad in ("pgd-0", "pgd", "pgd-2a", "cw-", "aa-x", "fgsm-1", "fgsm2"):
        with pytest.raises(ValueError, match=r"unknown attack \(known: clean, ") as e:
            parse_attack(bad)
        assert all(g in str(e.value) for g in ("pgd-K", "cw-K", "fgsm", "aa, aa-plus, aa-rand"))


def test_two_files_may_not_register_one_name():
    class Other(registry.EvalAttack):
        name, grammar = "fgsm", "fgsm (another)"
    registry.families()
    with pytest.raises(ValueError, match="registered by dist_robust.attacks.fgsm and"):
        registry.register(Other())
