"""Zero-shot editing (Song et al. 2023, Alg. 4) against exact mixture denoisers, and ``cm edit``."""

from argparse import ArgumentError

import numpy as np
import pytest
import torch
from helpers import fit, last_ckpt

from cm.editing import (
    Colorize,
    Inpaint,
    ODEConsistency,
    SuperRes,
    colorization_matrix,
    dense,
    edit,
    half_mask,
    slerp,
    start,
    superres_matrix,
)
from cm.oracle import GaussianMixture, RandomGaussianMixture
from cm.schedules import karras_sigmas
from cm.solvers import SeededNoise, euler, heun
from cm.solvers.consistency import multistep

LUMA = torch.tensor([0.2989, 0.5870, 0.1140], dtype=torch.float64)


def openai_matrix(first: np.ndarray) -> np.ndarray:
    """openai/consistency_models' ``obtain_orthogonal_matrix``, written out in numpy."""
    vector = first / np.linalg.norm(first)
    matrix = np.eye(len(first))
    matrix[:, 0] = vector
    matrix = np.linalg.qr(matrix)[0]
    return -matrix if np.sum(matrix[:, 0]) < 0 else matrix


def nearest(x: torch.Tensor, gm: GaussianMixture) -> torch.Tensor:
    return torch.cdist(x.double().flatten(1), gm.means.flatten(1)).argmin(1)


def patch_means(x: torch.Tensor, p: int) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(x, p)


OPERATORS = {
    "inpaint": (lambda: Inpaint(half_mask("right", 4)), (3, 4, 4)),
    "inpaint_random": (lambda: Inpaint((torch.rand(1, 4, 4) > 0.5).float()), (2, 4, 4)),
    "colorize": (Colorize, (3, 4, 4)),
    "superres2": (lambda: SuperRes(2), (3, 4, 4)),
    "superres4": (lambda: SuperRes(4), (1, 8, 8)),
}


@pytest.mark.parametrize("name", OPERATORS)
def test_operator_is_orthogonal(name):
    make, shape = OPERATORS[name]
    op = make()
    A = dense(op, shape)
    eye = torch.eye(len(A), dtype=A.dtype)
    torch.testing.assert_close(A @ A.T, eye, atol=1e-6, rtol=0)
    z = torch.randn(5, *shape, dtype=torch.float64)
    torch.testing.assert_close(op.A_inv(op.A(z)), z)


def test_matrices_match_the_papers_construction():
    Q = colorization_matrix()
    torch.testing.assert_close(Q[:, 0], LUMA / LUMA.norm())
    assert (Q[:, 0] > 0).all()
    torch.testing.assert_close(Q, torch.from_numpy(openai_matrix(LUMA.numpy())))
    for p in (2, 4, 8):
        Q = superres_matrix(p)
        torch.testing.assert_close(Q[:, 0], torch.full((p * p,), 1 / p, dtype=torch.float64))
        torch.testing.assert_close(Q, torch.from_numpy(openai_matrix(np.ones(p * p))))


@pytest.mark.parametrize("name", OPERATORS)
def test_replace_keeps_known_coordinates(name):
    make, shape = OPERATORS[name]
    op = make()
    y, x = torch.randn(2, 4, *shape, dtype=torch.float64)
    out = op.replace(y, x)
    omega = op.omega(op.A(y))
    torch.testing.assert_close(op.A(out) * (1 - omega), op.A(y) * (1 - omega))
    torch.testing.assert_close(op.A(out) * omega, op.A(x) * omega)
    torch.testing.assert_close(op.project(op.project(y)), op.project(y))  # a projection


def mixture_edit(gm, y, op, solver, steps, seed=0, **kw):
    """Alg. 4 from the first sigma of a Karras grid with per-seed noise."""
    noise = SeededNoise(range(seed, seed + len(y)))
    sigmas = karras_sigmas(steps)
    x = start(y, float(sigmas[0]), noise.randn(y.shape[1:]), op)
    return edit(gm, x, sigmas, y=y, operator=op, solver=solver, noise=noise, **kw)


@pytest.mark.parametrize("loop", ["heun", "consistency"])
def test_known_part_is_exact_after_the_last_step(loop):
    gm = RandomGaussianMixture(4, resolution=8, channels=3, std=0.1, seed=3)
    y = gm.sample(6, torch.Generator().manual_seed(0))[0].float()
    den, solver = (gm, heun) if loop == "heun" else (ODEConsistency(gm, 4), multistep)
    mask = half_mask("center", 8)
    out = mixture_edit(den, y, Inpaint(mask), solver, 5)
    torch.testing.assert_close(out * (1 - mask), y * (1 - mask), atol=1e-6, rtol=0)
    out = mixture_edit(den, y, Colorize(), solver, 5)
    luma = LUMA.float().view(1, 3, 1, 1)
    torch.testing.assert_close((out * luma).sum(1), (y * luma).sum(1), atol=1e-5, rtol=0)
    assert (out - y).abs().max() > 1e-2  # chroma was generated, not copied
    out = mixture_edit(den, y, SuperRes(4), solver, 5)
    torch.testing.assert_close(patch_means(out, 4), patch_means(y, 4), atol=1e-5, rtol=0)


def test_inpainting_recovers_the_component():
    """Half the pixels masked: the nearest mean of the result is the component y came from."""
    gm = RandomGaussianMixture(10, resolution=8, channels=1, std=0.1, seed=0)
    y, k = gm.sample(200, torch.Generator().manual_seed(1))
    y, op = y.float(), Inpaint(half_mask("right", 8))
    # Diffusion solver: Heun with RePaint's jump-backs (plain replacement only reaches ~65 %).
    out = mixture_edit(gm, y, op, heun, 18, resample=10)
    assert (nearest(out, gm) == k).float().mean() >= 0.95
    # Consistency loop (Alg. 4) with the exact consistency function (PF-ODE to sigma_min).
    out = mixture_edit(ODEConsistency(gm, 4), y, op, multistep, 100)
    assert (nearest(out, gm) == k).float().mean() >= 0.95


def test_edit_does_not_depend_on_batch_size():
    gm = RandomGaussianMixture(4, resolution=8, channels=1, std=0.1, seed=1)
    y = gm.sample(8, torch.Generator().manual_seed(2))[0].float()
    op, f = Inpaint(half_mask("top", 8)), ODEConsistency(gm, 2)
    whole = mixture_edit(f, y, op, multistep, 4)
    halves = torch.cat(
        [
            mixture_edit(f, y[:3], op, multistep, 4, seed=0),
            mixture_edit(f, y[3:], op, multistep, 4, seed=3),
        ]
    )
    torch.testing.assert_close(whole, halves)


def test_sdedit_and_denoising_keep_the_component():
    gm = RandomGaussianMixture(10, resolution=8, channels=1, std=0.1, seed=0)
    y, k = gm.sample(100, torch.Generator().manual_seed(4))
    y = y.float()
    noise = SeededNoise(range(100))
    # Denoising: the input already carries noise of the known sigma; start there.
    sigma = 0.5
    noisy = y + sigma * torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    out = edit(gm, noisy, karras_sigmas(8, sigma_max=sigma), solver=heun)
    assert (nearest(out, gm) == k).float().mean() >= 0.95
    assert (out - y).pow(2).mean() < (noisy - y).pow(2).mean() / 4
    # SDEdit (Meng et al. 2022): a coarse stroke image of a mean, noised to sigma, then sampled.
    stroke = gm.means[k].float().mul(2).round().div(2)  # 5 gray levels
    sigmas = karras_sigmas(8, sigma_max=1.0)
    out = edit(gm, start(stroke, 1.0, noise.randn(y.shape[1:])), sigmas, solver=euler)
    assert (nearest(out, gm) == k).float().mean() >= 0.95
    assert not torch.allclose(out, stroke, atol=1e-3)


def test_slerp():
    z0, z1 = torch.randn(2, 3, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    u0, u1 = (z / z.flatten(1).norm(dim=1).view(-1, 1, 1, 1) for z in (z0, z1))
    mid = slerp(u0, u1, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    torch.testing.assert_close(mid.flatten(1).norm(dim=1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(slerp(u0, u0, 0.3), u0)  # parallel: no division by sin(0)


def test_resample_is_for_diffusion_solvers():
    gm = RandomGaussianMixture(2, resolution=4, channels=1, std=0.1)
    y = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="diffusion solvers"):
        edit(gm, y, karras_sigmas(2), y=y, operator=Inpaint(half_mask("left", 4)), resample=2)


# -- cm edit ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return last_ckpt(fit(tmp_path_factory.mktemp("edit_run"), 2))


def write_digits(folder, n, size=8):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"img{i}.png")
    return images


def read_png(path):
    from PIL import Image

    return np.asarray(Image.open(path))


def test_cli_inpaint(tiny_ckpt, tmp_path):
    from PIL import Image

    from cm.commands.edit import edit_main

    images = write_digits(tmp_path / "in", 3)
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 5:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = [
        "--ckpt_path",
        str(tiny_ckpt),
        "--task",
        "inpaint",
        "--input",
        str(tmp_path / "in"),
        "--mask",
        str(tmp_path / "mask.png"),
        "--steps",
        "2",
        "--device",
        "cpu",
    ]
    out = edit_main([*common, "--out", str(tmp_path / "a"), "--batch_size", "3"])
    results = [read_png(out / f"img{i}.png") for i in range(3)]
    for a, r in zip(images, results, strict=True):
        assert r.shape == (8, 8)
        np.testing.assert_array_equal(r[:, :5], a[:, :5])  # the kept pixels, exactly
    assert (out / "side_by_side_0000.png").is_file()
    assert not list(out.glob(".*tmp*"))
    # Same seeds, other batch size: the same edits.
    out2 = edit_main([*common, "--out", str(tmp_path / "b"), "--batch_size", "2"])
    for i in range(3):
        np.testing.assert_array_equal(read_png(out2 / f"img{i}.png"), results[i])
    assert (out2 / "side_by_side_0001.png").is_file()


def test_cli_other_tasks(tiny_ckpt, tmp_path):
    from cm.commands.edit import edit_main

    write_digits(tmp_path / "in", 2)
    write_digits(tmp_path / "low", 1, size=4)
    base = ["--ckpt_path", str(tiny_ckpt), "--steps", "2", "--device", "cpu"]
    out = edit_main(
        [
            *base,
            "--task",
            "superres",
            "--patch",
            "2",
            "--input",
            str(tmp_path / "low" / "img0.png"),
            "--out",
            str(tmp_path / "sr"),
        ]
    )
    low = read_png(tmp_path / "low" / "img0.png").astype(float)
    high = read_png(out / "img0.png").astype(float)
    means = high.reshape(4, 2, 4, 2).mean((1, 3))
    assert np.abs(means - low).max() <= 1.0  # patch means kept, up to uint8 rounding
    out = edit_main(
        [
            *base,
            "--task",
            "sdedit",
            "--sigma",
            "0.5",
            "--input",
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "sd"),
        ]
    )
    assert len(list(out.glob("img*.png"))) == 2
    out = edit_main(
        [
            *base,
            "--task",
            "interpolate",
            "--seed",
            "3",
            "--seed2",
            "4",
            "--num_interp",
            "4",
            "--out",
            str(tmp_path / "it"),
        ]
    )
    strip = [read_png(out / f"interp_{i:03d}.png") for i in range(4)]
    assert (out / "interpolation.png").is_file() and not np.array_equal(strip[0], strip[-1])


@pytest.mark.parametrize(
    "extra, error, match",
    [
        (
            ["--task", "inpaint", "--input", "missing.png", "--mask", "left"],
            FileNotFoundError,
            "does not exist",
        ),
        (["--task", "inpaint", "--input", "{big}", "--mask", "left"], ValueError, "needs 8x8"),
        (["--task", "inpaint", "--input", "{img}", "--mask", "{bigmask}"], ValueError, "needs 8x8"),
        (["--task", "inpaint", "--input", "{img}"], ValueError, "needs --mask"),
        (["--task", "colorize", "--input", "{img}"], ValueError, "3-channel"),
        (["--task", "sdedit", "--input", "{img}"], ValueError, "needs --sigma"),
        (["--task", "superres", "--input", "{img}", "--patch", "3"], ValueError, "divide"),
    ],
)
def test_cli_errors(tiny_ckpt, tmp_path, extra, error, match):
    from cm.commands.edit import edit_main

    write_digits(tmp_path / "in", 1)
    write_digits(tmp_path / "big", 1, size=16)
    paths = {
        "img": tmp_path / "in" / "img0.png",
        "big": tmp_path / "big" / "img0.png",
        "bigmask": tmp_path / "big" / "img0.png",
    }
    extra = [e.format(**paths) for e in extra]
    with pytest.raises(error, match=match):
        edit_main(["--ckpt_path", str(tiny_ckpt), "--out", str(tmp_path / "o"), *extra])
    assert not (tmp_path / "o").exists()  # nothing written


def test_cli_rejects_unknown_task(tiny_ckpt):
    from cm.commands.edit import edit_main

    with pytest.raises(ArgumentError, match="deblur"):
        edit_main(["--ckpt_path", str(tiny_ckpt), "--task", "deblur", "--input", "x.png"])
