"""Fashion-MNIST IDX loading (real files and synthetic ones), the padded 3-channel dataset, ImageFolder."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from equishift import data
from equishift.errors import DataError

REAL = Path(data.DEFAULT_FMNIST_DIR)
needs_real = pytest.mark.skipif(not (REAL / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Debian package dataset-fashion-mnist is not installed")


def write_idx(path: Path, array: np.ndarray, *, magic: bytes = None, cut: int = 0) -> None:
    """A gzip'd IDX file of uint8 ``array``; ``magic`` replaces the 4 magic bytes, ``cut`` drops bytes."""
    raw = (magic or bytes([0, 0, 8, array.ndim])) + b"".join(struct.pack(">I", s) for s in array.shape)
    raw += array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(raw[: len(raw) - cut])


def fake_fmnist(root: Path, n: int = 12, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    for split, (img, lbl) in data._FILES.items():
        write_idx(root / img, images)
        write_idx(root / lbl, labels)
    return images, labels


@pytest.fixture(scope="module")
def real_train():
    return data.load_fashion_mnist("train")


@needs_real
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_real_files_shapes_types_and_balance(split, n, real_train):
    x, y = real_train if split == "train" else data.load_fashion_mnist(split)
    assert x.shape == (n, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (n,) and y.dtype == torch.long
    # Fashion-MNIST is balanced: every class has n / 10 images.
    assert torch.bincount(y, minlength=10).tolist() == [n // 10] * 10
    assert 0 < x.float().mean() < 255


@needs_real
def test_mean_std_constants_match_the_training_pixels(real_train):
    x, _ = real_train
    px = x.float() / 255
    assert abs(px.mean().item() - data.FMNIST_MEAN[0]) < 5e-4
    assert abs(px.std().item() - data.FMNIST_STD[0]) < 5e-4


def test_dataset_pads_replicates_and_normalises(tmp_path, monkeypatch):
    images, labels = fake_fmnist(tmp_path)
    monkeypatch.setenv("EQUISHIFT_FMNIST_DIR", str(tmp_path))
    ds = data.FashionMNIST("test")
    assert len(ds) == len(labels)
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == int(labels[3])
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    mean, std = data.FMNIST_MEAN[0], data.FMNIST_STD[0]
    raw = torch.from_numpy(images[3]).float() / 255
    torch.testing.assert_close(x[0, 2:30, 2:30] * std + mean, raw, atol=1e-6, rtol=0)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    torch.testing.assert_close(x[0][border], torch.full((int(border.sum()),), -mean / std), atol=1e-6, rtol=0)
    xb, yb = ds.batch(torch.tensor([3, 0]))
    assert torch.equal(xb[0], x) and yb.tolist() == [int(labels[3]), int(labels[0])]


def test_root_argument_beats_env_var(tmp_path, monkeypatch):
    a, _ = fake_fmnist(tmp_path / "a", seed=1)
    fake_fmnist(tmp_path / "b", seed=2)
    monkeypatch.setenv("EQUISHIFT_FMNIST_DIR", str(tmp_path / "b"))
    x, _ = data.load_fashion_mnist("train", root=tmp_path / "a")
    assert torch.equal(x, torch.from_numpy(a))


def test_missing_directory_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist("test", root=tmp_path / "nowhere")


def test_missing_file_is_named(tmp_path):
    fake_fmnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*missing"):
        data.load_fashion_mnist("test", root=tmp_path)


def test_unknown_split(tmp_path):
    with pytest.raises(DataError, match="'train' or 'test'"):
        data.load_fashion_mnist("validation", root=tmp_path)


@pytest.mark.parametrize("kind", ["magic", "truncated", "extra", "not-gzip", "count-mismatch", "bad-label"])
def test_corrupt_idx_raises_data_error(tmp_path, kind):
    images, labels = fake_fmnist(tmp_path)
    img = tmp_path / "t10k-images-idx3-ubyte.gz"
    lbl = tmp_path / "t10k-labels-idx1-ubyte.gz"
    if kind == "magic":
        write_idx(img, images, magic=bytes([0, 0, 9, 3]))  # type byte 0x09 = signed bytes: not ours
        expect = "magic bytes 00 00 08 03"
    elif kind == "truncated":
        write_idx(img, images, cut=100)
        expect = "truncated or corrupt"
    elif kind == "extra":
        with gzip.open(img, "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", 12, 28, 28) + images.tobytes() + b"\0")
        expect = "truncated or corrupt"
    elif kind == "not-gzip":
        img.write_bytes(b"this is not gzip at all")
        expect = "not a readable gzip"
    elif kind == "count-mismatch":
        write_idx(lbl, labels[:-1])
        expect = "12 images but 11 labels"
    else:
        write_idx(lbl, np.full_like(labels, 10))
        expect = "out of range"
    with pytest.raises(DataError, match=expect) as err:
        data.load_fashion_mnist("test", root=tmp_path)
    assert "dataset-fashion-mnist" in str(err.value)


def _png(path: Path, color, size=(20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_classes_labels_and_pixels(tmp_path):
    _png(tmp_path / "zebra" / "a.png", (255, 0, 0))
    _png(tmp_path / "ant" / "b.png", (0, 255, 0))
    _png(tmp_path / "ant" / "nested" / "c.png", (0, 0, 255))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    ds = data.ImageFolder(tmp_path, size=16)
    assert ds.classes == ["ant", "zebra"]
    assert [lbl for _, lbl in ds.samples] == [0, 0, 1]
    assert len(ds) == 3
    x, y = ds[2]
    assert x.shape == (3, 16, 16) and y == 1
    mean, std = torch.tensor(ds.mean), torch.tensor(ds.std)
    # A uniform red image stays uniform under resizing: channel c equals (red_c - mean_c) / std_c.
    want = (torch.tensor([1.0, 0.0, 0.0]) - mean) / std
    torch.testing.assert_close(x.mean(dim=(1, 2)), want, atol=1e-5, rtol=0)
    xb, yb = ds.batch(torch.tensor([0, 2]))
    assert xb.shape == (2, 3, 16, 16) and yb.tolist() == [0, 1]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.ImageFolder(tmp_path / "missing")
    _png(tmp_path / "only" / "a.png", (1, 2, 3))
    with pytest.raises(DataError, match="at least two class sub-folders"):
        data.ImageFolder(tmp_path)
    _png(tmp_path / "other" / "b.png", (1, 2, 3))
    (tmp_path / "other" / "broken.png").write_bytes(b"\x89PNG not really")
    ds = data.ImageFolder(tmp_path)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.name == "broken.png"][0]
    with pytest.raises(DataError, match="broken.png"):
        ds[bad]
