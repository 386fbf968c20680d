"""A robustness-library (MadryLab) ResNet-50 checkpoint converts into a source that init_from loads."""
import subprocess
import sys

import pytest
import torch

from dist_robust.checkpoint import load_checkpoint
from dist_robust.models import build_model, load_backbone


@pytest.mark.multiproc
def test_madry_checkpoint_converts_and_loads_as_a_backbone(tmp_path):
    torch.manual_seed(0)
    src = build_model("resnet50", 3, 1000, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    madry = {}
    for k, v in src.state_dict().items():  # the library's layout: model, attacker copy, normalizer
        if k.startswith("normalize."):
            madry[f"module.normalizer.new_{k.split('.')[1]}"] = v.view(3, 1, 1)
        else:
            name = k.replace("features.", "", 1).replace("head.", "fc.", 1)
            madry[f"module.model.{name}"] = v
            madry[f"module.attacker.model.{name}"] = v
    torch.save({"model": madry, "epoch": 90}, tmp_path / "r50.ckpt")
    out = tmp_path / "r50.safetensors"
    # the refused file converts at the same time: each process spends most of its time starting up
    bad = subprocess.Popen([sys.executable, "scripts/convert_madry_resnet50.py", str(tmp_path / "nope.ckpt")],
                           stderr=subprocess.PIPE, text=True)
    r = subprocess.run([sys.executable, "scripts/convert_madry_resnet50.py", str(tmp_path / "r50.ckpt"),
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    state, _ = load_checkpoint(out)
    target = build_model("resnet50", 3, 10, [0.0] * 3, [1.0] * 3)
    load_backbone(target, state)
    for k, v in target.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, src.state_dict()[k]), k
    _, bad_err = bad.communicate(timeout=120)
    assert bad.returncode != 0 and bad_err.strip().count("\n") == 0 and "cannot read" in bad_err
