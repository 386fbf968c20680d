"""Linear probing and partial fine-tuning: what trains, what stays, and BN policies that survive
``model.train()``; the ResNet family's blocks as CARTL counts them."""
import copy

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
    small = build_model("resnet_small", 1, 10, [0.5], [0.5])  # the small CNNs' blocks stay their stages
    assert block_names(small) == ["features.stem", "features.stage1", "features.stage2", "features.stage3"]
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


# ---------------------------------------------------------------- the ResNet family's blocks: CARTL's count

# What the official k unfreezes on WRN-34-10 (wutongshenqiu/TransferRobust, src/networks/utils.py,
# WRNBlocks.get_block): with n = 5 units per group, block num <= 3n is block{g}.layer[i], (g, i) =
# divmod(num + n - 1, n); block 3n + 1 = 16 is Sequential(bn1, relu), block 3n + 2 = 17 the fc; the last
# k are blocks 18 - k .. 17. As our parameter-name prefixes:
OFFICIAL_WRN34_10 = {
    4: ["features.block3.layer.3.", "features.block3.layer.4.", "features.bn1.", "head."],
    6: [f"features.block3.layer.{i}." for i in range(1, 5)] + ["features.bn1.", "head."],
    8: ["features.block2.layer.4."] + [f"features.block3.layer.{i}." for i in range(5)] + ["features.bn1.", "head."],
}


@pytest.fixture(scope="module")
def wrn():
    torch.manual_seed(0)
    return build_model("wrn34_10", 3, 10, [0.5] * 3, [0.25] * 3)


def test_wrn34_10_has_cartls_17_blocks(wrn):
    blocks = block_names(wrn)
    assert len(blocks) == 17 and blocks[:2] == ["features.block1.layer.0", "features.block1.layer.1"]
    assert blocks[-3:] == ["features.block3.layer.4", "features.bn1", "head"]
    assert tuned_module_names(wrn, "last_k", 1) == ["head"]  # the head is a block: listed once


@pytest.mark.parametrize("k", sorted(OFFICIAL_WRN34_10))
def test_last_k_unfreezes_what_cartls_k_unfreezes_on_wrn34_10(wrn, k):
    from dist_robust.methods.cartl import cut_block_name
    model = configure_finetuning(copy.deepcopy(wrn), trainable="last_k", last_k=k)
    prefixes = tuple(OFFICIAL_WRN34_10[k])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    frozen_bn = [m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                 and not (n + ".").startswith(prefixes)]
    assert frozen_bn and all(m.stats_frozen for m in frozen_bn)  # the frozen part keeps the source statistics
    assert cut_block_name(model, k) == prefixes[0][:-1]  # CARTL's hook: the input of the first tuned block


@pytest.mark.parametrize("name, count, last4", [
    # 8 basic blocks, the final BN-ReLU (a pre-activation net's, as WRN's block 3n + 1), the head; the
    # official post-activation ResNet-18 has no final BN: 8 + FC = 9 (Resnet18Block)
    ("preact_resnet18", 10, ["features.layer4.0", "features.layer4.1", "features.bn", "head"]),
    # 3 + 4 + 6 + 3 bottlenecks and the head (post-activation: no final BN)
    ("resnet50", 17, ["features.layer4.0", "features.layer4.1", "features.layer4.2", "head"]),
])
def test_resnet_family_counts_residual_units_the_final_bn_and_the_head(name, count, last4):
    model = build_model(name, 3, 10, [0.5] * 3, [0.25] * 3)
    blocks = block_names(model)
    assert len(blocks) == count and blocks[-4:] == last4
    model = configure_finetuning(model, trainable="last_k", last_k=4)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if n.startswith(tuple(b + "." for b in last4))}
