"""Linear probing and partial fine-tuning: what trains, what stays, and BN policies that survive
``model.train()``."""
import pytest
import torch

from dist_robust import config
from dist_robust.data import load_dataset
from dist_robust.methods import build_method
from dist_robust.models import block_names, build_model
from dist_robust.models.partial import configure_finetuning, tuned_module_names


def _model():
    torch.manual_seed(0)
    info = load_dataset("digits", "train").info
    return build_model("cnn3", 1, 10, info.mean, info.std)


def _train(model, method="standard", steps=3):
    cfg = config.load_config(None, [f"method.name={method}", "attack.eps=0.1", "attack.steps=1"])
    ds = load_dataset("digits", "train")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    m = build_method(cfg)
    for i in range(steps):
        model.train()  # the engine calls train() every epoch: policies must survive it
        x, y = ds.images[i * 32:(i + 1) * 32].float() / 255, ds.labels[i * 32:(i + 1) * 32]
        loss, _ = m.loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _changed(before, model):
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("method", ["standard", "pgd_at"])
def test_linear_probing_changes_only_the_head(method):
    model = configure_finetuning(_model(), trainable="head")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, method)
    assert _changed(before, model) == {"head.weight", "head.bias"}


def test_last_k_trains_the_last_blocks_and_freezes_the_rest_with_their_statistics():
    model = _model()
    assert tuned_module_names(model, "last_k", 1) == ["features.stage3", "head"]
    model = configure_finetuning(model, trainable="last_k", last_k=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model)
    changed = _changed(before, model)
    assert changed and all(k.startswith(("features.stage3.", "head.")) for k in changed)
    assert any(k.endswith("running_mean") for k in changed)  # the tuned part's BN still trains
    with pytest.raises(ValueError, match="last_k=4"):
        configure_finetuning(_model(), trainable="last_k", last_k=4)


def test_frozen_part_bn_policy_train_lets_statistics_drift_but_not_weights():
    model = configure_finetuning(_model(), trainable="last_k", last_k=1, frozen_bn="train")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model)
    changed = _changed(before, model)
    assert "features.stage1.1.running_mean" in changed
    assert not any(k.startswith("features.stage1.") and not k.endswith(("running_mean", "running_var",
                                                                          "num_batches_tracked")) for k in changed)


@pytest.mark.parametrize("policy", ["freeze_stats", "freeze_all"])
def test_tuned_bn_policies_survive_train_calls(policy):
    model = configure_finetuning(_model(), tuned_bn=policy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model)
    changed = _changed(before, model)
    assert not any("running" in k or "num_batches" in k for k in changed)
    bn_affine = {k for k in changed if k.startswith("features.stage") and k.endswith((".1.weight", ".1.bias"))}
    assert bool(bn_affine) == (policy == "freeze_stats")
    assert "features.stage1.0.weight" in changed  # convolutions train under both
