"""CIFAR-10, downsampled ImageNet 64x64 and LSUN loaders on tiny fake files; `cm data inspect`."""

import os
import pickle

import numpy as np
import pytest
import torch
from helpers import fit_args, write_cifar10, write_imagenet64
from PIL import Image

from cm.cli import main
from cm.data import (
    CIFAR10,
    LSUN,
    CIFAR10Dataset,
    ImageNet64,
    ImageNet64Dataset,
    LSUNDataset,
    center_crop_arr,
)
from cm.data import real as real_module
from cm.data.inspect import detect_dataset
from cm.data.real import imagenet64_class_index
from cm.training.datamodule import ImageDataModule


def test_cifar10_reads_official_batches(tmp_path):
    root = write_cifar10(tmp_path)
    ds = CIFAR10Dataset(str(tmp_path))  # the parent of cifar-10-batches-py works too
    assert len(ds) == 20 and (ds.resolution, ds.channels, ds.label_dim) == (32, 3, 10)
    assert len(CIFAR10Dataset(str(root), split="test")) == 4
    with open(root / "data_batch_2", "rb") as f:
        assert b"numpy.core.multiarray\n_reconstruct" in f.read()  # the numpy 1.x global
        f.seek(0)
        batch = pickle.load(f, encoding="bytes")
    x, y = ds[4 + 1]  # second image of data_batch_2
    ref = torch.from_numpy(batch[b"data"][1].reshape(3, 32, 32).astype(np.float32)) / 127.5 - 1
    assert x.dtype == torch.float32 and torch.allclose(x, ref)
    assert y.shape == (10,) and y.argmax() == batch[b"labels"][1] and y.sum() == 1
    assert CIFAR10Dataset(str(root), use_labels=False)[0][1].shape == (0,)
    flipped = CIFAR10Dataset(str(root), flip=True)
    torch.manual_seed(0)
    views = {tuple(flipped[5][0].flatten().tolist()) for _ in range(16)}
    assert views == {tuple(ref.flatten().tolist()), tuple(ref.flip(-1).flatten().tolist())}


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data_batch_1.*cs\.toronto\.edu"):
        CIFAR10Dataset(str(tmp_path))
    root = write_cifar10(tmp_path)
    (root / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"files data_batch_3 not found.*cifar\.html"):
        CIFAR10Dataset(str(root))
    with pytest.raises(ValueError, match="32x32, not 64x64"):
        CIFAR10Dataset(str(root), split="test", resolution=64)
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (root / "test_batch").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match=r"shape \(2, 100\).*\[N, 3072\]"):
        CIFAR10Dataset(str(root), split="test")
    (root / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        CIFAR10Dataset(str(root), split="test")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_rejects_malicious_pickle(tmp_path):
    root = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    (root / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(marker)}, protocol=2))
    with pytest.raises(ValueError, match=r"system is not allowed.*re-download"):
        CIFAR10Dataset(str(root), split="test")
    assert not marker.exists()


def test_imagenet64_label_shift_pixel_order_and_cache(tmp_path):
    root, hwc, labels = write_imagenet64(tmp_path / "in64")
    cache = tmp_path / "cache"
    ds = ImageNet64Dataset(str(root), cache_dir=str(cache))
    assert len(ds) == 20 and (ds.resolution, ds.channels, ds.label_dim) == (64, 3, 1000)
    for i in (0, 1, 13):
        x, y = ds[i]
        assert torch.equal(
            ((x.permute(1, 2, 0) + 1) * 127.5).round().byte(), torch.from_numpy(hwc[i])
        )
        assert y.shape == (1000,) and y.argmax() == imagenet64_class_index()[labels[i] - 1]
    # file labels 1 and 1000 (kit fox, n02119789; dumbbell, n03255030) in sorted-wnid order
    assert ds[0][1].argmax() == 278 and ds[1][1].argmax() == 543
    assert sorted(p.name for p in cache.iterdir()) == [
        "imagenet64_train_images.npy",
        "imagenet64_train_labels.npy",
    ]
    assert np.load(cache / "imagenet64_train_images.npy", mmap_mode="r").shape == (20, 3, 64, 64)
    # the cache is used without the batches; a pickled copy re-maps the file
    for f in root.rglob("*.npz"):
        if "train" in f.name:
            f.unlink()
    again = ImageNet64Dataset(str(root), cache_dir=str(cache))
    clone = pickle.loads(pickle.dumps(again))
    assert clone._images is None and torch.equal(clone[13][0], ds[13][0])
    val = ImageNet64Dataset(str(root), split="test", use_labels=False)  # cache next to the data
    assert len(val) == 3 and val[2][1].shape == (0,)
    assert (root / "imagenet64_test_images.npy").is_file()


def test_imagenet64_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    root, _, _ = write_imagenet64(tmp_path)
    read = real_module._imagenet64_pixels

    def flaky(file):
        if file.name == "train_data_batch_7.npz":
            raise KeyboardInterrupt
        return read(file)

    monkeypatch.setattr(real_module, "_imagenet64_pixels", flaky)
    with pytest.raises(KeyboardInterrupt):
        ImageNet64Dataset(str(root))
    assert not list(root.glob("*.npy")) and not list(root.glob(".*tmp"))


def test_imagenet64_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_data_batch_1\.npz.*image-net\.org"):
        ImageNet64Dataset(str(tmp_path))
    root, _, _ = write_imagenet64(tmp_path / "in64")
    with pytest.raises(ValueError, match="64x64, not 32x32"):
        ImageNet64Dataset(str(root), resolution=32)
    np.savez(
        root / "Imagenet64_val_npz" / "val_data.npz",
        data=np.zeros((2, 10), np.uint8),
        labels=[1, 2],
    )
    with pytest.raises(ValueError, match=r"not uint8 \[N, 12288\]"):
        ImageNet64Dataset(str(root), split="test")
    np.savez(
        root / "Imagenet64_val_npz" / "val_data.npz",
        data=np.zeros((2, 12288), np.uint8),
        labels=[0, 1],
    )
    with pytest.raises(ValueError, match="outside 1..1000"):
        ImageNet64Dataset(str(root), split="test")


def _stripes(size: tuple[int, int]) -> Image.Image:
    """White middle third of the long side, black elsewhere."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    if w >= h:
        a[:, w // 3 : w - w // 3] = 255
    else:
        a[h // 3 : h - h // 3] = 255
    return Image.fromarray(a)


def test_center_crop_arr_is_centred():
    # 96x32: BOX-halved once to 48x16, then the central 16 columns are the white stripe
    for size in [(96, 32), (48, 16), (16, 48)]:
        out = center_crop_arr(_stripes(size), 16)
        assert out.shape == (16, 16, 3) and out.min() == 255
    out = center_crop_arr(Image.new("RGB", (37, 23)), 16)
    assert out.shape == (16, 16, 3)


def test_lsun_folder_of_odd_sizes(tmp_path):
    root = tmp_path / "bedroom"
    (root / "a" / "b").mkdir(parents=True)
    _stripes((96, 32)).save(root / "a" / "wide.png")
    _stripes((30, 90)).save(root / "a" / "b" / "tall.jpg", quality=95)
    Image.new("RGB", (37, 23), (255, 0, 0)).save(root / "odd.webp")
    (root / ".thumbs").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".thumbs" / "skipped.png")
    ds = LSUNDataset(str(root), resolution=16)
    assert len(ds) == 3 and (ds.resolution, ds.channels, ds.label_dim) == (16, 3, 0)
    for i in range(3):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1 and y.shape == (0,)
    assert ds.files == ["a/b/tall.jpg", "a/wide.png", "odd.webp"]
    assert ds[1][0].min() == 1  # wide.png: the white centre
    assert ds[0][0].mean() > 0.9  # tall.jpg: the (JPEG-blurred) white centre
    with pytest.raises(FileNotFoundError, match=r"github\.com/fyu/lsun"):
        LSUNDataset(str(tmp_path / "empty"))
    (tmp_path / "lmdb").mkdir()
    (tmp_path / "lmdb" / "data.mdb").write_bytes(b"")
    with pytest.raises(ValueError, match="LMDB.*data.py export"):
        LSUNDataset(str(tmp_path / "lmdb"))
    (root / "broken.png").write_bytes(b"nope")
    ds = LSUNDataset(str(root), 16)
    with pytest.raises(ValueError, match="broken.png"):
        ds[ds.files.index("broken.png")]


def test_datamodule_reads_shapes_without_loading(tmp_path):
    root = write_cifar10(tmp_path)
    dm = ImageDataModule(CIFAR10(str(root)), resolution=32, batch_size=4)
    assert (dm.resolution, dm.channels, dm.label_dim) == (32, 3, 10) and dm._full is None
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, 10)
    with pytest.raises(ValueError, match="resolution to 32"):
        ImageDataModule(CIFAR10(str(root)), resolution=16)
    assert ImageDataModule(CIFAR10(str(root), split="test")).resolution == 32
    in64, _, _ = write_imagenet64(tmp_path / "in64")
    dm = ImageDataModule(ImageNet64(str(in64)), resolution=64, use_labels=False)
    assert (dm.channels, dm.label_dim) == (3, 0)
    dm.prepare_data()
    assert (in64 / "imagenet64_train_images.npy").is_file() and dm._full is None
    dm = ImageDataModule(LSUN(str(in64)), resolution=16, batch_size=2)
    assert (dm.resolution, dm.channels, dm.label_dim) == (16, 3, 0)
    assert ImageDataModule(LSUN(str(in64))).resolution == 256  # LSUN's default size


def test_detect_dataset(tmp_path):
    write_cifar10(tmp_path / "c")
    assert detect_dataset(tmp_path / "c") == "cifar10"
    assert detect_dataset(tmp_path / "c" / "cifar-10-batches-py") == "cifar10"
    assert detect_dataset(write_imagenet64(tmp_path / "i")[0]) == "imagenet64"
    (tmp_path / "f").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "f" / f"{i}.png")
    assert detect_dataset(tmp_path / "f") == "folder"
    Image.new("RGB", (9, 12)).save(tmp_path / "f" / "odd.png")
    assert detect_dataset(tmp_path / "f") == "lsun"
    with pytest.raises(FileNotFoundError, match="not a folder"):
        detect_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--dataset"):
        detect_dataset(tmp_path / "empty")


def test_cm_data_inspect(tmp_path, capsys):
    write_cifar10(tmp_path / "data")
    png = tmp_path / "out" / "preview.png"  # outside the dataset: inside it is refused
    main(["data", "inspect", str(tmp_path / "data"), "--out", str(png), "--num", "8"])
    out = capsys.readouterr().out
    assert "cifar10" in out and "images:     20" in out and "32x32" in out and "10 classes" in out
    assert Image.open(png).size[0] > 32
    (tmp_path / "lsun").mkdir()
    _stripes((40, 20)).save(tmp_path / "lsun" / "a.png")
    main(["data", "inspect", str(tmp_path / "lsun"), "--dataset", "lsun", "--resolution", "8",
          "--out", str(png), "--overwrite"])  # fmt: skip
    assert "images:     1" in capsys.readouterr().out


def test_fit_two_steps_on_cifar10(tmp_path):
    root = write_cifar10(tmp_path / "data")
    net = "--model.init_args.denoiser.init_args.net.init_args"
    args = ["--data.init_args.dataset=cm.data.CIFAR10"]
    args += [f"--data.init_args.dataset.init_args.path={root}", "--data.init_args.resolution=32"]
    args += ["--data.init_args.batch_size=4", f"{net}.img_resolution=32"]
    args += [f"{net}.in_channels=3", f"{net}.out_channels=3"]
    main(fit_args(tmp_path / "run", *args, steps=2))
    samples = np.load(next((tmp_path / "run").glob("**/samples/samples.npz")))["arr_0"]
    assert samples.shape == (12, 32, 32, 3)
    assert next((tmp_path / "run").glob("**/checkpoints/*.ckpt")).is_file()


def test_imagenet64_classes_follow_sorted_wordnet_ids():
    index = imagenet64_class_index()
    assert sorted(index.tolist()) == list(range(1000))  # a permutation
    # label 1 is n02119789 (kit fox, sorted class 278); label 2 n02100735 (English setter, 212)
    assert index[0] == 278 and index[1] == 212
