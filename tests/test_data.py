"""Datasets (real offline ones, and user formats fabricated in tmp_path) and the tensor-resident loaders."""
import hashlib
import os
import pickle

import numpy as np
import pytest
import torch

from dist_robust.data import (
    DATASETS,
    Dataset,
    DatasetInfo,
    EvalLoader,
    TrainLoader,
    dataset_info,
    load_dataset,
    safe_unpickle,
    sources,
)
from dist_robust.data.memory import random_crop, random_flip
from dist_robust.utils import generator as _generator
from dist_robust.utils import shard_indices


def counts(ds, num_classes):
    return np.bincount(ds.labels.numpy(), minlength=num_classes).tolist()


def check_shape(ds, n, c, size):
    assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    assert tuple(ds.images.shape) == (n, c, size, size) and ds.images.is_contiguous()
    assert len(ds) == n


def check_mean_std(train):
    """The hard-coded normalisation matches the train split."""
    x = train.images.float() / 255
    assert x.mean().item() == pytest.approx(train.info.mean[0], abs=2e-4)
    assert x.std().item() == pytest.approx(train.info.std[0], abs=2e-4)


# ---------------------------------------------------------------- packaged datasets

def test_mnist_official_counts():
    train, test = load_dataset("mnist"), load_dataset("mnist", "test")
    check_shape(train, 60000, 1, 28)
    check_shape(test, 10000, 1, 28)
    assert counts(train, 10) == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert counts(test, 10) == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert train.images.max() == 255 and load_dataset("mnist", "train") is train  # cached
    check_mean_std(train)


def test_fashion_mnist_counts():
    train, test = load_dataset("fashion_mnist"), load_dataset("fashion_mnist", "test")
    check_shape(train, 60000, 1, 28)
    check_shape(test, 10000, 1, 28)
    assert counts(train, 10) == [6000] * 10 and counts(test, 10) == [1000] * 10
    check_mean_std(train)


def _digest(ds):
    return hashlib.sha256(ds.images.numpy().tobytes() + ds.labels.numpy().tobytes()).hexdigest()


def test_animal_mnist_dedup_and_stable_stratified_split():
    train, test = load_dataset("animal_mnist"), load_dataset("animal_mnist", "test")
    assert len(train) + len(test) == 9716 and len(test) == 2000
    check_shape(test, 2000, 1, 28)
    total = np.array(counts(train, 10)) + np.array(counts(test, 10))
    assert np.all(np.abs(np.array(counts(test, 10)) - total * 2000 / 9716) <= 1)
    train_bytes = {im.tobytes() for im in train.images.numpy()}
    test_bytes = {im.tobytes() for im in test.images.numpy()}
    assert len(train_bytes) == len(train) and len(test_bytes) == len(test)  # duplicates removed
    assert not train_bytes & test_bytes
    check_mean_std(train)
    before = _digest(train), _digest(test)
    load_dataset.cache_clear()
    assert (_digest(load_dataset("animal_mnist")), _digest(load_dataset("animal_mnist", "test"))) == before


def test_digits():
    train, test = load_dataset("digits"), load_dataset("digits", "test")
    check_shape(train, 1797 - 360, 1, 28)
    check_shape(test, 360, 1, 28)
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(10))
    assert train.info == dataset_info("digits") and train.info.num_classes == 10
    check_mean_std(train)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown dataset 'nope' \(known: animal_mnist, cifar10"):
        dataset_info("nope")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "val")
    with pytest.raises(ValueError, match="data.root="):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="data.root="):
        load_dataset("svhn", root="/nonexistent/folder")
    assert dataset_info("cifar100").num_classes == 100 and dataset_info("svhn").needs_root
    assert set(DATASETS) >= {"mnist", "fashion_mnist", "animal_mnist", "digits", "cifar10", "cifar100",
                             "svhn", "imagefolder"}


# ---------------------------------------------------------------- safety

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match="os.system|posix.system"):
        safe_unpickle(pickle.dumps(_Evil(marker)))
    assert not marker.exists()
    arrays = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), b"labels": [1, 2, 3]}
    for protocol in (2, 4, 5):
        back = safe_unpickle(pickle.dumps(arrays, protocol=protocol))
        assert np.array_equal(back[b"data"], arrays[b"data"]) and back[b"labels"] == [1, 2, 3]


def test_wrong_hash_is_refused_before_unpickling(monkeypatch):
    monkeypatch.setitem(sources.SHA256, "animal_data_version_3.gz", "0" * 64)

    def never(*args, **kwargs):
        raise AssertionError("unpickled a file whose hash did not match")
    monkeypatch.setattr(sources, "safe_unpickle", never)
    load_dataset.cache_clear()
    with pytest.raises(ValueError, match=r"animal_data_version_3.gz: sha256 mismatch \(expected 0{64}, "
                                         r"got 68a30346"):
        load_dataset("animal_mnist", "test")
    load_dataset.cache_clear()  # nothing half-built stays cached


# ---------------------------------------------------------------- user formats, fabricated

def _fake_images(n, c, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, c, size, size), dtype=np.uint8)


def _write_cifar_python(folder, fine):
    folder.mkdir(parents=True)
    expected = {}
    names = ["train", "test"] if fine else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        x, y = _fake_images(3, 3, 32, i), np.arange(3) + 7 * i
        d = {b"data": x.reshape(3, -1), b"fine_labels" if fine else b"labels": y.tolist(),
             b"batch_label": b"fake"}
        if fine:
            d[b"coarse_labels"] = [0, 0, 0]
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
        expected[name] = (x, y)
    return expected


def _write_cifar_binary(folder, names, label_bytes):
    folder.mkdir(parents=True)
    expected = {}
    for i, name in enumerate(names):
        x, y = _fake_images(4, 3, 32, 10 + i), np.arange(4) + 3 * i
        rec = np.concatenate([np.zeros((4, label_bytes - 1), np.uint8), y[:, None].astype(np.uint8),
                              x.reshape(4, -1)], axis=1)
        (folder / name).write_bytes(rec.tobytes())
        expected[name] = (x, y)
    return expected


def _assert_loaded(ds, x, y):
    assert torch.equal(ds.images, torch.from_numpy(x)) and ds.labels.tolist() == list(y)


def test_cifar10_python_and_binary(tmp_path):
    exp = _write_cifar_python(tmp_path / "py" / "cifar-10-batches-py", fine=False)
    train_x = np.concatenate([exp[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_y = np.concatenate([exp[f"data_batch_{i}"][1] for i in range(1, 6)])
    for root in (tmp_path / "py", tmp_path / "py" / "cifar-10-batches-py"):  # parent or the dir itself
        _assert_loaded(load_dataset("cifar10", "train", root=str(root)), train_x, train_y)
        _assert_loaded(load_dataset("cifar10", "test", root=str(root)), *exp["test_batch"])
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    exp = _write_cifar_binary(tmp_path / "bin" / "cifar-10-batches-bin", names, label_bytes=1)
    ds = load_dataset("cifar10", "train", root=str(tmp_path / "bin"))
    _assert_loaded(ds, np.concatenate([exp[n][0] for n in names[:5]]),
                   np.concatenate([exp[n][1] for n in names[:5]]))
    _assert_loaded(load_dataset("cifar10", "test", root=str(tmp_path / "bin")), *exp["test_batch.bin"])
    assert ds.info == dataset_info("cifar10")


def test_cifar100_python_and_binary(tmp_path):
    exp = _write_cifar_python(tmp_path / "py" / "cifar-100-python", fine=True)
    for split in ("train", "test"):
        ds = load_dataset("cifar100", split, root=str(tmp_path / "py"))
        _assert_loaded(ds, *exp[split])
    exp = _write_cifar_binary(tmp_path / "bin" / "cifar-100-binary", ["train.bin", "test.bin"], 2)
    for split in ("train", "test"):
        _assert_loaded(load_dataset("cifar100", split, root=str(tmp_path / "bin" / "cifar-100-binary")),
                       *exp[f"{split}.bin"])
    assert ds.info.num_classes == 100


def test_svhn(tmp_path):
    from scipy.io import savemat
    for i, split in enumerate(("train", "test")):
        x = _fake_images(5, 3, 32, i)
        y = np.array([10, 1, 2, 9, 10], dtype=np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": y[:, None]})
        _assert_loaded(load_dataset("svhn", split, root=str(tmp_path)), x, [0, 1, 2, 9, 0])


def test_imagefolder(tmp_path):
    from PIL import Image
    expected = {"train": [], "test": []}
    for split in ("train", "test"):
        for label, cls in enumerate(["bird", "cat", "dog"]):
            (tmp_path / split / cls).mkdir(parents=True)
            for j in range(2):
                x = _fake_images(1, 3, 16, 100 * label + j + len(split))[0]
                Image.fromarray(x.transpose(1, 2, 0)).save(tmp_path / split / cls / f"{j}.png")
                expected[split].append((x, label))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    Image.new("L", (40, 20), 128).save(tmp_path / "train" / "dog" / "wide.JPG")  # grey, non-square
    info = dataset_info("imagefolder", root=str(tmp_path), image_size=16)
    assert (info.num_classes, info.size, info.channels) == (3, 16, 3)
    test = load_dataset("imagefolder", "test", root=str(tmp_path), image_size=16)
    _assert_loaded(test, np.stack([x for x, _ in expected["test"]]), [y for _, y in expected["test"]])
    train = load_dataset("imagefolder", "train", root=str(tmp_path), image_size=16)
    check_shape(train, 7, 3, 16)
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2, 2] and torch.all(train.images[-1] == 128)


def _write_images(root, pixels: dict) -> None:
    """root/{split}/{class}/{j}.png from {(split, class): [uint8 arrays]} (H x W, or H x W x 3 for RGB)."""
    from PIL import Image
    for (split, cls), arrays in pixels.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for j, a in enumerate(arrays):
            Image.fromarray(a).save(root / split / cls / f"{j}.png")  # L for H x W, RGB for H x W x 3


def _grey(seed, n=2, size=12):
    return list(np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8))


def test_imagefolder_of_grey_images_loads_one_channel_at_their_own_size_with_their_statistics(tmp_path):
    """Grey PNGs: 1 channel and their own 12 px (data.channels and data.image_size null), exact pixels;
    model.normalize=dataset means these images' mean and std, not ImageNet's."""
    pixels = {(split, cls): _grey(10 * i + k) for i, split in enumerate(["train", "test"])
              for k, cls in enumerate(["a", "b"])}
    _write_images(tmp_path, pixels)
    root = str(tmp_path)
    info = dataset_info("imagefolder", root=root)
    assert (info.channels, info.size, info.num_classes, info.mean) == (1, 12, 2, None)
    train = load_dataset("imagefolder", "train", root=root)
    x = np.stack(pixels["train", "a"] + pixels["train", "b"])[:, None]
    _assert_loaded(train, x, [0, 0, 1, 1])
    mean, std = sources.dataset_stats("imagefolder", root=root)
    assert np.allclose(mean, [x.mean() / 255]) and np.allclose(std, [x.std() / 255]) and mean[0] != 0.485
    rgb = load_dataset("imagefolder", "test", root=root, channels=3)  # data.channels=3: converted to RGB
    check_shape(rgb, 4, 3, 12)
    assert torch.equal(rgb.images, rgb.images[:, :1].expand(-1, 3, -1, -1))
    assert dataset_info("imagefolder", root=root, image_size=6, channels=3).channels == 3
    check_shape(load_dataset("imagefolder", "train", root=root, image_size=6), 4, 1, 6)


def test_imagefolder_colour_images_and_the_size_they_must_share(tmp_path):
    """One colour image makes the set RGB (grey converts losslessly, colour does not); data.channels=1
    converts; images of other sizes need data.image_size, refused in one line naming it."""
    _write_images(tmp_path, {("train", "a"): _grey(0), ("test", "a"): _grey(1)})
    colour = np.random.default_rng(2).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    _write_images(tmp_path, {("train", "b"): [colour]})
    root = str(tmp_path)
    assert dataset_info("imagefolder", root=root).channels == 3
    grey = load_dataset("imagefolder", "train", root=root, channels=1)
    check_shape(grey, 3, 1, 12)
    from PIL import Image
    Image.fromarray(_grey(3, 1, 16)[0]).save(tmp_path / "train" / "a" / "big.png")
    sources.clear_cache()  # the folder changed under the cached scan
    with pytest.raises(ValueError, match=r"^data.image_size=null takes the training images' own size, but those "
                                         r"under .* are 12x12, 16x16: set data.image_size") as e:
        dataset_info("imagefolder", root=root)
    assert "\n" not in str(e.value)
    check_shape(load_dataset("imagefolder", "train", root=root, image_size=8), 4, 3, 8)


# ---------------------------------------------------------------- sharding and loaders

@pytest.mark.parametrize("n", [0, 1, 7, 101, 1001])
def test_shard_indices_exact(n):
    for world in (1, 2, 3, 4, 8):
        shards = [shard_indices(n, r, world) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_indices(5, 2, 2)


def _indexed_dataset(n=103, num_classes=5, size=6):
    """Labels are the image's index, so a batch tells which images it holds."""
    info = DatasetInfo("toy", 1, size, n, (0.5,), (0.5,), False)
    images = torch.arange(n * size * size, dtype=torch.int64).remainder(256).to(torch.uint8)
    return Dataset(images.view(n, 1, size, size), torch.arange(n), info)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [y.tolist() for _, y in loader]


def test_train_loader_two_ranks():
    ds = _indexed_dataset()
    ranks = [TrainLoader(ds, batch_size=8, rank=r, world_size=2, seed=3) for r in range(2)]
    assert [len(r) for r in ranks] == [6, 6]  # 103 // 16, tail dropped
    epochs = {}
    for epoch in (0, 1):
        per_rank = [_epoch(loader, epoch) for loader in ranks]
        seen = [set(i for b in batches for i in b) for batches in per_rank]
        assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 96
        assert all(len(b) == 8 for batches in per_rank for b in batches)
        epochs[epoch] = per_rank
    assert epochs[0] != epochs[1]  # reshuffled
    again = TrainLoader(ds, batch_size=8, rank=1, world_size=2, seed=3)
    assert _epoch(again, 1) == epochs[1][1]  # depends on seed and epoch only
    assert _epoch(TrainLoader(ds, batch_size=8, rank=1, world_size=2, seed=4), 1) != epochs[1][1]
    x, _ = next(iter(again))
    assert x.dtype == torch.float32 and x.shape == (8, 1, 6, 6)
    with pytest.raises(ValueError, match="global batch"):
        TrainLoader(ds, batch_size=60, rank=0, world_size=2)


def test_crop_and_flip():
    ds = _indexed_dataset(n=64, size=8)
    loader = TrainLoader(ds, batch_size=16, seed=1, crop_padding=2, flip=True)
    plain = TrainLoader(ds, batch_size=16, seed=1)
    for (x, y), (x0, y0) in zip(loader, plain):
        assert torch.equal(y, y0) and x.shape == x0.shape and x.dtype == torch.float32
        assert x.min() >= 0 and x.max() <= 1
    # each crop is a window of the zero-padded image at the offsets the generator drew
    x = ds.images[:10]
    out = random_crop(x, 3, _generator(7))
    offsets = torch.randint(0, 7, (2, 10), generator=_generator(7))
    padded = torch.nn.functional.pad(x, (3,) * 4)
    for i, (r, c) in enumerate(offsets.T.tolist()):
        assert torch.equal(out[i], padded[i, :, r:r + 8, c:c + 8])
    flipped = random_flip(x, _generator(8))
    assert all(torch.equal(f, a) or torch.equal(f, a.flip(2)) for f, a in zip(flipped, x))
    assert not torch.equal(flipped, x)


def test_resume_mid_epoch_is_exact():
    ds = _indexed_dataset()
    loader = TrainLoader(ds, batch_size=8, rank=1, world_size=2, seed=5, crop_padding=1, flip=True)
    loader.set_epoch(2)
    full = list(loader)
    resumed = list(loader.iter_from(2, 4))
    assert len(resumed) == 2
    for (x, y), (xr, yr) in zip(full[4:], resumed):
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_train_subset_stratified_and_fixed():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    ds = Dataset(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), labels,
                 DatasetInfo("toy", 1, 2, 3, (0.5,), (0.5,), False))
    loaders = [TrainLoader(ds, batch_size=5, rank=r, world_size=2, seed=9, subset=30) for r in range(2)]
    assert torch.equal(loaders[0].indices, loaders[1].indices) and loaders[0].num_points == 30
    assert np.bincount(labels[loaders[0].indices].numpy()).tolist() == [15, 9, 6]
    assert torch.equal(TrainLoader(ds, batch_size=5, seed=9, subset=30).indices, loaders[0].indices)
    assert len(loaders[0]) == 3
    with pytest.raises(ValueError, match="data.subset=1000: must be in"):  # larger than the data: refused
        TrainLoader(ds, batch_size=5, subset=1000)
    whole = TrainLoader(ds, batch_size=5, subset=len(ds))  # as large as the data: all of it
    assert whole.indices is None and whole.num_points == 100


@pytest.mark.parametrize("n,batch", [(23, 5), (1, 4), (17, 1), (10, 3)])
def test_eval_loader_each_point_once(n, batch):
    ds = _indexed_dataset(n=40)
    for limit in (n, None):
        total = len(ds) if limit is None else n
        for world in (1, 2, 3):
            seen = []
            for rank in range(world):
                loader = EvalLoader(ds, batch, rank, world, limit=limit)
                ys = [y.tolist() for _, y in loader]
                assert len(ys) == len(loader) and sum(map(len, ys)) == loader.num_points
                assert all(len(b) == batch for b in ys[:-1])
                seen += [i for b in ys for i in b]
            assert seen == list(range(total))  # in order, each exactly once


def test_eval_loader_batch_of_one_and_values():
    ds = _indexed_dataset(n=23)
    loader = EvalLoader(ds, batch_size=5, rank=1, world_size=2)  # shard 12..22: 5, 5, 1
    batches = list(loader)
    assert [len(y) for _, y in batches] == [5, 5, 1] and loader.num_points == 11
    x, y = batches[-1]
    assert y.tolist() == [22] and torch.equal(x, ds.images[22:23].float() / 255)


def test_a_run_on_a_grey_imagefolder_states_its_images_and_its_model_keeps_their_statistics(tmp_path, capsys):
    """The start line says what was found in the images; model.normalize=dataset's statistics (computed
    from the training images, logged) are the model's buffers, so evaluating its model.json reads them
    from there."""
    from conftest import TINY
    from dist_robust import load_model
    from dist_robust.cli import main
    pixels = {(split, cls): _grey(10 * i + k, n=4) for i, split in enumerate(["train", "test"])
              for k, cls in enumerate(["a", "b"])}
    _write_images(tmp_path / "images", pixels)
    root = str(tmp_path / "images")
    assert main(["train", "configs/quickstart.yaml", *TINY, "data.name=imagefolder", f"data.root={root}",
                 "data.batch_size=8", "eval.at_end=false", f"run.out_dir={tmp_path}", "run.name=grey"]) == 0
    err = capsys.readouterr().err
    assert "1-channel 12x12 images (size and channels from the training images)" in err, err
    mean, std = sources.dataset_stats("imagefolder", root=root)
    assert f"model.normalize=dataset: mean [{mean[0]:.4f}], std [{std[0]:.4f}] of imagefolder's training images" in err
    model = load_model(tmp_path / "grey")
    assert torch.equal(model.normalize.mean.flatten(), torch.tensor(mean, dtype=torch.float32))
    assert main(["eval", "--checkpoint", str(tmp_path / "grey"), "--dataset", "imagefolder", "--root", root,
                 "--attacks", "clean", "--out", str(tmp_path / "eval.json")]) == 0, capsys.readouterr().err
