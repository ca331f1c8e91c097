import itertools
import json
import zipfile

import numpy as np
import pytest
import torch
import yaml
from helpers import ICT_DIGITS
from PIL import Image

from cm.cli import main
from cm.data import Digits, DigitsDataset, FolderDataset, ImageFolder, Mixture, MixtureDataset
from cm.training.datamodule import ImageDataModule


def _write_images(root, n=6, size=8, mode="RGB", labels=True):
    """EDM dataset_tool.py layout: 00000/img00000000.png ... plus dataset.json."""
    rng = np.random.default_rng(0)
    (root / "00000").mkdir(parents=True)
    entries = []
    for i in range(n):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        name = f"00000/img{i:08d}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name)
        entries.append([name, i % 3])
    if labels is not None:
        (root / "dataset.json").write_text(json.dumps({"labels": entries if labels else None}))
    return root


def _zip(folder, target):
    with zipfile.ZipFile(target, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(folder).as_posix())
    return target


def test_digits():
    ds = DigitsDataset()
    assert len(ds) == 1797
    assert (ds.resolution, ds.channels, ds.label_dim) == (8, 1, 10)
    x, y = ds[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert ds.images.min() == -1 and ds.images.max() == 1
    assert y.shape == (10,) and y.sum() == 1
    assert set(ds.labels.argmax(1).tolist()) == set(range(10))

    big = DigitsDataset(resolution=16)
    assert big[0][0].shape == (1, 16, 16)
    assert big.images.min() >= -1 and big.images.max() <= 1
    assert DigitsDataset(use_labels=False)[0][1].shape == (0,)


def test_flip_is_a_mirror():
    ds = DigitsDataset(flip=True)
    torch.manual_seed(0)
    views = {tuple(ds[3][0].flatten().tolist()) for _ in range(20)}
    assert views == {
        tuple(ds.images[3].flatten().tolist()),
        tuple(ds.images[3].flip(-1).flatten().tolist()),
    }


def test_mixture_labels_match_components():
    ds = MixtureDataset(num_samples=500, num_components=4, resolution=4, channels=3, std=0.05)
    assert len(ds) == 500 and ds[0][0].shape == (3, 4, 4)
    assert ds.label_dim == 4 and ds.mixture.num_components == 4
    labels = ds.labels.argmax(1)
    # Well-separated components: the exact posterior at tiny sigma recovers each sample's label.
    post = ds.mixture.log_responsibilities(ds.images, 1e-3).argmax(1)
    assert torch.equal(post, labels)
    again = MixtureDataset(num_samples=500, num_components=4, resolution=4, channels=3, std=0.05)
    assert torch.equal(again.images, ds.images)


@pytest.mark.parametrize("as_zip", [False, True])
def test_folder_with_labels(tmp_path, as_zip):
    root = _write_images(tmp_path / "imgs")
    path = _zip(root, tmp_path / "imgs.zip") if as_zip else root
    ds = FolderDataset(str(path))
    assert len(ds) == 6 and (ds.resolution, ds.channels, ds.label_dim) == (8, 3, 3)
    x, y = ds[4]
    ref = np.asarray(Image.open(root / "00000/img00000004.png"), dtype=np.float32)
    assert x.shape == (3, 8, 8) and torch.allclose(
        x, torch.from_numpy(ref / 127.5 - 1).permute(2, 0, 1)
    )
    assert y.tolist() == [0.0, 1.0, 0.0]
    assert FolderDataset(str(path), use_labels=False)[0][1].shape == (0,)


def test_folder_zip_reopens_after_pickle(tmp_path):
    import pickle

    path = _zip(_write_images(tmp_path / "imgs"), tmp_path / "imgs.zip")
    ds = FolderDataset(str(path))
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[1][0], ds[1][0])


@pytest.mark.parametrize("labels", [None, False])
def test_folder_unlabelled_grayscale(tmp_path, labels):
    root = _write_images(tmp_path / "imgs", mode="L", labels=labels)
    ds = FolderDataset(str(root), resolution=8)
    assert (ds.channels, ds.label_dim) == (1, 0)
    x, y = ds[0]
    assert x.shape == (1, 8, 8) and x.min() >= -1 and x.max() <= 1 and y.shape == (0,)


def test_folder_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FolderDataset(str(missing))
    root = _write_images(tmp_path / "imgs", size=16)
    with pytest.raises(ValueError, match="16x16.*8x8.*dataset_tool"):
        FolderDataset(str(root), resolution=8)
    Image.new("RGB", (12, 12)).save(root / "00000" / "odd.png")
    ds = FolderDataset(str(root), use_labels=False)
    odd = ds.fnames.index("00000/odd.png")
    with pytest.raises(ValueError, match="one size"):
        ds[odd]


def test_datamodule_digits():
    dm = ImageDataModule(batch_size=32)
    assert (dm.resolution, dm.channels, dm.label_dim) == (8, 1, 10)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32, 10)
    assert dm.val_dataloader() == []


def test_datamodule_mixture_and_split():
    dm = ImageDataModule(
        Mixture(num_samples=100, num_components=3, channels=3),
        resolution=4,
        batch_size=8,
        use_labels=False,
        val_fraction=0.2,
    )
    assert (dm.resolution, dm.channels, dm.label_dim) == (4, 3, 0)
    dm.setup("fit")
    assert len(dm.train_set) == 80 and len(dm.val_set) == 20
    assert set(dm.train_set.indices).isdisjoint(dm.val_set.indices)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 4, 4) and y.shape == (8, 0)
    # the training stream is endless; one epoch (10 batches of 8) visits every image once
    batches = list(itertools.islice(iter(dm.train_dataloader()), 10))
    seen = torch.cat([b[0] for b in batches]).flatten(1)
    train = torch.stack([dm.train_set[i][0] for i in range(80)]).flatten(1)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, train.tolist()))


def test_datamodule_folder(tmp_path):
    root = _write_images(tmp_path / "imgs", n=8)
    with pytest.raises(ValueError, match=r"'folder' is not a dataset.*cm\.data\.CIFAR10"):
        ImageDataModule("folder")  # the old short names of datasets with files say the new syntax
    dm = ImageDataModule(ImageFolder(str(root)), batch_size=4)  # resolution from the files
    assert (dm.resolution, dm.channels, dm.label_dim) == (8, 3, 3)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and y.shape == (4, 3)
    with pytest.raises(ValueError, match="batch_size"):
        ImageDataModule(ImageFolder(str(root)), batch_size=64).train_dataloader()


def test_datamodule_resolution_once():
    """A resizable dataset takes the DataModule's resolution; two different sizes are an error."""
    assert ImageDataModule(Digits(16)).resolution == 16
    assert ImageDataModule("digits", resolution=16).full_dataset[0][0].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="give the size once"):
        ImageDataModule(Digits(16), resolution=8)


def test_step_stream_ranks_workers_and_resume():
    from torch.utils.data import DataLoader

    from cm.data.stream import StepStream

    ds = DigitsDataset(flip=True)

    def batches(n, **kw):
        loader = DataLoader(
            StepStream(ds, 8, seed=3, **{k: v for k, v in kw.items() if k != "workers"}),
            batch_size=8,
            num_workers=kw.get("workers", 0),
        )
        return [b[0] for b in itertools.islice(iter(loader), n)]

    base = batches(6)
    # two workers interleave in step order; flips depend only on (seed, position in the stream)
    assert all(torch.equal(a, b) for a, b in zip(base, batches(6, workers=2), strict=True))
    # resuming at step 4 gives steps 4 and 5 again
    assert all(torch.equal(a, b) for a, b in zip(base[4:], batches(2, start_step=4), strict=True))
    # two ranks split a global batch of 16 without overlap
    s0, s1 = StepStream(ds, 8, 3, 0, 0, 2), StepStream(ds, 8, 3, 0, 1, 2)
    assert not set(s0.indices(5)) & set(s1.indices(5))


def test_dataset_object_on_the_command_line(capsys):
    """``--data.init_args.dataset`` switches the class; the old flat options are refused."""
    data = "--data.init_args.dataset"
    args = ["fit", "--config", ICT_DIGITS, f"{data}=cm.data.Mixture"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, f"{data}.init_args.num_components=4", "--print_config"])
    assert exit_info.value.code == 0
    dataset = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["dataset"]
    assert dataset["class_path"] == "cm.data.Mixture"
    assert dataset["init_args"]["num_components"] == 4
    # a data: section of older configs: one error line naming the key
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", ICT_DIGITS, "--data.init_args.num_components=4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'num_components' is not accepted" in err
    assert "--data.init_args.dataset.init_args.path DIR" in err  # says where the option went
