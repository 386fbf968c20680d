"""FFCV .beton files and loaders (data/ffcv.py): exact round trips, the memory loader's order and
augmentation rank by rank, exact evaluation shards, corrupt and stale files, and a 2-rank training
run that gives the memory loader's result."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_reference
from dist_robust.cli import main
from dist_robust.data import EvalLoader, TrainLoader, load_dataset, load_split
from dist_robust.data.ffcv import (
    FFCVDataError,
    FFCVEvalLoader,
    FFCVTrainLoader,
    beton_path,
    checked_manifest,
    prepare,
    verify,
)
from dist_robust.data.memory import epoch_batches

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    out = tmp_path_factory.mktemp("ffcv")
    for fmt in ("raw", "jpeg"):
        for split in ("train", "test"):
            prepare("digits", split, out, fmt, quality=100)
    return out


def _data(out, fmt="raw", **kw):
    return SimpleNamespace(**{**dict(name="digits", root=None, image_size=None, channels=None, holdout=0,
                                     subset=None, crop_padding=0, flip=False, ffcv_dir=str(out), ffcv_format=fmt),
                              **kw})


def _eval_loader(out, fmt, batch, rank=0, world=1, limit=None, split="test"):
    path = beton_path(out, "digits", split, fmt)
    return FFCVEvalLoader(path, checked_manifest(path, "digits", split, None, None, fmt), 1, batch, rank, world,
                          limit=limit)


def test_raw_round_trip_is_bit_exact_and_jpeg_100_is_close(betons):
    test = load_dataset("digits", "test")
    exact = torch.cat([x for x, _ in EvalLoader(test, 1000)])
    raw = list(_eval_loader(betons, "raw", 100))
    assert torch.equal(torch.cat([x for x, _ in raw]), exact)
    assert torch.equal(torch.cat([y for _, y in raw]), test.labels)
    jpeg = torch.cat([x for x, _ in _eval_loader(betons, "jpeg", 100)])
    err = (jpeg - exact).abs()
    # digits (8x8 scans, upscaled) with hard edges are a hard case for JPEG: the mean error is 2/255, a few pixels move by 17/255
    assert err.mean() < 0.01 and err.max() <= 20 / 255, (err.mean(), err.max())
    manifest = json.loads(beton_path(betons, "digits", "test", "raw").with_suffix(".json").read_text())
    assert manifest["n"] == len(test) and manifest["shape"] == [1, 28, 28]
    assert manifest["counts"] == torch.bincount(test.labels).tolist()


def test_prepare_is_idempotent_and_rebuilds_a_stale_file(betons, tmp_path):
    assert prepare("digits", "train", betons, "raw", quality=100) == (beton_path(betons, "digits", "train", "raw"), False)
    path, _ = prepare("digits", "train", tmp_path, "raw")
    manifest_file = path.with_suffix(".json")
    manifest = json.loads(manifest_file.read_text())
    manifest["content_sha256"] = "0" * 64  # as if the source data had changed since
    manifest_file.write_text(json.dumps(manifest))
    assert prepare("digits", "train", tmp_path, "raw")[1] is True
    assert json.loads(manifest_file.read_text())["content_sha256"] != "0" * 64


@pytest.mark.parametrize("rank,fmt", [(0, "raw"), (1, "raw"), (0, "jpeg")])
def test_training_batches_are_the_memory_loaders_rank_by_rank(betons, rank, fmt):
    """Same subset, holdout, order and crop + flip, for two epochs and a mid-epoch start: bitwise from raw
    files; from JPEG (quality 100) the same images and labels, each pixel within the round trip's error."""
    data = _data(betons, fmt, holdout=97, subset=800, crop_padding=2, flip=True)
    memory = TrainLoader(load_split(data, "train"), 32, rank, 2, seed=5, crop_padding=2, flip=True, subset=800)
    ffcv = FFCVTrainLoader(data, 32, rank, 2, seed=5)
    assert len(ffcv) == len(memory) == 800 // 64
    for epoch, start in ((0, 0), (1, 0), (1, 7)):
        pairs = list(zip(memory.iter_from(epoch, start), ffcv.iter_from(epoch, start), strict=True))
        assert len(pairs) == len(memory) - start
        for (xm, ym), (xf, yf) in pairs:
            assert torch.equal(ym, yf)
            if fmt == "raw":
                assert torch.equal(xm, xf)
            else:  # the error of test_raw_round_trip..., so a wrong crop, flip or image would show
                err = (xm - xf).abs()
                assert err.mean() < 0.01 and err.max() <= 20 / 255, (err.mean(), err.max())
    kept = list(ffcv.iter_from(0))  # FFCV reuses its buffers: what a method keeps must not change
    assert not any(torch.equal(kept[0][0], x) for x, _ in kept[1:])
    first = next(iter(memory.iter_from(0)))[0]
    assert torch.equal(kept[0][0], first) if fmt == "raw" else (kept[0][0] - first).abs().max() <= 20 / 255


def test_the_epoch_order_splits_disjointly_covers_and_reshuffles():
    n, batch, world = 1000, 30, 2
    epochs = []
    for epoch in range(2):
        shards = [epoch_batches(n, batch, r, world, seed=3, epoch=epoch).reshape(-1) for r in range(world)]
        both = torch.cat(shards)
        assert len(set(both.tolist())) == len(both) == (n // (batch * world)) * batch * world  # disjoint, full batches
        epochs.append(shards)
    assert not torch.equal(epochs[0][0], epochs[1][0])


@pytest.mark.parametrize("world,limit,batch", [(2, 101, 50), (3, 101, 17), (2, 1, 8), (3, None, 1000)])
def test_evaluation_shards_cover_every_point_once(betons, world, limit, batch):
    test = load_dataset("digits", "test")
    n = limit or len(test)
    got = []
    for rank in range(world):
        loader = _eval_loader(betons, "raw", batch, rank, world, limit)
        batches = list(loader)
        assert len(batches) == len(loader) and all(len(y) <= batch for _, y in batches)
        got += [x for x, _ in batches]
    # every point once, in order: no padding, no duplicates, the partial batches (a batch of one) kept
    assert torch.equal(torch.cat(got), test.images[:n].float() / 255)


def test_a_corrupt_beton_is_refused_and_a_foreign_one_is_stale(tmp_path):
    path, _ = prepare("digits", "test", tmp_path, "raw")
    with pytest.raises(FFCVDataError, match="stale|made from"):
        checked_manifest(path, "mnist", "test", None, None, "raw")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the middle: outside the hashed ends, found by the changed mtime
    path.write_bytes(bytes(data))
    with pytest.raises(FFCVDataError, match="modified after it was prepared") as e:
        checked_manifest(path, "digits", "test", None, None, "raw")
    assert e.value.kind == "corrupt"
    with pytest.raises(FFCVDataError, match="fails its sha256 check"):  # prepare --verify hashes it in full
        verify(path)
    path.write_bytes(bytes(data[:-10]))  # truncated: found by its size
    with pytest.raises(FFCVDataError, match="differs from its manifest in size"):
        checked_manifest(path, "digits", "test", None, None, "raw")


def test_a_load_checks_the_stamp_and_verify_hashes_in_full(tmp_path, capsys, monkeypatch):
    """A load reads the file's two ends, not all of it; a touched (or copied) file is refused until
    `prepare --verify` has hashed it in full and recorded its new stamp."""
    path, _ = prepare("digits", "test", tmp_path, "raw")
    import dist_robust.data.ffcv as ffcv
    hashed = []
    monkeypatch.setattr(ffcv, "sha256_file", lambda p: hashed.append(p) or "")
    checked_manifest(path, "digits", "test", None, None, "raw")
    assert not hashed  # no full read at load time
    monkeypatch.undo()
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(FFCVDataError, match="--verify"):
        checked_manifest(path, "digits", "test", None, None, "raw")
    assert main(["prepare", "digits", "--split", "test", "--out", str(tmp_path), "--verify"]) == 0
    assert capsys.readouterr().out.strip().endswith("digits-test-raw.beton: verified")
    checked_manifest(path, "digits", "test", None, None, "raw")  # accepted again
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["prepare", "digits", "--split", "test", "--out", str(tmp_path), "--verify"]) == 1
    assert "fails its sha256 check" in capsys.readouterr().err


def test_the_prepare_command(tmp_path, capsys):
    assert main(["prepare", "digits", "--split", "test", "--out", str(tmp_path)]) == 0
    assert main(["prepare", "digits", "--split", "test", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("digits-test-raw.beton: up to date")
    assert main(["prepare", "digits", "--split", "val", "--out", str(tmp_path)]) == 2
    assert "--split=val" in capsys.readouterr().err


def _weights(run) -> dict:
    return load_file(run / "model.safetensors")


@pytest.mark.multiproc
def test_two_rank_training_with_ffcv_gives_the_memory_loaders_result(reference, tmp_path):
    """The shared reference run (memory loader) again with FFCV: raw pixels give the same model, bit for
    bit, and the same counts (JPEG's training batches are compared with the memory loader's above)."""
    memory = json.loads((reference / "results.json").read_text())
    raw = train_reference(tmp_path, "ffcv_raw", "data.loader=ffcv", f"data.ffcv_dir={tmp_path}/ffcv")
    assert "ffcv loader" in (tmp_path / "ffcv_raw.out").read_text()
    assert (tmp_path / "ffcv" / "digits-test-raw.beton").is_file()  # evaluation read it too
    ref_w, raw_w = _weights(reference), _weights(raw)
    assert ref_w.keys() == raw_w.keys() and all(torch.equal(ref_w[k], raw_w[k]) for k in ref_w)
    res = json.loads((raw / "results.json").read_text())
    assert (res["clean"]["correct"], res["attacks"]["pgd-3"]["correct"]) == (
        memory["clean"]["correct"], memory["attacks"]["pgd-3"]["correct"])


def test_auto_reads_ffcv_for_large_images_or_large_data_only(tmp_path):
    from dist_robust.data import select
    data = _data(tmp_path, loader="auto")
    assert select.resolve_loader(data) == "memory"  # nothing prepared
    path, _ = prepare("digits", "train", tmp_path, "raw")
    assert select.resolve_loader(data) == "memory"  # 28 px and 1 MB: memory is faster (bench/loaders.py)
    manifest = json.loads(path.with_suffix(".json").read_text())
    manifest["shape"] = [3, 224, 224]
    path.with_suffix(".json").write_text(json.dumps(manifest))
    assert select.resolve_loader(data) == "ffcv"
    manifest["shape"], manifest["n"] = [3, 32, 32], 2_000_000  # CIFAR-sized images, 6 GB decoded
    path.with_suffix(".json").write_text(json.dumps(manifest))
    assert select.resolve_loader(data) == "ffcv"
    assert select.resolve_loader(_data(tmp_path, loader="memory")) == "memory"
