"""timm: and torchvision: networks (models/external.py): weights from local files only, their logits the
library network's, a pickle that would run code refused unrun, fine-tuning and evaluation through the
CLI, TWINS and sync BN on their BN layers, the tuned part, and one-line errors for bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from conftest import ENV, ROOT, TINY
from dist_robust import config
from dist_robust.cli import main
from dist_robust.data import load_dataset
from dist_robust.methods import build_method
from dist_robust.models import block_names, build_model, model_from_state
from dist_robust.models.dual_bn import bn_branch, dual_layers, export_plain
from dist_robust.models.external import load_external, normalize_stats, read_weights
from dist_robust.models.partial import configure_finetuning
from dist_robust.models.sync_bn import SyncBatchNorm2d, convert_sync_bn
from dist_robust.preflight import preflight
from dist_robust.utils import ConfigError

IMAGENET = normalize_stats("imagenet")


def _library_net(name, seed=0, **kw) -> nn.Module:
    """The library's network with BN statistics and affine maps that are not the initial ones (so that
    a layer loaded wrongly, or an activation lost, changes the logits)."""
    kind, arch = name.split(":")
    torch.manual_seed(seed)
    net = (timm.create_model(arch, pretrained=False, **kw) if kind == "timm"
           else torchvision.models.get_model(arch, weights=None, **kw))
    with torch.no_grad():
        for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.1)
            bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _save(net, path) -> str:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    else:
        torch.save(net.state_dict(), path)
    return str(path)


def _normalised(x, mean, std):
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


@pytest.mark.parametrize("name, suffix", [("timm:resnet18", ".safetensors"), ("timm:test_resnet", ".pth"),
                                          ("torchvision:resnet18", ".pt"), ("timm:test_efficientnet", ".safetensors")])
def test_weights_load_and_the_logits_are_the_library_networks(tmp_path, name, suffix):
    net = _library_net(name, num_classes=7)
    model = load_external(name, _save(net, tmp_path / f"w{suffix}"), "imagenet", 3)
    assert model.head.out_features == 7 and not model.training  # the weights' own head, eval-ready
    # timm's BatchNormAct2d (test_efficientnet) is split into a plain BN and its activation
    assert all(type(m) is nn.BatchNorm2d for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(_normalised(x, *IMAGENET)))
        again = model_from_state(name, model.state_dict()).eval()  # an exported model reloads by name alone
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_an_rgb_stem_loads_into_a_grey_timm_network_as_timm_adapts_it(tmp_path):
    net = _library_net("timm:test_resnet", num_classes=5)
    model = load_external("timm:test_resnet", _save(net, tmp_path / "w.safetensors"), {"mean": [0.4], "std": [0.2]}, 1)
    grey = torch.rand(3, 1, 28, 28)
    with torch.no_grad():  # a grey image is the RGB image with three equal channels
        torch.testing.assert_close(model(grey), net((grey.expand(-1, 3, -1, -1) - 0.4) / 0.2))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_in_one_line_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _RunsCode(marker)}, path)
    with pytest.raises(ValueError, match="refused") as e:
        read_weights(str(path))
    assert "\n" not in str(e.value) and "posix.system" in str(e.value)
    cfg = config.load_config(None, [*TINY, "model.name=timm:test_resnet", f"model.weights={path}",
                                    f"run.out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="model.weights=.*refused") as e:
        preflight([cfg])
    assert "\n" not in str(e.value)
    assert not marker.exists(), "the pickle's code ran"


@pytest.mark.multiproc  # the CLI in a subprocess
def test_fine_tuning_a_timm_network_trains_exports_and_evaluates_through_the_cli(tmp_path, capsys):
    weights = _save(_library_net("timm:test_resnet", num_classes=1000), tmp_path / "in1k.safetensors")
    args = ["train", "configs/quickstart.yaml", *TINY, "model.name=timm:test_resnet", f"model.weights={weights}",
            "data.subset=64", "eval.at_end=false", f"run.out_dir={tmp_path}", "run.name=ft"]  # one step
    assert main(args) == 0, capsys.readouterr().err
    run = tmp_path / "ft"
    assert (run / "model.json").is_file()
    r = subprocess.run([sys.executable, "-m", "dist_robust", "eval", "--checkpoint", str(run), "--dataset", "digits",
                        "--limit", "20", "--attacks", "clean", "--out", str(tmp_path / "eval.json")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 20


def _grey_efficientnet():
    """timm:test_efficientnet (BN fused with activations) on digits, with non-initial BN statistics."""
    info = load_dataset("digits", "train").info
    torch.manual_seed(0)
    model = build_model("timm:test_efficientnet", 1, 10, info.mean, info.std)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 2.0)
    return model


def test_twins_wings_and_sync_bn_convert_every_bn_layer_of_an_external_network():
    model = _grey_efficientnet()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn > 5 and sum(isinstance(m, SyncBatchNorm2d) for m in convert_sync_bn(_grey_efficientnet()).modules()) == n_bn
    tv = convert_sync_bn(build_model("torchvision:resnet18", 3, 10, [0.5] * 3, [0.25] * 3))
    assert all(type(m) is SyncBatchNorm2d for m in tv.modules() if isinstance(m, nn.BatchNorm2d))

    ds = load_dataset("digits", "train")
    x, y = ds.images[:64].float() / 255, ds.labels[:64]
    with torch.no_grad():
        before = model.eval()(x[:8])
    model = configure_finetuning(model, tuned_bn="dual")
    assert len(dual_layers(model)) == n_bn
    with torch.no_grad(), bn_branch(model.eval(), "frozen"):  # the wings keep each layer's activation
        torch.testing.assert_close(model(x[:8]), before)
    frozen0 = {n: b.clone() for n, b in model.named_buffers() if ".frozen.running" in n}
    cfg = config.load_config(None, ["data.name=digits", "model.name=timm:test_efficientnet", "method.name=twins_at",
                                    "attack.eps=0.1", "attack.steps=1"], training=False)
    method = build_method(cfg)
    model = method.prepare(model).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(2):
        loss, _ = method.loss(model, x[32 * step:32 * (step + 1)], y[32 * step:32 * (step + 1)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(b, frozen0[n]) for n, b in model.named_buffers() if n in frozen0)
    assert export_plain(model).state_dict().keys() == _grey_efficientnet().state_dict().keys()


def test_head_and_last_k_tune_the_head_and_the_last_stages():
    model = build_model("timm:test_resnet", 1, 10, [0.5], [0.25])
    assert block_names(model)[-2:] == ["features.layer3", "features.layer4"]
    tuned = {n for n, p in configure_finetuning(model, "last_k", 1).named_parameters() if p.requires_grad}
    assert tuned and all(n.startswith(("features.layer4.", "head.")) for n in tuned) and "head.weight" in tuned
    tuned = {n for n, p in configure_finetuning(model, "head").named_parameters() if p.requires_grad}
    assert tuned == {"head.weight", "head.bias"}


def _config_error(tmp_path, *overrides) -> str:
    with pytest.raises(ConfigError) as e:
        preflight([config.load_config(None, [*TINY, f"run.out_dir={tmp_path}", *overrides])])
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_input_is_one_line(tmp_path):
    assert "unknown model" in _config_error(tmp_path, "model.name=timm:no_such_net")
    assert "unknown model" in _config_error(tmp_path, "model.name=torchvision:no_such_net")
    assert "no such file" in _config_error(tmp_path, "model.name=timm:test_resnet", "model.weights=missing.pth")
    assert "must be .safetensors" in _config_error(tmp_path, "model.name=timm:test_resnet", "model.weights=w.bin")
    assert "model.init_from" in _config_error(tmp_path, "model.name=cnn3", "model.weights=w.pth")
    assert "3-channel images; digits has 1" in _config_error(tmp_path, "model.name=torchvision:resnet18")
    assert "expected dataset, imagenet" in _config_error(tmp_path, "model.normalize=imagenette")
    assert "std must be positive" in _config_error(tmp_path, "model.normalize={mean: [0.5], std: [0]}")
    assert "1-channel" in _config_error(tmp_path, "model.name=timm:test_resnet", "model.normalize=imagenet")
    assert normalize_stats("0.5,0.4,0.3/0.2,0.2,0.2") == ([0.5, 0.4, 0.3], [0.2, 0.2, 0.2])

    with pytest.raises(ValueError, match="no single final Linear classifier"):
        build_model("torchvision:squeezenet1_0", 3, 10, [0.5], [0.25])
    other = _save(_library_net("timm:test_efficientnet", num_classes=10), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"does not fit timm:test_resnet: \d+ missing keys, e.g. conv1") as e:
        build_model("timm:test_resnet", 3, 10, [0.5], [0.25], weights=other)
    assert "\n" not in str(e.value)
    ten = _save(_library_net("timm:test_resnet", num_classes=10), tmp_path / "ten.pth")
    with pytest.raises(ValueError, match="its head has 10 classes, the data 7"):
        build_model("timm:test_resnet", 3, 7, [0.5], [0.25], weights=ten, new_head=False)
    assert build_model("timm:test_resnet", 3, 7, [0.5], [0.25], weights=ten).head.out_features == 7


def test_eval_of_a_timm_network_from_its_weights_file_equals_evaluate_model(tmp_path, capsys):
    """`dist-robust eval --model timm:ARCH --weights W --normalize ... --eps 8/255,16/255`: one results file
    with an entry per radius, the counts evaluate_model gives on the same network."""
    from dist_robust import evaluate_model
    net = _library_net("timm:test_resnet", num_classes=10, in_chans=1)
    weights = _save(net, tmp_path / "net.safetensors")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "timm:test_resnet", "--weights", weights, "--normalize", "0.5/0.25",
                 "--dataset", "digits", "--attacks", "clean,pgd-3", "--eps", "8/255,16/255", "--limit", "60",
                 "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [r["eps"] for r in results["radii"]] == [8 / 255, 16 / 255] and results["n"] == 60
    model = load_external("timm:test_resnet", weights, "0.5/0.25", 1)
    for radius in results["radii"]:
        api = evaluate_model(model, "digits", ["clean", "pgd-3"], eps=radius["eps"], limit=60)
        assert api["clean"]["correct"] == results["clean"]["correct"]
        assert api["attacks"]["pgd-3"]["correct"] == radius["attacks"]["pgd-3"]["correct"]


def test_twins_on_a_network_without_bn_is_refused_in_one_line():
    model = build_model("timm:vit_tiny_patch16_224", 3, 10, IMAGENET[0], IMAGENET[1])
    with pytest.raises(ValueError, match="needs BN layers in the tuned part; this model has none"):
        configure_finetuning(model, "all", 1, "freeze_all", "dual", [])


VIT = "timm:vit_tiny_patch16_224"


def test_a_vit_trains_at_28_px_with_the_image_and_patch_size_of_the_config(tmp_path, capsys):
    """model.img_size=28 model.patch_size=4: a 1-channel ViT-Tiny trains one PGD-AT step on digits through
    the CLI (without them it fails in the first attack step), and its exported model reloads with them
    (load_model) and runs forward and backward at 28 px, as an attack step does."""
    from dist_robust import load_model
    args = ["train", "configs/quickstart.yaml", *TINY, f"model.name={VIT}", "model.img_size=28", "model.patch_size=4",
            "data.subset=8", "data.batch_size=8", "eval.at_end=false", f"run.out_dir={tmp_path}", "run.name=vit"]
    assert main(args) == 0, capsys.readouterr().err
    model = load_model(tmp_path / "vit")
    assert model.features.patch_embed.grid_size == (7, 7)
    x = (load_dataset("digits", "test").images[:4].float() / 255).requires_grad_(True)
    model(x).sum().backward()
    assert x.grad.shape == (4, 1, 28, 28) and bool(x.grad.abs().sum() > 0)


def test_image_and_patch_sizes_that_do_not_fit_are_refused_in_preflight(tmp_path):
    assert _config_error(tmp_path, f"model.name={VIT}") == (
        f"model.name='{VIT}': a network for 224x224 images; digits images are 28x28: set model.img_size=28 and "
        "model.patch_size to a divisor of 28 (its patches are 16 px)")
    assert _config_error(tmp_path, f"model.name={VIT}", "model.img_size=28") == (
        "model.img_size=28: 28 px is not a whole number of 16 px patches: set model.patch_size to a divisor of 28")
    assert _config_error(tmp_path, f"model.name={VIT}", "model.img_size=32", "model.patch_size=4") == (
        "model.img_size=32: digits images are 28x28")
    assert _config_error(tmp_path, "model.name=timm:test_resnet", "model.img_size=28").startswith(
        "model.img_size=28: timm:test_resnet takes no img_size argument (ResNet.__init__() got an unexpected")
    assert "an argument of timm networks (timm:ARCH); cnn3 takes none" in _config_error(tmp_path, "model.patch_size=4")
    from dist_robust.checkpoint import save_checkpoint  # a source built with other sizes: its weights cannot fit
    state = {"normalize.mean": torch.zeros(1, 1, 1, 1), "head.weight": torch.zeros(10, 192)}
    save_checkpoint(tmp_path / "src", "model", state, dict(config={"model": {"name": VIT, "img_size": 28,
                                                                             "patch_size": 4}}, epoch=1, step=1))
    err = _config_error(tmp_path, f"model.name={VIT}", "model.img_size=28", "model.patch_size=7",
                        f"model.init_from={tmp_path}/src")
    assert "holds a timm:vit_tiny_patch16_224 built with img_size=28, patch_size=4; here model.img_size=28, " \
           "model.patch_size=7: set them as the source's" in err
