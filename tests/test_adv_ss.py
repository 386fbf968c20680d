"""Adv-SS: pretext views and labels against their definitions, the jigsaw table saved with the model,
the log-det penalty against a hand computation and finite differences, the joint attack's box, the
ensemble under 2-rank DDP, and a pretext -> adversarial fine-tuning recipe end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import run_ranks
from dist_robust import config
from dist_robust.methods import build_method
from dist_robust.methods.adv_ss.attack import joint_attack, logdet_penalty, task_gradients, task_loss
from dist_robust.methods.adv_ss.networks import JigsawHead, PretextNet, pretext_model_from_state
from dist_robust.methods.adv_ss.pretext import (
    JIGSAW_FORCE_IDENTITY,
    from_tiles,
    jigsaw,
    jigsaw_permutations,
    rotate,
    selfie_positions,
    to_tiles,
)
from dist_robust.models import build_model, load_backbone

SMALL = ["eval.at_end=false", "attack.eps=0.1", "attack.steps=2", "method.jigsaw_grid=2", "method.jigsaw_perms=5"]


def _cfg(method: str, *extra: str):
    return config.load_config(None, [f"method.name={method}", *SMALL, *extra])


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("cnn3", 1, 10, [0.5], [0.5], width=4)


# ---------------------------------------------------------------- views and labels

def test_rotation_labels_undo_the_rotation_and_are_balanced():
    x = torch.rand(10, 2, 6, 6)
    view, labels = rotate(x, torch.Generator().manual_seed(0))
    for i in range(len(x)):
        assert torch.equal(torch.rot90(view[i], -int(labels[i]), dims=(1, 2)), x[i])
    assert sorted(torch.bincount(labels, minlength=4).tolist()) == [2, 2, 3, 3]  # near-balanced (this seed)
    assert torch.equal(view[labels == 1][0], torch.rot90(x[labels == 1][0], 1, (1, 2)))  # 90 degrees counter-clockwise
    with pytest.raises(ValueError, match="square"):
        rotate(torch.rand(2, 1, 4, 6))


def test_tiles_are_row_major_and_round_trip():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    tiles = to_tiles(x, 2)
    assert tiles.shape == (1, 4, 1, 2, 2)
    assert tiles[0, 1, 0].tolist() == [[2, 3], [6, 7]]  # tile 1: row 0, column 1
    assert torch.equal(from_tiles(tiles, 2), x)
    with pytest.raises(ValueError, match="must divide"):
        to_tiles(x, 3)


def test_jigsaw_labels_unshuffle_to_the_original():
    table = jigsaw_permutations(3, 6, seed=1)
    assert table.shape == (7, 9) and table[0].tolist() == list(range(9))
    assert len({tuple(r) for r in table.tolist()}) == 7  # distinct rows, none the identity but row 0
    x = torch.rand(40, 1, 9, 9)
    view, labels = jigsaw(x, table, torch.Generator().manual_seed(0))
    assert not torch.equal(view, x)
    for i in range(len(x)):
        inverse = torch.argsort(table[labels[i]])  # position j holds tile table[c, j]: tile k sits at inverse[k]
        assert torch.equal(from_tiles(to_tiles(view[i:i + 1], 3)[:, inverse], 3)[0], x[i])
    # the identity is forced with probability 0.1 on top of its uniform share (the authors' bias = 0.9)
    _, many = jigsaw(torch.rand(4000, 1, 3, 3), table, torch.Generator().manual_seed(1))
    expected = JIGSAW_FORCE_IDENTITY + (1 - JIGSAW_FORCE_IDENTITY) / len(table)
    assert abs((many == 0).float().mean().item() - expected) < 0.03


def test_jigsaw_table_is_seeded_and_travels_with_the_model(tmp_path):
    from safetensors.torch import load_file, save_file
    assert torch.equal(jigsaw_permutations(2, 5, seed=0), jigsaw_permutations(2, 5, seed=0))
    assert not torch.equal(jigsaw_permutations(2, 5, seed=0), jigsaw_permutations(2, 5, seed=1))
    cfg = _cfg("adv_jigsaw", "method.jigsaw_seed=7")
    method = build_method(cfg)
    net = method.prepare(_model())
    assert torch.equal(net.heads["jigsaw"].permutations, jigsaw_permutations(2, 5, seed=7))
    # resume: the engine rebuilds the prepared model and loads a checkpoint of it strictly
    again = method.prepare(_model(seed=3))
    again.load_state_dict(net.state_dict(), strict=True)
    exported = method.export(net)
    assert isinstance(exported.head, JigsawHead)
    save_file(exported.state_dict(), tmp_path / "model.safetensors")
    state = load_file(tmp_path / "model.safetensors")
    assert torch.equal(state["head.permutations"], jigsaw_permutations(2, 5, seed=7))
    reloaded = pretext_model_from_state("cnn3", state, width=4).eval()
    x = torch.rand(6, 1, 16, 16)
    view, labels = jigsaw(x, reloaded.head.permutations, torch.Generator().manual_seed(0))
    net.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(view), net({"jigsaw": view})["jigsaw"], atol=1e-6)
    fresh = _model(seed=5)
    load_backbone(fresh, state)  # fine-tuning takes the backbone and keeps its own 10-way head
    assert fresh.head.out_features == 10


# ---------------------------------------------------------------- losses and the penalty

def test_selfie_loss_sums_positions_and_the_faithful_mode_applies_softmax_twice():
    scores = torch.randn(3, 4, 4)
    target = torch.arange(4)
    plain = sum(F.cross_entropy(scores[:, i], target[i].repeat(3), reduction="none") for i in range(4))
    faithful = sum(F.cross_entropy(scores[:, i].softmax(-1), target[i].repeat(3), reduction="none") for i in range(4))
    assert torch.allclose(task_loss("selfie", scores, None), plain)
    assert torch.allclose(task_loss("selfie", scores, None, faithful=True), faithful)
    assert selfie_positions(4, torch.Generator().manual_seed(0)).sort().values.tolist() == list(range(16))


def test_selfie_scores_follow_the_target_positions():
    """Row i of the scores is target position i's query against every target patch: swapping two
    targets swaps those rows and columns; the context's order does not matter (no position there)."""
    method = build_method(_cfg("adv_selfie"))
    model = _model()
    net = method.prepare(model).eval()
    assert not net.head.weight.requires_grad and net.head is model.head  # kept for the export only
    x = torch.rand(2, 1, 16, 16)
    pos = selfie_positions(4, torch.Generator().manual_seed(0))
    swapped = pos.clone()
    swapped[[0, 1]] = pos[[1, 0]]
    shuffled = torch.cat([pos[:4], pos[4:].flip(0)])
    with torch.no_grad():
        scores = net({"selfie": x}, pos)["selfie"]
        assert scores.shape == (2, 4, 4)
        assert torch.allclose(net({"selfie": x}, swapped)["selfie"], scores[:, [1, 0, 2, 3]][:, :, [1, 0, 2, 3]],
                              atol=1e-5)
        assert torch.allclose(net({"selfie": x}, shuffled)["selfie"], scores, atol=1e-5)
        net.selfie.scale = 1.0  # the faithful mode's raw dot products
        d = net.selfie.u0.shape[-1]
        assert d == 16  # the single task encodes patches with the whole backbone (4 x width 4)
        assert torch.allclose(net({"selfie": x}, pos)["selfie"], scores * d ** 0.5, atol=1e-4)
    exported = method.export(net)
    assert exported.head.out_features == 10 and exported.head.weight.requires_grad
    assert net.selfie.scale == 1.0 and build_method(_cfg("adv_selfie", "method.selfie_faithful=true")).prepare(
        _model()).selfie.scale == 1.0


def test_logdet_penalty_matches_a_hand_computation():
    g = [torch.randn(2, 1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    expected = []
    for b in range(2):
        cols = [gi[b].flatten().numpy() for gi in g]
        G = np.stack([c / (np.linalg.norm(c) + 1e-10) for c in cols], 1)  # [6, 3]
        expected.append(np.log(np.linalg.det(G.T @ G + 1e-5 * np.eye(3))))
    assert logdet_penalty(g).item() == pytest.approx(np.mean(expected), rel=1e-10)
    same = [g[0], g[0] * 2, g[1]]  # two parallel gradients: the Gram matrix is (nearly) singular
    assert logdet_penalty(same).item() < logdet_penalty(g).item() - 5
    assert logdet_penalty([t.float() for t in g]).dtype == torch.float32


def _ensemble_net(dtype=torch.float32, seed=0):
    cfg = _cfg("adv_ss_ensemble")
    net = build_method(cfg).prepare(_model(seed)).to(dtype)
    return cfg, net


def test_penalty_gradient_matches_finite_differences():
    _, net = _ensemble_net(torch.float64)
    net.eval()  # deterministic: BN on running statistics, no dropout
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64, generator=gen)
    views, labels, positions = net.views(x, gen)

    def h(vs):
        vs = {t: v.detach().requires_grad_(True) for t, v in vs.items()}
        _, _, grads = task_gradients(net, vs, labels, positions)
        return logdet_penalty(list(grads.values())), vs

    value, leaves = h(views)
    analytic = torch.autograd.grad(value, list(leaves.values()))
    direction = {t: torch.randn(v.shape, dtype=torch.float64, generator=gen) for t, v in views.items()}
    step = 1e-6
    plus = h({t: views[t] + step * direction[t] for t in views})[0].item()
    minus = h({t: views[t] - step * direction[t] for t in views})[0].item()
    numeric = (plus - minus) / (2 * step)
    predicted = sum((g * direction[t]).sum().item() for g, t in zip(analytic, views))
    assert abs(predicted) > 1e-4  # the check is not vacuous
    assert predicted == pytest.approx(numeric, rel=1e-4, abs=1e-7)


def test_joint_attack_stays_in_the_ball_and_the_box_and_restores_the_model():
    cfg, net = _ensemble_net()
    net.train()
    views, labels, positions = net.views(torch.rand(8, 1, 16, 16))
    flags = [p.requires_grad for p in net.parameters()]
    adv = joint_attack(net, views, labels, positions, 0.1, 3, lam=0.1, bn_mode="train")
    for t in views:
        assert (adv[t] - views[t]).abs().max() <= 0.1 + 1e-6
        assert adv[t].min() >= 0 and adv[t].max() <= 1
        assert not torch.equal(adv[t], views[t])
    assert net.training and [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())


def test_ensemble_loss_trains_every_parameter_and_exports_the_chosen_branch():
    cfg, net = _ensemble_net()
    method = build_method(cfg)
    net.train()
    loss, metrics = method.loss(net, torch.rand(8, 1, 16, 16), None)
    loss.backward()
    assert torch.isfinite(loss) and "penalty_sum" in metrics and metrics["n"].item() == 8
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert set(net.heads) == {"rotation", "jigsaw"} and hasattr(net, "selfie")
    exported = method.export(net).eval()
    plain = _model(seed=9)
    assert [k for k in exported.state_dict() if not k.startswith("head.")] == \
        [k for k in plain.state_dict() if not k.startswith("head.")]
    assert exported.head.out_features == 4  # the rotation branch (method.ensemble_export)
    net.eval()
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(exported(x), net({"rotation": x})["rotation"], atol=1e-6)
        jig = PretextNet.export(net, "jigsaw")
        assert torch.allclose(jig(x), net({"jigsaw": x})["jigsaw"], atol=1e-6)
        assert not torch.allclose(jig.features(x), exported.features(x))  # the branches have their own blocks


# ---------------------------------------------------------------- DDP (2 gloo ranks on CPU)

def _ddp_steps(rank, world):
    data = torch.rand(2, world, 8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    for name, head in (("adv_ss_ensemble", "heads.rotation.weight"), ("adv_selfie", "selfie.u0")):
        method = build_method(_cfg(name, "attack.steps=1", "attack.bn_mode=train"))
        model = method.prepare(_model())  # the same initial weights on every rank
        train_model = DDP(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        torch.manual_seed(100 + rank)  # each rank its own views and attack noise
        start = {k: v.clone() for k, v in model.state_dict().items()}
        for step in range(2):
            model.train()
            loss, _ = method.loss(train_model, data[step, rank], None)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for k, v in model.state_dict().items():
            if "running" in k or "num_batches" in k:  # each rank's BN saw its own batches
                continue
            gathered = [torch.empty_like(v) for _ in range(world)]
            dist.all_gather(gathered, v.contiguous())
            assert torch.equal(gathered[0], gathered[1]), (name, k)
        assert not torch.equal(start[head], model.state_dict()[head]), name


@pytest.mark.multiproc
def test_ensemble_and_selfie_under_ddp_keep_ranks_in_sync():
    """Only the clean forward goes through DDP; the gradients of the adversarial forward and of the
    penalty (double backward) are averaged by the same backward. Selfie-only: its frozen head is
    outside DDP's reducer."""
    run_ranks(_ddp_steps, 2)


# ---------------------------------------------------------------- config and recipe

@pytest.mark.parametrize("overrides, match", [
    (["method.name=adv_rotation"], "eval.at_end=True"),
    (["method.name=adv_jigsaw", "eval.at_end=false", "method.jigsaw_grid=3"], "must divide"),
    (["method.name=adv_ss_ensemble", "eval.at_end=false", "method.ensemble_tasks=[rotation]"], "two or three distinct"),
    (["method.name=adv_ss_ensemble", "eval.at_end=false", "method.ensemble_export=selfie"], "rotation or jigsaw"),
    (["method.name=adv_ss_ensemble", "eval.at_end=false", "attack.restarts=2"], "one start"),
    (["method.name=adv_jigsaw", "eval.at_end=false", "method.jigsaw_grid=2", "method.jigsaw_perms=24"],
     "jigsaw_perms=24"),
])
def test_bad_adv_ss_settings_are_one_line_errors(overrides, match):
    with pytest.raises(config.ConfigError, match=match) as e:
        config.load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_pretext_then_adversarial_finetuning_recipe(tmp_path, tiny):
    """Adversarial rotation pre-training on digits, then PGD-AT fine-tuning from it (new head)."""
    import yaml
    from safetensors.torch import load_file

    from dist_robust.cli import main
    recipe = tmp_path / "adv_ss.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [
        {"name": "pretext", "method": {"name": "adv_rotation"}, "eval": {"at_end": False}},
        {"name": "finetune", "model": {"init_from": "previous"}, "method": {"name": "pgd_at"}}]}))
    overrides = [o for o in tiny if not o.startswith("method.")] + ["data.subset=256", f"run.out_dir={tmp_path}",
                                                                    "run.name=a"]
    assert main(["train", str(recipe), *overrides]) == 0
    folder = tmp_path / "a"
    pretext = load_file(folder / "pretext" / "model.safetensors")
    tuned = load_file(folder / "finetune" / "model.safetensors")
    assert pretext["head.weight"].shape[0] == 4 and tuned["head.weight"].shape[0] == 10
    assert pretext.keys() == tuned.keys()  # a plain ImageClassifier: load_backbone took it as is
    assert not (folder / "pretext" / "results.json").exists() and (folder / "finetune" / "results.json").is_file()
    assert not torch.equal(pretext["features.stage1.0.weight"], tuned["features.stage1.0.weight"])
