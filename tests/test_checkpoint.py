"""Checkpoints: exact round trip, exact resume at the right step and lr, clear errors for missing,
truncated and corrupted files (the previous good checkpoint is used)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dist_robust.checkpoint import CheckpointError, last_good, load_checkpoint, model_header, save_checkpoint
from dist_robust.cli import main
from dist_robust.models import build_model


def _model_and_opt():
    torch.manual_seed(0)
    model = build_model("cnn3", 1, 10, [0.5], [0.25])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss = model(torch.rand(8, 1, 28, 28)).logsumexp(1).mean()
    loss.backward()
    opt.step()  # momentum buffers exist now
    return model, opt


def test_round_trip_is_exact(tmp_path):
    model, opt = _model_and_opt()
    save_checkpoint(tmp_path, "epoch_0001", model.state_dict(), {"epoch": 1, "step": 7, "config": {}}, opt.state_dict())
    model2, opt2 = _model_and_opt()
    for p in model2.parameters():
        p.data.zero_()
    opt2.state.clear()
    state, meta = load_checkpoint(tmp_path / "epoch_0001.safetensors", optimizer=opt2)
    model2.load_state_dict(state)
    assert meta["epoch"] == 1 and meta["step"] == 7
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
    # plain keys, no wrapper prefixes, readable by any safetensors user
    assert set(load_file(tmp_path / "epoch_0001.safetensors")) == set(model.state_dict())


def test_missing_truncated_and_corrupted(tmp_path):
    model, opt = _model_and_opt()
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    for epoch in (1, 2):
        save_checkpoint(tmp_path, f"epoch_{epoch:04d}", model.state_dict(), {"epoch": epoch, "step": epoch}, opt.state_dict())
    f = tmp_path / "epoch_0002.safetensors"
    f.write_bytes(f.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(f)
    assert last_good(tmp_path).name == "epoch_0001.json"  # falls back to the previous good one
    g = tmp_path / "epoch_0001.train.safetensors"
    data = bytearray(g.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the optimizer state
    g.write_bytes(bytes(data))
    assert last_good(tmp_path) is None
    (tmp_path / "epoch_0001.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "epoch_0001.json")


def test_model_header_reads_shapes_and_refuses_a_bad_file_in_one_line(tmp_path):
    """The model file's tensor shapes from its safetensors header (safetensors' own parser, no tensor
    read); a file that is not safetensors, or lacks part of its tensors, is refused in one line."""
    model, opt = _model_and_opt()
    sidecar = save_checkpoint(tmp_path, "epoch_0001", model.state_dict(), {"epoch": 1, "step": 1}, opt.state_dict())
    assert model_header(sidecar) == {k: list(v.shape) for k, v in model.state_dict().items()}
    f = tmp_path / "epoch_0001.safetensors"
    data = f.read_bytes()
    for bad in (b"not a safetensors file at all", data[:-4], b""):
        f.write_bytes(bad)
        with pytest.raises(CheckpointError, match="unreadable") as e:
            model_header(sidecar)
        assert str(f) in str(e.value) and len(str(e.value).splitlines()) == 1


def test_eval_of_a_bad_checkpoint_is_one_clear_line(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.safetensors"), "--dataset", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.safetensors" in err and "not found" in err


def _train(tmp_path, tiny, name, epochs, extra=()):
    args = ["train", "configs/quickstart.yaml", *tiny, f"run.out_dir={tmp_path}", f"run.name={name}",
            f"train.epochs={epochs}", "optim.milestones=[1.5]", "eval.at_end=false", *extra]
    assert main(args) == 0


@pytest.mark.slow
def test_resume_continues_at_the_right_step_and_lr_and_matches_an_unbroken_run(tmp_path, tiny, capsys):
    _train(tmp_path, tiny, "full", 3)
    # A run stopped after epoch 2: the same folder without the third epoch's files.
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for f in (tmp_path / "cut").glob("model.*"):
        f.unlink()
    for f in (tmp_path / "cut" / "checkpoints").glob("epoch_0003*"):
        f.unlink()
    log = tmp_path / "cut" / "log.jsonl"
    log.write_text("".join(l + "\n" for l in log.read_text().splitlines() if json.loads(l)["epoch"] <= 2))
    meta = json.loads((tmp_path / "cut" / "checkpoints" / "epoch_0002.json").read_text())
    capsys.readouterr()
    _train(tmp_path, tiny, "cut", 3)
    steps_per_epoch = meta["step"] // 2
    resumed = [line for line in capsys.readouterr().err.splitlines() if "resumed" in line]
    assert resumed and f"epoch 2, step {2 * steps_per_epoch}" in resumed[0]
    assert "lr 0.005" in resumed[0]  # 0.05 decayed by 0.1 at epoch 1.5
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the unbroken one"
    epochs = [json.loads(l) for l in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2, 3]
