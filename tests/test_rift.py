"""RiFT: module robust criticality (ball, sign, world-size independence), interpolation, alpha
selection and the report files."""
import json
import os

import pytest
import torch

from conftest import run_ranks
from dist_robust.attacks import pgd
from dist_robust.data import load_dataset
from dist_robust.methods.rift.core import (
    critical_modules,
    interpolate_state,
    module_robust_criticality,
    project_relative,
    rank_modules,
    select_alpha,
    write_alpha_curve,
    write_mrc_table,
)
from dist_robust.models import build_model

N, EPS_W = 96, 0.1
MRC_ARGS = dict(eps_w=EPS_W, epochs=3, lr=1.0, batch_size=40)  # 40: batches of unequal size


@pytest.fixture(autouse=True)
def _one_thread():
    # One intra-op thread: these models are tiny, and on a busy machine a second thread mostly waits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed=0, train_steps=10):
    """A width-4 cnn3 briefly trained on clean digits (so its losses are not all log 10)."""
    ds = load_dataset("digits", "train")
    torch.manual_seed(seed)
    model = build_model("cnn3", 1, 10, ds.info.mean, ds.info.std, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = ds.images[:128].float() / 255, ds.labels[:128]
    model.train()
    for i in range(train_steps):
        sl = slice((i % 4) * 32, (i % 4 + 1) * 32)
        loss = torch.nn.functional.cross_entropy(model(x[sl]), y[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def _adv_set(model):
    ds = load_dataset("digits", "train")
    x, y = ds.images[200:200 + N].float() / 255, ds.labels[200:200 + N]
    torch.manual_seed(1)
    return pgd(model, x, y, eps=0.1, steps=2), y


def test_critical_modules_are_convs_and_linears_in_forward_order():
    assert critical_modules(_model(train_steps=0)) == [
        "features.stage1.0", "features.stage2.0", "features.stage3.0", "head"]


def test_project_relative_lands_in_the_ball_and_leaves_inside_points_alone():
    torch.manual_seed(0)
    w0 = torch.randn(8, 4, 3, 3)
    far = w0 + torch.randn_like(w0)
    p = project_relative(far, w0, 0.1)
    assert (p - w0).norm() <= 0.1 * w0.norm() * (1 + 1e-6)
    assert torch.allclose((p - w0) / (p - w0).norm(), (far - w0) / (far - w0).norm(), atol=1e-6)  # same direction
    near = w0 + 0.01 * w0.norm() / w0.numel() ** 0.5 * torch.randn_like(w0).sign()  # ||.|| = 0.01 ||w0||
    assert torch.equal(project_relative(near, w0, 0.1), near)
    assert torch.equal(project_relative(far, torch.zeros_like(w0), 0.1), torch.zeros_like(w0))


def test_mrc_is_nonnegative_stays_in_the_ball_and_leaves_the_model_alone():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_adv, y = _adv_set(model)
    table = module_robust_criticality(model, x_adv, y, **MRC_ARGS)
    assert list(table) == critical_modules(model)
    for name, e in table.items():
        assert e["mrc"] >= 0, name
        assert e["mrc"] == pytest.approx(e["loss"] - e["loss0"])
        assert e["acc_drop"] == pytest.approx(e["acc0"] - e["acc"])
        assert 0 < e["rel_dist"] <= EPS_W + 1e-6, name
        assert 0 <= e["epoch"] <= MRC_ARGS["epochs"]
    assert len({e["loss0"] for e in table.values()}) == 1  # one baseline
    # The ascent works somewhere (epoch 0 marks a module whose ascent overshot at this lr).
    assert any(e["mrc"] > 0 and e["epoch"] >= 1 for e in table.values())
    # The caller's model is untouched: weights, buffers, mode and flags.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    # A subset computes only what was asked, with the same values.
    sub = module_robust_criticality(model, x_adv, y, names=["head"], **MRC_ARGS)
    assert sub == {"head": table["head"]}
    with pytest.raises(ValueError, match="features.stage9"):
        module_robust_criticality(model, x_adv, y, names=["features.stage9"], **MRC_ARGS)


def test_mrc_losses_do_not_depend_on_batch_size():
    model = _model()
    x_adv, y = _adv_set(model)
    a = module_robust_criticality(model, x_adv, y, names=["head"], eps_w=EPS_W, epochs=1, lr=0.0, batch_size=40)
    b = module_robust_criticality(model, x_adv, y, names=["head"], eps_w=EPS_W, epochs=1, lr=0.0, batch_size=N)
    # lr=0: no ascent, so only the float64-accumulated full-set means are compared.
    assert a["head"]["loss0"] == pytest.approx(b["head"]["loss0"], abs=1e-6)
    assert a["head"]["mrc"] == pytest.approx(0.0, abs=1e-6)


def _tiny_cnn3(state):
    model = build_model("cnn3", 1, 10, [0.0], [1.0], width=4)  # mean/std come with the state
    model.load_state_dict(state)
    return model.eval()


def _mrc_worker(rank, world, case, out_dir):
    # The model and the adversarial set come from the parent: the ranks skip sklearn and the attack.
    c = torch.load(case)
    table = module_robust_criticality(_tiny_cnn3(c["state"]), c["x"], c["y"], **MRC_ARGS)
    with open(os.path.join(out_dir, f"mrc{rank}.json"), "w") as f:
        json.dump(table, f)


@pytest.mark.multiproc
def test_mrc_two_ranks_equal_one_rank(tmp_path):
    model = _model()
    x_adv, y = _adv_set(model)
    torch.save({"state": model.state_dict(), "x": x_adv, "y": y}, tmp_path / "case.pt")
    run_ranks(_mrc_worker, 2, str(tmp_path / "case.pt"), str(tmp_path))
    # The ranks run single-threaded, and so does this reference (the _one_thread fixture).
    ref = module_robust_criticality(_tiny_cnn3(model.state_dict()), x_adv, y, **MRC_ARGS)
    tables = [json.loads((tmp_path / f"mrc{r}.json").read_text()) for r in range(2)]
    assert tables[0] == tables[1]  # every rank returns the whole table
    assert list(tables[0]) == list(ref)
    for name in ref:
        for key, value in ref[name].items():
            assert tables[0][name][key] == pytest.approx(value, abs=1e-6), (name, key)


def test_interpolate_state_ends_reproduce_the_models_exactly():
    robust, tuned = _model(seed=0), _model(seed=1, train_steps=12)
    tuned.features.stage1[1].num_batches_tracked += 5  # make the integer entries differ
    x = load_dataset("digits", "test").images[:16].float() / 255
    rs, ts = robust.state_dict(), tuned.state_dict()
    for alpha, ref in ((0.0, robust), (1.0, tuned)):
        state = interpolate_state(rs, ts, alpha)
        assert all(torch.equal(state[k], v) for k, v in ref.state_dict().items())
        model = _model(seed=2, train_steps=0)
        model.load_state_dict(state)
        assert torch.equal(model.eval()(x), ref.eval()(x))
    mid = interpolate_state(rs, ts, 0.3)
    k = "features.stage1.1.running_mean"
    assert torch.allclose(mid[k], 0.3 * ts[k] + 0.7 * rs[k])
    assert torch.equal(mid["features.stage1.1.num_batches_tracked"], rs["features.stage1.1.num_batches_tracked"])
    assert torch.equal(interpolate_state(rs, ts, 0.5)["features.stage1.1.num_batches_tracked"],
                       ts["features.stage1.1.num_batches_tracked"])
    with pytest.raises(ValueError, match="different keys"):
        interpolate_state(rs, {k: v for k, v in ts.items() if k != "head.bias"}, 0.5)


CURVE = [
    {"alpha": 0.0, "clean": 0.80, "robust": 0.50},
    {"alpha": 0.2, "clean": 0.82, "robust": 0.51},
    {"alpha": 0.4, "clean": 0.84, "robust": 0.50},
    {"alpha": 0.6, "clean": 0.84, "robust": 0.50},  # ties alpha 0.4 on clean: the smaller alpha wins
    {"alpha": 0.8, "clean": 0.88, "robust": 0.48},  # best clean, but loses 2 points of robustness
    {"alpha": 1.0, "clean": 0.90, "robust": 0.30},
]


def test_select_alpha():
    assert select_alpha(CURVE) == 0.4
    assert select_alpha(CURVE, tau=0.02) == 0.8
    assert select_alpha(CURVE, tau=1.0) == 1.0
    assert select_alpha(list(reversed(CURVE))) == 0.4  # order of the list does not matter
    with pytest.raises(ValueError, match="alpha=0"):
        select_alpha(CURVE[1:])
    with pytest.raises(ValueError, match="repeated"):
        select_alpha(CURVE + [CURVE[1]])


def test_writers(tmp_path):
    table = {n: {"mrc": m, "loss": 1 + m, "loss0": 1.0, "acc": 0.5, "acc0": 0.6, "acc_drop": 0.1, "epoch": 2,
                 "rel_dist": 0.1} for n, m in [("a.conv", 0.3), ("b.conv", 0.1), ("head", 0.9)]}
    assert rank_modules(table) == ["b.conv", "a.conv", "head"]
    paths = write_mrc_table(table, tmp_path)
    paths += write_alpha_curve(CURVE, select_alpha(CURVE), tmp_path)
    assert {p.name for p in paths} == {"mrc.json", "mrc.md", "mrc.png", "alpha_curve.json", "alpha_curve.md",
                                       "alpha_curve.png"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert (tmp_path / "mrc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((tmp_path / "mrc.json").read_text())["modules"]
    assert [r["module"] for r in rows] == ["b.conv", "a.conv", "head"]
    md = (tmp_path / "mrc.md").read_text()
    assert md.index("b.conv") < md.index("a.conv") < md.index("head")
    assert json.loads((tmp_path / "alpha_curve.json").read_text())["chosen"] == 0.4
    assert "chosen" in (tmp_path / "alpha_curve.md").read_text()
