"""diffusers interop (issue 19): cm export --format diffusers, diffusers folders and Hub ids in.

The round trips run diffusers itself: ``ConsistencyModelPipeline.from_pretrained`` on what cm
wrote, and cm on what ``save_pretrained`` wrote, each compared with the other's forward.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import CONFIGS, fit, last_ckpt, write_hf_snapshot

from cm.checkpoint import load_denoiser
from cm.cli import main
from cm.diffusers_io import export_pipeline, load_pipeline
from cm.diffusers_layout import adm_init_args, from_diffusers, to_diffusers, unet_config
from cm.errors import UserError
from cm.networks import ADMUNet
from cm.networks.stable_diffusion import StableDiffusionDenoiser
from cm.precond import ConsistencyPrecond, EDMPrecond, VPPrecond
from cm.solvers import ddim
from cm.solvers.sampling import Sampler
from cm.teacher import PretrainedDenoiser

diffusers = pytest.importorskip("diffusers")

# The tiny quickstart's ADMUNet (tests/tiny.yaml: 16 and 32 channels) needs one GroupNorm group
# count to be a UNet2DModel: 16 groups everywhere.
GROUPS = "--model.init_args.denoiser.init_args.net.init_args.num_groups=16"
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "num_class_embeds": 10,
    "block_out_channels": [16, 32],
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "attn_norm_num_groups": 8,
    "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "resnet_time_scale_shift": "scale_shift",
    "upsample_type": "resnet",
    "downsample_type": "resnet",
}


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give every parameter random values (zero-initialised output layers hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def saved_pipeline(path, scheduler) -> "diffusers.DiffusionPipeline":
    """A random ADM-style UNet2DModel with ``scheduler``, saved by diffusers at ``path``."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**TINY_UNET)
    randomize(unet, 1)
    pipe = diffusers.ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(path)
    return pipe


def diffusers_denoise(unet, scheduler, x, sigma, classes):
    """``D(x; sigma)`` from diffusers' own pieces: the scheduler's scalings around the UNet."""
    if isinstance(scheduler, diffusers.CMStochasticIterativeScheduler):
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition(sigma)
        t = scheduler.sigma_to_t(np.array([sigma]))
        x_in = x / (sigma**2 + scheduler.config.sigma_data**2) ** 0.5
        out = unet(x_in, torch.tensor(t, dtype=torch.float32), class_labels=classes).sample
        return c_skip * x + c_out * out
    s = torch.tensor(sigma)
    x_in = scheduler.precondition_inputs(x, s)
    out = unet(x_in, scheduler.precondition_noise(s), class_labels=classes).sample
    return scheduler.precondition_outputs(x, out, s)


def test_unet_keys_and_outputs_match_diffusers_for_every_layout():
    """ADMUNet -> UNet2DModel: same function, both resampling kinds and both embeddings."""
    x, c = torch.randn(3, 1, 8, 8), torch.tensor([-500.0, 10.0, 900.0])
    y = torch.tensor([1, 4, 7])
    for updown in (True, False):
        for scale_shift in (True, False):
            net = ADMUNet(
                img_resolution=8, in_channels=1, out_channels=1, label_dim=10,
                model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                attention_resolutions=[4], num_head_channels=16, num_groups=16,
                resblock_updown=updown, use_scale_shift_norm=scale_shift,
            ).eval()
            randomize(net)
            config = {k: v for k, v in unet_config(net).items() if not k.startswith("_")}
            unet = diffusers.UNet2DModel(**config).eval()
            unet.load_state_dict(to_diffusers(net), strict=True)
            with torch.no_grad():
                ours = net(x, c, F.one_hot(y, 10).float())
                theirs = unet(x, c, class_labels=y).sample
            torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)


def test_fit_export_diffusers_pipeline_samples_equal_cm_sample(tmp_path):
    """cm fit -> cm export --format diffusers -> ConsistencyModelPipeline == cm sample per seed."""
    fit(tmp_path, 2, GROUPS)
    ckpt = last_ckpt(tmp_path)
    state = torch.load(ckpt, weights_only=False)  # a test fixture we wrote ourselves
    g = torch.Generator().manual_seed(0)
    for k, v in state["state_dict"].items():  # trained weights that make every layer count
        if k.startswith(("ema_denoiser.", "denoiser.")) and v.is_floating_point():
            v.copy_(torch.randn(v.shape, generator=g) * 0.3)
    torch.save(state, ckpt)

    out = tmp_path / "hf"
    main(["export", "--ckpt_path", str(ckpt), "--out", str(out), "--format", "diffusers"])
    assert {p.name for p in out.iterdir()} >= {"model_index.json", "unet", "scheduler", "README.md"}
    card = (out / "README.md").read_text()
    assert "Steps: 2" in card and "cm fit --config training_config.yaml" in card
    assert (out / "training_config.yaml").is_file()

    num = 4
    main(["sample", "--ckpt_path", str(ckpt), "--num", str(num), "--out", str(tmp_path / "s.npz")])
    ours = np.load(tmp_path / "s.npz")["arr_0"].astype(int)  # [N, 8, 8, 1]
    pipe = diffusers.ConsistencyModelPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    for seed in range(num):  # cm sample: seed s draws its noise from manual_seed(s), class s % 10
        image = pipe(
            batch_size=1,
            class_labels=[seed % 10],
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        ).images[0]
        theirs = (image * 255).round().permute(1, 2, 0).numpy().astype(int)
        assert np.abs(theirs - ours[seed]).max() <= 1, seed
        assert ours[seed].std() > 3  # not a flat image: the network's output matters

    # ... and the folder itself loads back in cm (auto-detected), sampling the same images
    main(["sample", "--ckpt_path", str(out), "--num", str(num), "--out", str(tmp_path / "b.npz")])
    back = np.load(tmp_path / "b.npz")["arr_0"].astype(int)
    assert np.abs(back - ours).max() <= 1


def test_saved_pretrained_folder_loads_as_model_and_teacher(tmp_path):
    """save_pretrained folders (CM and EDM schedulers) == diffusers' forward, in cm."""
    x, classes = torch.randn(2, 1, 8, 8), torch.tensor([3, 8])
    cases = {
        "cm": diffusers.CMStochasticIterativeScheduler(sigma_min=0.002, sigma_max=80.0),
        "edm": diffusers.EDMEulerScheduler(sigma_data=0.5),
    }
    for name, scheduler in cases.items():
        pipe = saved_pipeline(tmp_path / name, scheduler)
        denoiser, hparams = load_denoiser(tmp_path / name)
        expected = ConsistencyPrecond if name == "cm" else EDMPrecond
        assert type(denoiser) is expected
        teacher = PretrainedDenoiser(str(tmp_path / name))
        for sigma in (80.0, 2.5, 0.1):
            with torch.no_grad():
                theirs = diffusers_denoise(pipe.unet, pipe.scheduler, x, sigma, classes)
                ours = denoiser(x, torch.full((2,), sigma), F.one_hot(classes, 10).float())
                taught = teacher(x, torch.full((2,), sigma), F.one_hot(classes, 10).float())
            torch.testing.assert_close(ours, theirs, atol=5e-5, rtol=1e-4)
            assert torch.equal(ours, taught)
        assert hparams["sampler"]["init_args"]["num_steps"] == (1 if name == "cm" else 18)


def test_saved_pretrained_consistency_model_samples_in_cm(tmp_path):
    """cm sample on a save_pretrained ConsistencyModelPipeline == the pipeline, per seed."""
    pipe = saved_pipeline(tmp_path / "cmp", diffusers.CMStochasticIterativeScheduler())
    pipe.set_progress_bar_config(disable=True)
    main(["sample", "--ckpt_path", str(tmp_path / "cmp"), "--num", "3",
          "--out", str(tmp_path / "s.npz")])
    ours = np.load(tmp_path / "s.npz")["arr_0"].astype(int)
    for seed in range(3):
        image = pipe(batch_size=1, class_labels=[seed % 10], output_type="pt",
                     generator=torch.Generator().manual_seed(seed)).images[0]
        theirs = (image * 255).round().permute(1, 2, 0).numpy().astype(int)
        assert np.abs(theirs - ours[seed]).max() <= 1


def test_diffusers_folder_as_cd_teacher_trains(tmp_path):
    """An EDM-scheduled save_pretrained folder is the CD teacher of configs/cd_digits.yaml."""
    saved_pipeline(tmp_path / "teacher", diffusers.EDMEulerScheduler(sigma_data=0.5))
    net = "--model.init_args.denoiser.init_args.net.init_args"
    main([
        "fit", "--config", "configs/cd_digits.yaml", "--config", "tests/tiny.yaml",
        "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--model.init_args.objective.init_args.teacher.init_args.path={tmp_path / 'teacher'}",
        f"{net}.model_channels=16", f"{net}.num_res_blocks=1", f"{net}.num_head_channels=8",
        f"{net}.num_groups=8", "--model.init_args.objective.init_args.num_scales=4",
    ])
    assert last_ckpt(tmp_path).is_file()


def hub_cache(tmp_path, folder, repo="openai/diffusers-cd-tiny"):
    """Put ``folder`` into the test's Hugging Face cache (conftest) as ``repo``'s snapshot."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    write_hf_snapshot(tmp_path / "hf-cache", repo, files)
    return tmp_path / "hf-cache"


def test_hub_id_loads_offline_from_the_cache_and_a_missing_one_is_clear(
    tmp_path, monkeypatch, capsys
):
    """cm sample --ckpt_path OWNER/NAME reads the HF cache offline; absent, one clear error."""
    saved_pipeline(tmp_path / "cmp", diffusers.CMStochasticIterativeScheduler())
    cache = hub_cache(tmp_path, tmp_path / "cmp")
    monkeypatch.chdir(tmp_path)  # no local folder named like the id
    main(["sample", "--denoiser", "openai/diffusers-cd-tiny", "--num", "2",  # the form
          "--out", str(tmp_path / "s.npz")])
    main(["sample", "--ckpt_path", "openai/diffusers-cd-tiny", "--num", "2",
          "--out", str(tmp_path / "c.npz")])
    direct = np.load(tmp_path / "s.npz")["arr_0"]
    assert np.array_equal(direct, np.load(tmp_path / "c.npz")["arr_0"])
    main(["sample", "--ckpt_path", str(tmp_path / "cmp"), "--num", "2",
          "--out", str(tmp_path / "d.npz")])
    assert np.array_equal(direct, np.load(tmp_path / "d.npz")["arr_0"])
    with pytest.raises(FileNotFoundError) as error:
        load_denoiser("openai/diffusers-cd_imagenet64_l2")
    message = str(error.value)
    assert "openai/diffusers-cd_imagenet64_l2" in message and str(cache) in message
    with pytest.raises(SystemExit):
        main(["sample", "--num", "2", "--out", str(tmp_path / "x.npz")])
    assert "error: cm sample needs --ckpt_path" in capsys.readouterr().err


def test_exports_diffusers_cannot_express_are_one_clear_error(tmp_path):
    """A c_noise or network diffusers' pipeline cannot express: a UserError, nothing written."""
    net = ADMUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=16,
                  channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4],
                  num_head_channels=16, num_groups=16)
    with pytest.raises(UserError, match="noise_scale 250"):
        export_pipeline(ConsistencyPrecond(net, noise_scale=0.25), tmp_path / "a")
    with pytest.raises(UserError, match="no diffusers pipeline"):
        export_pipeline(EDMPrecond(net), tmp_path / "b")
    mixed = ADMUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=16,
                    channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4],
                    num_head_channels=16)  # 16 groups at 16 channels, 32 at 32
    with pytest.raises(UserError, match="num_groups"):
        export_pipeline(ConsistencyPrecond(mixed), tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_bad_diffusers_folders_are_clear(tmp_path):
    """A folder with pickled weights, a foreign scheduler or a wrong config says what is wrong."""
    saved_pipeline(tmp_path / "p", diffusers.CMStochasticIterativeScheduler())
    weights = tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(FileNotFoundError, match="pickled .bin"):
        load_pipeline(tmp_path / "p")
    saved_pipeline(tmp_path / "ddpm", diffusers.DDPMScheduler())  # Ho et al.'s betas: cm's
    assert type(load_pipeline(tmp_path / "ddpm")[0]) is VPPrecond
    saved_pipeline(tmp_path / "sl", diffusers.DDPMScheduler(beta_schedule="scaled_linear"))
    with pytest.raises(UserError, match="scaled_linear betas"):
        load_pipeline(tmp_path / "sl")
    saved_pipeline(tmp_path / "q", diffusers.PNDMScheduler())
    with pytest.raises(UserError, match="PNDMScheduler"):
        load_pipeline(tmp_path / "q")
    config = tmp_path / "q" / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "flip_sin_to_cos": False}))
    with pytest.raises(UserError, match="flip_sin_to_cos"):
        load_pipeline(tmp_path / "q")


def test_push_to_hub_uploads_the_export_folder(tmp_path, monkeypatch):
    """cm export --push_to_hub uploads exactly the written folder (push_folder faked here)."""
    fit(tmp_path, 2, "--trainer.log_every_n_steps=1")
    pushed = {}

    def fake_push(folder, repo_id, private=False):
        pushed.update(files=sorted(p.name for p in folder.iterdir()), repo=repo_id, private=private)
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr("cm.commands.export.push_folder", fake_push)
    out = tmp_path / "export"
    main(["export", "--ckpt_path", str(last_ckpt(tmp_path)), "--out", str(out),
          "--push_to_hub", "me/tiny-ct", "--private", "true"])
    assert pushed == {
        "files": ["README.md", "config.json", "model.safetensors", "training_config.yaml"],
        "repo": "me/tiny-ct",
        "private": True,
    }
    card = (out / "README.md").read_text()  # the metrics logged during training, the steps
    assert "| train/loss |" in card and "Steps: 2" in card and "library_name: cm" in card


def test_published_imagenet64_layout_maps_onto_the_cm_teacher_config():
    """openai/diffusers-cd_imagenet64_l2's UNet2DModel (on meta) == configs/teachers' ADMUNet."""
    config = {  # diffusers' scripts/convert_consistency_to_diffusers.py, IMAGENET_64_UNET_CONFIG
        **TINY_UNET,
        "sample_size": 64, "in_channels": 3, "out_channels": 3, "layers_per_block": 3,
        "num_class_embeds": 1000, "block_out_channels": [192, 384, 576, 768],
        "attention_head_dim": 64, "norm_num_groups": 32, "attn_norm_num_groups": 32,
        "down_block_types": ["ResnetDownsampleBlock2D"] + ["AttnDownBlock2D"] * 3,
        "up_block_types": ["AttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
    }
    teacher = yaml.safe_load((CONFIGS / "teachers" / "openai_cd_imagenet64.yaml").read_text())
    init = adm_init_args(config, "published")
    assert {**teacher["init_args"]["net"]["init_args"], "num_groups": 32} == init
    with torch.device("meta"):
        unet = diffusers.UNet2DModel(**config)
        net = ADMUNet(**init)
    state = from_diffusers(unet.state_dict(), net, "published")  # every key, every shape
    assert state.keys() == net.state_dict().keys()
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in unet.parameters())


def test_stable_diffusion_and_teachers_by_hub_id(tmp_path, tiny_sd):
    """An SD pipeline and a CM teacher named by Hub id come from the HF cache, offline."""
    hub_cache(tmp_path, tiny_sd, "stable-diffusion-v1-5/tiny")
    by_id = StableDiffusionDenoiser("stable-diffusion-v1-5/tiny", load_vae=True)
    local = StableDiffusionDenoiser(str(tiny_sd), load_vae=True)
    z, context = torch.randn(1, 4, 8, 8), torch.randn(1, 3, local.net.context_dim)
    with torch.no_grad():
        assert torch.equal(by_id(z, 5.0, context), local(z, 5.0, context))
    saved_pipeline(tmp_path / "cmp", diffusers.CMStochasticIterativeScheduler())
    hub_cache(tmp_path, tmp_path / "cmp")
    teacher = PretrainedDenoiser("openai/diffusers-cd-tiny")
    assert isinstance(teacher.module, ConsistencyPrecond)
    with pytest.raises(FileNotFoundError, match="hf download stable-diffusion-v1-5/absent"):
        StableDiffusionDenoiser("stable-diffusion-v1-5/absent")


def test_ddpm_model_exports_as_ddim_pipeline_and_loads_back(tmp_path):
    """An unconditional VPPrecond: DDIMPipeline (eta 0) == cm's ddim on the same timesteps."""
    net = ADMUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=16,
                  channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4],
                  num_head_channels=16, num_groups=16)
    randomize(net, 3, 0.1)
    denoiser = VPPrecond(net).eval()
    export_pipeline(denoiser, tmp_path / "ddim")
    pipe = diffusers.DDIMPipeline.from_pretrained(tmp_path / "ddim")
    pipe.set_progress_bar_config(disable=True)
    steps = 10  # DDIMScheduler's "leading" timesteps 900, 800, ..., 0, then x0
    sigmas = denoiser.sigmas[torch.arange(900, -1, -100)].tolist()
    ours = Sampler(ddim, sigmas=sigmas).generate(denoiser, [0, 1], (1, 8, 8))[0]
    for seed in (0, 1):
        theirs = pipe(batch_size=1, generator=torch.Generator().manual_seed(seed), eta=0.0,
                      num_inference_steps=steps, output_type="np").images[0]
        # cm starts at sigma_900 z, DDIM at x_vp = z: sqrt(1 - abar_900) = 0.99994 apart
        expected = torch.from_numpy(theirs).permute(2, 0, 1) * 2 - 1
        torch.testing.assert_close(ours[seed], expected, atol=2e-3, rtol=0)
        assert ours[seed].std() > 0.1
    back, hparams = load_pipeline(tmp_path / "ddim")
    assert type(back) is VPPrecond and back.schedule == "linear"
    assert hparams["sampler"]["init_args"]["solver"] == "cm.solvers.ddim"
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(back(x, 3.0), denoiser(x, 3.0))
    conditional = VPPrecond(ADMUNet(img_resolution=8, in_channels=1, out_channels=1,
                                    label_dim=10, model_channels=16, channel_mult=[1, 2],
                                    num_res_blocks=1, num_head_channels=16, num_groups=16))
    with pytest.raises(UserError, match="unconditional models only"):
        export_pipeline(conditional, tmp_path / "c")
