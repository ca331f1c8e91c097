"""The one VAE path of latent models: ``cm.vae.VAE``, latent denoisers, the latent cache.

A tiny random ``AutoencoderKL`` written with ``save_pretrained`` (``scripts/tiny_vae.py``) runs
the real loading code. The cache must equal, byte for byte, whether it was encoded in one pass,
resumed after a crash, or split over two processes.
"""

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import (
    CONFIGS,
    fails,
    last_ckpt,
    tiny_adm,
    tiny_args,
    write_imagenet_folders,
    write_tiny_vae,
)
from torch.utils.data import Dataset

from cm.cli import main
from cm.data import ImageNet, ImageNetDataset, LatentDataset, Latents, encode_cache, latent_cache
from cm.data.latent_cache import dataset_identity
from cm.errors import UserError
from cm.guidance import cfg
from cm.io import build, export, load
from cm.precond import EDMPrecond
from cm.solvers.sampling import is_latent
from cm.training import ImageDataModule
from cm.vae import VAE

pytest.importorskip("diffusers")
CONFIG = CONFIGS / "latent_digits.yaml"


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny_vae")


@pytest.fixture
def vae(vae_dir) -> VAE:
    return VAE(str(vae_dir))


class Images(Dataset):
    """``n`` random RGB 16x16 images with one-hot labels; raises once at ``crash_at``."""

    def __init__(self, n: int = 14, crash_at: int | None = None, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
        self.y = torch.nn.functional.one_hot(torch.arange(n) % 3, 3).float()
        self.crash_at, self.read = crash_at, []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i == self.crash_at:
            self.crash_at = None
            raise RuntimeError("simulated crash")
        self.read.append(i)
        return self.x[i], self.y[i]


def identity(images: Images) -> dict:
    return dataset_identity(images, "test.Images", {"n": len(images)})


def cache_bytes(cache: Path) -> dict[str, bytes]:
    return {n: (cache / f"{n}.npy").read_bytes() for n in ("moments", "labels")}


# -- the VAE -------------------------------------------------------------------------------------


def test_vae_scaling_is_the_diffusers_posterior(vae):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ae = vae.autoencoder
    with torch.no_grad():
        posterior = ae.encode(x).latent_dist
        sample = posterior.sample(generator=torch.Generator().manual_seed(1))
    assert vae.scaling_factor == pytest.approx(0.18215) and vae.shift_factor == 0
    z = vae.encode(x)
    assert z.shape == (2, 4, 8, 8) and vae.downsample == 2 and vae.latent_channels == 4
    torch.testing.assert_close(z / vae.scaling_factor, posterior.mean)
    drawn = vae.encode(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(drawn / vae.scaling_factor, sample)
    with torch.no_grad():  # decode divides by the same factor: the VAE's own round trip
        own = ae.decode(z / vae.scaling_factor).sample.clamp(-1, 1)
        round_trip = ae.decode(posterior.mean).sample.clamp(-1, 1)
    assert torch.equal(vae.decode(z), own)
    torch.testing.assert_close(vae.decode(vae.encode(x)), round_trip)
    assert vae.decode(z).shape == x.shape
    gray = x[:, :1]  # grayscale is repeated to RGB
    assert torch.equal(vae.encode(gray), vae.encode(gray.expand(-1, 3, -1, -1)))
    shifted = VAE(vae.path, scaling_factor=2.0, shift_factor=0.1)
    torch.testing.assert_close(shifted.encode(x), (posterior.mean - 0.1) * 2.0)
    assert not shifted.train().training and not any(p.requires_grad for p in vae.parameters())


def test_missing_vae_is_one_clear_error(tmp_path, vae_dir, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match=r"No VAE at .*nowhere.*sd-vae-ft-ema"):
        VAE(str(tmp_path / "nowhere"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((vae_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"missing diffusion_pytorch_model.safetensors"):
        VAE(str(tmp_path / "half"))
    vae_arg = "--model.init_args.denoiser.init_args.vae.init_args.path"
    args = tiny_args("fit", tmp_path, f"{vae_arg}={tmp_path / 'nowhere'}", config=CONFIG)
    fails(args, r"No VAE at '.*nowhere' \(missing config.json\): download", capsys)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"pip install diffusers \(the optional extra cm\[sd\]\)"):
        VAE(str(vae_dir))


def test_vae_is_held_outside_the_module_tree(tmp_path, vae, vae_dir):
    net = tiny_adm(in_channels=4, out_channels=4)
    D = EDMPrecond(net, vae=vae)
    assert D.vae is vae and D.latent and is_latent(D) and is_latent(cfg(D, 2.0))
    assert D.state_dict().keys() == {f"net.{k}" for k in net.state_dict()}
    assert sum(p.numel() for p in D.parameters()) == sum(p.numel() for p in net.parameters())
    ema = copy.deepcopy(D)
    assert ema.vae is vae and ema.net is not D.net  # the EMA copy shares the VAE
    z = torch.randn(2, 4, 8, 8)
    assert torch.equal(D.decode(z), vae.decode(z))
    assert not is_latent(EDMPrecond(net)) and not EDMPrecond(net).latent
    with pytest.raises(UserError, match="EDMPrecond has no VAE"):
        EDMPrecond(net).decode(z)
    # an export holds the network's weights only; loading reads the VAE from its folder
    config = {"class_path": "cm.precond.EDMPrecond", "init_args": {
        "net": {"class_path": "cm.networks.ADMUNet", "init_args": {
            "img_resolution": 8, "in_channels": 4, "out_channels": 4, "model_channels": 16,
            "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
            "num_head_channels": 16}},
        "vae": {"class_path": "cm.vae.VAE", "init_args": {"path": str(vae_dir)}},
    }}  # fmt: skip
    built = build(config)
    export(built, tmp_path / "export", config)
    loaded = load(tmp_path / "export")
    assert isinstance(loaded.vae, VAE) and loaded.vae.path == vae.path
    torch.testing.assert_close(loaded.decode(z), vae.decode(z))


def test_stable_diffusion_decodes_through_the_same_vae(tiny_sd):
    from cm.networks.stable_diffusion import StableDiffusionDenoiser

    G = StableDiffusionDenoiser(str(tiny_sd), trainable=True)
    assert isinstance(G.vae, VAE) and G.scaling_factor == pytest.approx(0.18215)
    assert not any(k.startswith("vae.") for k in G.state_dict())
    assert copy.deepcopy(G).vae is G.vae
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(G.decode(z), VAE(str(tiny_sd / "vae")).decode(z))
    legacy = {**G.state_dict(), "vae.encoder.conv_in.weight": torch.zeros(1)}  # VAE a submodule
    G.load_state_dict(legacy)  # old checkpoints still load
    teacher = StableDiffusionDenoiser(str(tiny_sd), load_vae=False)
    assert is_latent(teacher) and teacher.vae is None
    with pytest.raises(UserError, match="built with load_vae=False"):
        teacher.decode(z)


# -- the cache -----------------------------------------------------------------------------------


def test_cache_round_trip_flips_and_reuse(tmp_path, vae):
    images = Images()
    cache = encode_cache(images, vae, tmp_path / "c", identity(images), flip=True, batch_size=4)
    assert sorted(p.name for p in cache.iterdir()) == ["labels.npy", "manifest.json", "moments.npy"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial left
    moments = np.load(cache / "moments.npy")
    assert moments.shape == (2, 14, 2, 4, 8, 8)
    mean, std = vae.moments(images.x)
    flipped, _ = vae.moments(images.x.flip(-1))
    torch.testing.assert_close(torch.from_numpy(moments[0, :, 0]), mean)
    torch.testing.assert_close(torch.from_numpy(moments[0, :, 1]), std)
    torch.testing.assert_close(torch.from_numpy(moments[1, :, 0]), flipped)
    ds = LatentDataset(cache, vae.scaling_factor, sample="mean")
    z, y = ds[5]
    torch.testing.assert_close(z, vae.encode(images.x[5:6])[0])
    assert torch.equal(y, images.y[5]) and (ds.resolution, ds.channels, ds.label_dim) == (8, 4, 3)
    ident = identity(images)
    images.read.clear()  # a finished cache is reused as it is, flips serve flip=False too
    encode_cache(images, vae, tmp_path / "c", ident, flip=False, batch_size=4)
    assert images.read == []


def test_interrupted_encode_resumes_bit_for_bit(tmp_path, vae):
    whole = encode_cache(Images(), vae, tmp_path / "whole", identity(Images()), batch_size=4)
    images = Images(crash_at=9)
    ident = identity(images)
    with pytest.raises(RuntimeError, match="simulated crash"):
        encode_cache(images, vae, tmp_path / "resumed", ident, batch_size=4)
    assert not (tmp_path / "resumed").exists()  # nothing half-written under the cache's name
    part = tmp_path / ".resumed.partial"
    assert sorted(p.name for p in (part / "done").iterdir()) == ["00000000", "00000001"]
    images.read.clear()
    encode_cache(images, vae, tmp_path / "resumed", ident, batch_size=4)
    assert images.read == list(range(8, 14))  # chunks 0 and 1 were not encoded again
    assert cache_bytes(tmp_path / "resumed") == cache_bytes(whole) and not part.exists()


def test_a_crash_in_the_final_rename_neither_breaks_nor_reencodes(tmp_path, vae, monkeypatch):
    # The manifest is written, then the rename fails: the next call only renames.
    whole = encode_cache(Images(), vae, tmp_path / "whole", identity(Images()), batch_size=4)
    images = Images()
    real_replace = latent_cache.os.replace

    def crash(src, dst):  # only the rename of the finished partial cache fails
        if str(src).endswith(".partial"):
            raise OSError("simulated crash during the rename")
        real_replace(src, dst)

    monkeypatch.setattr(latent_cache.os, "replace", crash)
    with pytest.raises(UserError, match="simulated crash during the rename"):
        encode_cache(images, vae, tmp_path / "c", identity(images), batch_size=4)
    assert not (tmp_path / "c").exists()
    monkeypatch.setattr(latent_cache.os, "replace", real_replace)
    ident = identity(images)
    images.read.clear()
    encode_cache(images, vae, tmp_path / "c", ident, batch_size=4)
    assert images.read == []  # nothing encoded again
    assert cache_bytes(tmp_path / "c") == cache_bytes(whole)
    assert not (tmp_path / "c" / "done").exists() and not (tmp_path / ".c.partial").exists()


def test_short_writes_are_completed(tmp_path, monkeypatch):
    # pwrite may write fewer bytes than asked (a full disk): the writer writes the rest.
    real_pwrite = latent_cache.os.pwrite

    def short(fd, data, at):
        return real_pwrite(fd, data[:3], at)

    monkeypatch.setattr(latent_cache.os, "pwrite", short)
    path = tmp_path / "moments.npy"
    np.lib.format.open_memmap(path, "w+", np.float32, (4, 5))
    np.lib.format.open_memmap(tmp_path / "labels.npy", "w+", np.float32, (4,))
    rows = np.arange(10, dtype=np.float32).reshape(2, 5)
    latent_cache._Writer(tmp_path).write("moments", (1,), rows)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(path)[1:3], np.arange(10).reshape(2, 5))


def test_a_cache_of_other_inputs_is_refused(tmp_path, vae, vae_dir):
    images = Images()
    encode_cache(images, vae, tmp_path / "c", identity(images), batch_size=4)
    other = VAE(str(write_tiny_vae(tmp_path / "other_vae", seed=1)))
    with pytest.raises(UserError, match=r"built from another VAE encoder .*other_vae"):
        encode_cache(images, other, tmp_path / "c", identity(images), batch_size=4)
    new = Images(seed=1)
    with pytest.raises(UserError, match=r"another dataset \(other images, not these\)"):
        encode_cache(new, vae, tmp_path / "c", identity(new), batch_size=4)
    with pytest.raises(UserError, match="no latents of flipped images"):
        encode_cache(images, vae, tmp_path / "c", identity(images), flip=True, batch_size=4)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a finished latent cache"):
        encode_cache(images, vae, tmp_path / "busy", identity(images), batch_size=4)
    assert (tmp_path / "busy" / "x.txt").read_text() == "mine"


def _encode_rank(rank: int, store: str, cache: str, vae_path: str) -> None:
    """One rank of the 2-process gloo encode."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        images = Images()
        encode_cache(images, VAE(vae_path), cache, identity(images), flip=True, batch_size=4)
    finally:
        dist.destroy_process_group()


def test_two_process_encode_matches_one_process(tmp_path, vae, vae_dir):
    one = encode_cache(Images(), vae, tmp_path / "one", identity(Images()), True, batch_size=4)
    args = (str(tmp_path / "store"), str(tmp_path / "two"), str(vae_dir))
    mp.spawn(_encode_rank, args=args, nprocs=2, join=True)
    assert cache_bytes(tmp_path / "two") == cache_bytes(one)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest == json.loads((one / "manifest.json").read_text())


def test_latent_items_are_drawn_from_the_seeded_rng(tmp_path, vae):
    images = Images()
    cache = encode_cache(images, vae, tmp_path / "c", identity(images), flip=True, batch_size=4)
    ds = LatentDataset(cache, vae.scaling_factor, flip=True)
    moments = torch.from_numpy(np.load(cache / "moments.npy"))

    def item(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)  # as StepStream seeds each sample
        return ds[3][0]

    assert torch.equal(item(0), item(0))
    drawn = set()
    for seed in range(8):
        torch.manual_seed(seed)
        variant = int(torch.rand(()) < 0.5)
        mean, std = moments[variant, 3]
        expected = (mean + std * torch.randn_like(mean)) * 0.18215
        torch.testing.assert_close(item(seed), expected)
        drawn.add(variant)
    assert drawn == {0, 1}  # both the image's and its mirror's latents


def _digits():
    from cm.data import Digits

    return Digits(resolution=16)


def test_latents_source_in_the_datamodule(tmp_path, vae, vae_dir):
    source = Latents(_digits(), vae, str(tmp_path / "cache"), sample="mean", batch_size=512)
    dm = ImageDataModule(source, resolution=8, batch_size=4)
    assert (dm.resolution, dm.channels, dm.label_dim, dm.vae) == (8, 4, 10, vae)
    assert not (tmp_path / "cache").exists()  # sizes are known before encoding
    dm.setup("fit")
    z, y = dm.train_set[0]
    assert z.shape == (4, 8, 8) and y.shape == (10,)
    digit = source.pixels()[0][0]
    torch.testing.assert_close(z, vae.encode(digit[None])[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(UserError, match=r"16x16 images into 8x8 latents but .*resolution is 4"):
        ImageDataModule(source, resolution=4)
    with pytest.raises(UserError, match="is inside an input"):
        Latents(_digits(), vae, str(vae_dir / "cache"))


def test_imagenet_class_folders(tmp_path):
    root = write_imagenet_folders(tmp_path / "ilsvrc")
    ds = ImageNet(str(root), resolution=32).load(None, False, True)
    assert isinstance(ds, ImageNetDataset) and len(ds) == 3 and ds.label_dim == 1000
    x, y = ds[2]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert [int(ds[i][1].argmax()) for i in range(3)] == [0, 0, 999]  # sorted wnids
    assert ImageNet(str(root / "train")).size(None) == 256
    with pytest.raises(FileNotFoundError, match=r"No ImageNet .* ILSVRC2012_img_train.tar"):
        ImageNetDataset(str(tmp_path / "missing"))
    (root / "train" / "n99999999").mkdir()
    with pytest.raises(UserError, match="n99999999' is not one of the 1000 ILSVRC2012 classes"):
        ImageNetDataset(str(root))


def test_latent_digits_fit_and_cm_sample_decode(tmp_path, vae_dir, capsys):
    paths = [
        f"--model.init_args.denoiser.init_args.vae.init_args.path={vae_dir}",
        f"--data.init_args.dataset.init_args.vae.init_args.path={vae_dir}",
        f"--data.init_args.dataset.init_args.cache={tmp_path / 'latents'}",
    ]
    wrong = "--model.init_args.denoiser.init_args.net.init_args.img_resolution=16"
    fails(tiny_args("fit", tmp_path, *paths, wrong, config=CONFIG),
          r"The latent data .* has resolution 8 but .* to 8 \(images of 16 px through a VAE "
          r"that downsamples 2x\)", capsys)  # fmt: skip
    no_vae = tmp_path / "no_vae.yaml"
    no_vae.write_text("model: {init_args: {denoiser: {init_args: {vae: null}}}}")
    fails(tiny_args("fit", tmp_path, *paths, "--config", str(no_vae), config=CONFIG),
          r"The data are VAE latents .* but the denoiser has no VAE", capsys)  # fmt: skip
    main(tiny_args("fit", tmp_path, *paths, "--trainer.max_steps=1", config=CONFIG))
    ckpt = last_ckpt(tmp_path)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any("vae" in k or "autoencoder" in k for k in state)
    (samples,) = tmp_path.glob("**/samples/samples.npz")
    assert np.load(samples)["arr_0"].shape == (12, 16, 16, 3)  # decoded pixels
    out = tmp_path / "s.npz"
    args = ["sample", "--ckpt_path", str(ckpt), "--num", "3", "--steps", "2", "--device", "cpu"]
    main([*args, "--out", str(out)])
    images = np.load(out)["arr_0"]
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
