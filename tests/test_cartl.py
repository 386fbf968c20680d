"""CARTL: the cut-point hook, the FDM loss against a hand computation, and non-expansive fine-tuning
(spectral bound, frozen part untouched, plain export)."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import run_ranks, save_shard_gradients
from dist_robust import config
from dist_robust.data import load_dataset
from dist_robust.methods import cartl
from dist_robust.methods.cartl import (
    CARTLFeatureDistance,
    CARTLFineTune,
    CutFeatureHook,
    apply_spectral_norm,
    remove_spectral_norm,
)
from dist_robust.models import build_model
from dist_robust.models.partial import configure_finetuning


@functools.lru_cache(maxsize=1)
def _digits():
    return load_dataset("digits", "train")


def _batch(n: int = 32, start: int = 0):
    ds = _digits()
    return ds.images[start:start + n].float() / 255, ds.labels[start:start + n]


def _model(seed: int = 0):
    torch.manual_seed(seed)
    info = _digits().info
    return build_model("cnn3", 1, 10, info.mean, info.std, width=4)


def _cfg(method: str = "cartl"):
    return config.load_config(None, [f"method.name={method}", "attack.eps=0.1", "attack.steps=2"])


def _partial(model, x, upto: str):
    """The manual forward up to (not including) the block ``upto``: normalize, then the blocks before it."""
    h = model.normalize(x)
    for name, block in model.features.named_children():
        if f"features.{name}" == upto:
            return h
        h = block(h)
    raise AssertionError(upto)


# ---------------------------------------------------------------- the hook

@pytest.mark.parametrize("last_k,block", [(1, "features.stage3"), (2, "features.stage2")])
def test_hook_captures_the_cut_block_input_in_training_mode_only(last_k, block):
    model = _model().train()
    x, _ = _batch(16)
    cut_block = model.get_submodule(block)
    with CutFeatureHook(model, last_k) as hook:
        assert hook.block_name == block
        model(x)
        assert len(hook.features) == 1 and hook.features[0].requires_grad  # the penalty trains through it
        assert torch.equal(hook.features[0], _partial(model, x, block))
        hook.clear()
        model.eval()
        model(x)
        assert hook.features == []  # eval forwards (attacks) are not recorded
    assert len(cut_block._forward_pre_hooks) == 0  # removed on exit
    with pytest.raises(ValueError, match="last_k=4"):
        CutFeatureHook(model, 4)


# ---------------------------------------------------------------- stage 1: FDM

def test_fdm_loss_matches_the_hand_computation(monkeypatch):
    model = _model().train()
    x, y = _batch(8)
    torch.manual_seed(1)
    x_adv = (x + 0.1 * torch.randn_like(x).sign()).clamp(0, 1)
    seen = {}

    def fake_pgd(m, xx, yy, eps, steps, **kw):  # a fixed adversary, and a check of what it is given
        seen.update(eps=eps, steps=steps, loss=kw["loss"])
        return x_adv

    monkeypatch.setattr(cartl, "pgd", fake_pgd)
    lam = 0.5
    method = CARTLFeatureDistance(_cfg(), lam=lam, last_k=1)
    loss, metrics = method.loss(model, x, y)
    assert seen == dict(eps=0.1, steps=2, loss="ce")

    # By hand: train-mode BN normalises with batch statistics, so these forwards see what the loss saw.
    adv_logits = model(x_adv)
    r_adv = _partial(model, x_adv, "features.stage3").double()
    r_clean = _partial(model, x, "features.stage3").double()
    d = r_adv[0].numel()
    assert d == 8 * 7 * 7  # 2w channels at 28 / 4
    dists = [math.sqrt(((r_adv[i] - r_clean[i]) ** 2).sum().item()) / math.sqrt(d) for i in range(len(x))]
    expected = F.cross_entropy(adv_logits, y).item() + lam * sum(dists)  # a sum over the batch, not a mean
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["n"].item() == 8
    assert metrics["feature_dist_sum"].item() == pytest.approx(sum(dists), rel=1e-5)
    assert metrics["correct"].item() == (adv_logits.argmax(1) == y).sum().item()
    assert metrics["loss_sum"].item() == pytest.approx(8 * expected, rel=1e-5)

    # The clean forward enters only through the features, which lie below the head: the head's
    # gradient is that of the adversarial CE alone (no clean CE hidden in the loss).
    head = model.head.weight
    got = torch.autograd.grad(method.loss(model, x, y)[0], head)[0]
    want = torch.autograd.grad(F.cross_entropy(model(x_adv), y), head)[0]
    assert torch.allclose(got, want, atol=1e-6)
    zero = CARTLFeatureDistance(_cfg(), lam=0.0, last_k=1).loss(model, x, y)[0]
    assert zero.item() == pytest.approx(F.cross_entropy(model(x_adv), y).item(), rel=1e-6)


def test_fdm_with_the_real_attack_sees_two_forwards_and_trains_every_parameter():
    model = _model().train()
    x, y = _batch(16)
    method = CARTLFeatureDistance(_cfg(), last_k=2)  # lambda from the config (method.cartl_lambda)
    assert method.lam == 0.01
    method.prepare(model)
    loss, metrics = method.loss(model, x, y)  # raises unless the hook saw exactly the two train forwards
    loss.backward()
    assert torch.isfinite(loss) and metrics["feature_dist_sum"].item() > 0
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(RuntimeError, match="training mode"):
        method.loss(model.eval(), x, y)


class _FixedAdversary(CARTLFeatureDistance):
    """A deterministic, per-sample adversary (a sign pattern of x itself): the world-size test compares
    gradients, not attacks."""

    def adversary(self, model, x, y):
        return (x + 0.1 * torch.sin(97 * x).sign()).clamp(0, 1)


def _fdm_setup():
    """A model whose forward treats every sample alone (BN on its running statistics: a rank's half batch
    would otherwise normalise differently from the whole one), a batch of 16, and a heavy lambda."""
    torch.manual_seed(0)
    model = configure_finetuning(build_model("cnn3", 1, 10, [0.5], [0.5], width=4), tuned_bn="freeze_stats")
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 1, 12, 12, generator=g), torch.randint(0, 10, (16,), generator=g)
    return model.train(), x, y, _FixedAdversary(_cfg(), lam=0.5, last_k=1)


def _fdm_grad_worker(rank, world, out_dir):
    save_shard_gradients(*_fdm_setup(), rank, world, out_dir)


@pytest.mark.multiproc
def test_fdm_gradient_is_the_same_on_two_ranks_as_on_one_at_the_same_global_batch(tmp_path):
    """The penalty is a sum over the global batch (the authors' single-GPU batch): 2 ranks x 8 give the
    gradient of 1 rank x 16, not one with half the feature-distance weight."""
    run_ranks(_fdm_grad_worker, 2, str(tmp_path))
    two = torch.load(tmp_path / "grads.pt")
    model, x, y, method = _fdm_setup()
    method.loss(model, x, y)[0].backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(two[name], p.grad, rtol=0, atol=1e-6, msg=name)
    # and the test can tell: the per-rank sum alone (half the weight) would give another gradient
    model.zero_grad()
    method.lam /= 2
    method.loss(model, x, y)[0].backward()
    assert max((two[n] - p.grad).abs().max().item() for n, p in model.named_parameters()) > 1e-3


# ---------------------------------------------------------------- stage 2: non-expansive fine-tuning

def _finetune(model, method, steps=3, start=0):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                          weight_decay=5e-4)
    for i in range(steps):
        model.train()  # the engine calls train() every epoch: the frozen BN must survive it
        x, y = _batch(32, start + 32 * i)
        loss, _ = method.loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _sn_modules(model):
    return {n: m for n, m in model.named_modules() if cartl._has_spectral_norm(m)}


@pytest.mark.parametrize("beta", [1.0, 0.4])
def test_spectral_norm_bounds_every_tuned_layer_by_beta(beta):
    method = CARTLFineTune(_cfg("cartl_ft"), beta=beta, last_k=2)
    model = _finetune(method.prepare(_model()), method)
    assert set(_sn_modules(model)) == {"features.stage2.0", "features.stage3.0", "head"}
    with torch.no_grad():  # training forwards: one power iteration each, on the now-fixed weights
        x, _ = _batch(8)
        for _ in range(30):
            model(x)
    model.eval()
    for name, m in _sn_modules(model).items():
        w = m.weight.detach()  # eval mode: the effective weight the model computes with
        sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2).item()
        assert sigma <= beta * (1 + 1e-3), name
        assert sigma >= beta * 0.99, name  # and the scale is really beta, not 1


def test_finetuning_leaves_the_frozen_part_bitwise_unchanged():
    method = CARTLFineTune(_cfg("cartl_ft"), beta=0.5, last_k=1)
    model = method.prepare(_model())
    with torch.no_grad():  # give the frozen BN non-trivial statistics to keep
        for bn in (model.features.stage1[1], model.features.stage2[1]):
            bn.running_mean.uniform_(-0.5, 0.5)
    frozen = ("normalize.", "features.stage1.", "features.stage2.")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _finetune(model, method, steps=4)
    after = model.state_dict()
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith(frozen))
    for k in before:
        if k.startswith(frozen):
            assert torch.equal(before[k], after[k]), k
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "features.stage3.0.parametrizations.weight.original" in changed
    assert "features.stage3.1.running_mean" in changed  # tuned BN trains (model.tuned_bn auto = train)
    assert "head.parametrizations.weight.original" in changed


def test_export_is_a_plain_model_with_the_same_outputs():
    method = CARTLFineTune(_cfg("cartl_ft"), beta=0.7, last_k=2)
    model = _finetune(method.prepare(_model()), method, steps=2)
    model.train()  # export must not run another power iteration, whatever the mode
    exported = method.export(model)
    plain = _model(seed=5)
    assert list(exported.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(exported.state_dict(), strict=True)
    assert _sn_modules(model) and not _sn_modules(exported)  # a copy: the training model keeps SN
    x, _ = _batch(16, 200)
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # in place, and the weights stay parameters whatever the grad mode
        assert remove_spectral_norm(model) is model and not _sn_modules(model)
    assert isinstance(model.head.weight, torch.nn.Parameter) and model.head.weight.requires_grad
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-5, rtol=1e-5)


def test_misuse_fails_loudly():
    model = _model()
    apply_spectral_norm(model, 1, 0.5)
    with pytest.raises(ValueError, match="already has spectral norm"):
        apply_spectral_norm(model, 1, 0.5)
    with pytest.raises(ValueError, match="beta"):
        apply_spectral_norm(_model(), 1, 0.0)
    with pytest.raises(ValueError, match="dual"):
        CARTLFineTune(_cfg("cartl_ft"), tuned_bn="dual")
    with pytest.raises(ValueError, match="last_k=4"):
        CARTLFineTune(_cfg("cartl_ft"), last_k=4).prepare(_model())


def test_resnet_family_k_counts_the_final_bn_and_the_head_as_cartl():
    """PreAct ResNet-18's blocks: 8 units, the final BN-ReLU, the head. k = 2 tunes the BN and the head
    (the head spectrally normalised once, though it is both a block and the head); k = 3 adds the last unit."""
    torch.manual_seed(0)
    assert apply_spectral_norm(build_model("preact_resnet18", 3, 10, [0.5] * 3, [0.25] * 3), 2, 0.5) == ["head"]
    model = build_model("preact_resnet18", 3, 10, [0.5] * 3, [0.25] * 3)
    assert apply_spectral_norm(model, 3, 0.5) == ["features.layer4.1.conv1", "features.layer4.1.conv2", "head"]
    assert cartl.cut_block_name(model, 3) == "features.layer4.1"
    assert cartl.cut_block_name(model, 1) == "head"  # k = 1: the cut at the head's input


# ---------------------------------------------------------------- DDP (2 gloo ranks on CPU)

def _ddp_steps(rank, world):
    torch.manual_seed(0)  # the same initial model on both ranks, as DDP requires
    model = build_model("cnn3", 1, 10, [0.5], [0.5], width=4)
    # Random 12x12 images, each rank its own (no dataset load: spawned ranks should start fast).
    data = torch.rand(2, world, 8, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (2, world, 8), generator=torch.Generator().manual_seed(2))
    cfgs = [config.load_config(None, [f"method.name={m}", "attack.eps=0.1", "attack.steps=1"]) for m in ("cartl", "cartl_ft")]
    for method in (CARTLFeatureDistance(cfgs[0], last_k=1), CARTLFineTune(cfgs[1], beta=0.5, last_k=1)):
        model = method.prepare(model)
        train_model = DDP(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        torch.manual_seed(rank)  # each rank its own attack noise
        for step in range(2):
            model.train()
            x, y = data[step, rank], labels[step, rank]
            loss, _ = method.loss(train_model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        # Gradients were averaged and u/v broadcast from rank 0: every rank holds the same weights and
        # power-iteration vectors (BN running statistics differ: each rank saw its own last batch).
        for k, v in model.state_dict().items():
            if "running" in k or "num_batches" in k:
                continue
            gathered = [torch.empty_like(v) for _ in range(world)]
            dist.all_gather(gathered, v.contiguous())
            assert torch.equal(gathered[0], gathered[1]), k
        model = method.export(model)


@pytest.mark.multiproc
def test_both_stages_under_ddp_keep_ranks_in_sync():
    run_ranks(_ddp_steps, 2)


def test_cartl_recipe_runs_both_stages_and_exports_a_plain_model(tmp_path, tiny):
    """Stage 1 (FDM) then stage 2 (spectrally normalised last block) through `dist-robust train`: the
    frozen stages leave stage 2 bitwise as stage 1 made them, the export is a plain model."""
    import yaml
    from safetensors.torch import load_file

    from dist_robust.cli import main
    from dist_robust.models import model_from_state
    recipe = tmp_path / "cartl.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"last_k": 1}, "stages": [
        {"name": "source", "method": {"name": "cartl"}},
        {"name": "transfer", "model": {"init_from": "previous"}, "method": {"name": "cartl_ft", "sn_beta": 0.5}}]}))
    overrides = [o for o in tiny if not o.startswith("method.")] + [f"run.out_dir={tmp_path}", "run.name=c"]
    assert main(["train", str(recipe), *overrides]) == 0
    source = load_file(tmp_path / "c" / "source" / "model.safetensors")
    transfer = load_file(tmp_path / "c" / "transfer" / "model.safetensors")
    assert transfer.keys() == source.keys()  # no parametrisation keys left
    frozen = [k for k in source if k.startswith(("features.stage1.", "features.stage2.", "normalize."))]
    assert frozen and all(torch.equal(source[k], transfer[k]) for k in frozen)
    assert not torch.equal(source["features.stage3.0.weight"], transfer["features.stage3.0.weight"])
    w = transfer["features.stage3.0.weight"]
    assert torch.linalg.matrix_norm(w.reshape(len(w), -1), ord=2) <= 0.5 * 1.05  # beta, up to power-iteration lag
    model_from_state("cnn3", transfer)
