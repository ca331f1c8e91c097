"""Speed features: no graph breaks in the UNets, fp32 preconditioning under bf16, Compile in fit."""

import numpy as np
import pytest
import torch
from helpers import cpu_trainer, fit, tiny_adm, tiny_ncsnpp
from torch._dynamo.utils import counters

from cm.cli import main
from cm.precond import ConsistencyPrecond, EDMPrecond, VPPrecond
from cm.training.speed import Compile, find_submodule, prepare

X, SIGMA, ONE_HOT = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 10.0]), torch.eye(10)[:2]
CASES = {
    "adm_labels": (lambda: ConsistencyPrecond(tiny_adm()), ONE_HOT),
    "adm_cross_attention": (
        lambda: EDMPrecond(tiny_adm(label_dim=0, context_dim=8)),
        torch.randn(2, 5, 8),
    ),
    "adm_vp": (lambda: VPPrecond(tiny_adm(), num_timesteps=100), ONE_HOT),
    "ncsnpp": (lambda: EDMPrecond(tiny_ncsnpp()), ONE_HOT),
    "ncsnpp_residual_skip_fourier": (
        lambda: EDMPrecond(
            tiny_ncsnpp(encoder_type="residual", decoder_type="skip", embedding_type="fourier")
        ),
        ONE_HOT,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_no_graph_breaks(case):
    """Dynamo traces the whole denoiser (preconditioner + UNet) as one graph."""
    build, labels = CASES[case]
    torch.manual_seed(0)
    denoiser = build()
    explained = torch._dynamo.explain(denoiser)(X, SIGMA, labels)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def randomize(net: torch.nn.Module) -> torch.nn.Module:
    """Non-zero weights everywhere (zero-initialised output layers would hide the network)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net


@pytest.mark.parametrize("precond", [EDMPrecond, ConsistencyPrecond])
def test_bf16_autocast_keeps_fp32_preconditioning(precond):
    """EDM casts F_x to float32: under bf16 autocast only the network runs in bf16."""
    denoiser = precond(randomize(tiny_adm()))
    reference = denoiser(X, SIGMA, ONE_HOT)
    with torch.autocast("cpu", torch.bfloat16):
        c_skip, c_out, c_in, c_noise = denoiser.scalings(SIGMA.reshape(-1, 1, 1, 1))
        raw = denoiser.net(X, SIGMA.log(), ONE_HOT)
        out = denoiser(X, SIGMA, ONE_HOT)
    assert raw.dtype == torch.bfloat16  # autocast is really on for the network
    assert {t.dtype for t in (c_skip, c_out, c_in, c_noise, out)} == {torch.float32}
    error = (out - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05  # bf16 rounding, nothing worse


def test_prepare_keeps_state_dict_and_matches_eager():
    """Compiled + channels-last network: same keys, same outputs, NHWC weights."""
    net = randomize(tiny_adm())
    eager = {k: v.clone() for k, v in net.state_dict().items()}
    reference = net(X, SIGMA.log(), ONE_HOT)
    prepare(net, backend="aot_eager", channels_last=True)
    assert list(net.state_dict()) == list(eager) and net._compiled_call_impl is not None
    assert net.encoder[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(net(X, SIGMA.log(), ONE_HOT), reference, rtol=1e-4, atol=1e-5)


def test_find_submodule_error():
    module = torch.nn.Module()
    module.denoiser = EDMPrecond(tiny_adm(label_dim=0))
    assert find_submodule(module, "denoiser.net") is module.denoiser.net
    with pytest.raises(ValueError, match="has no submodule 'discriminator.net'"):
        find_submodule(module, "discriminator.net")
    assert Compile().modules == ["denoiser.net"]


def test_compiled_fit_checkpoint_samples(tmp_path):
    """A 2-step ``cm fit`` with Compile (aot_eager) writes a checkpoint that ``cm sample`` reads."""
    override = tmp_path / "compile.yaml"
    override.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: cm.training.SampleGrid\n"
        "      init_args: {every_n_steps: 0, num: 4, final_num: 6}\n"
        "    - class_path: cm.training.speed.Compile\n"
        "      init_args: {backend: aot_eager, channels_last: true}\n"
    )
    root = tmp_path / "run"
    counters.clear()
    fit(root, 2, "--config", str(override))
    assert counters["stats"]["unique_graphs"] >= 1  # the network ran compiled
    ckpt = next(root.glob("**/checkpoints/*.ckpt"))
    keys = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in keys) and "denoiser.net.out_conv.weight" in keys
    out = tmp_path / "eager.npz"
    main(["sample", "--ckpt_path", str(ckpt), "--num", "6", "--out", str(out)])
    fitted = np.load(next(root.glob("**/samples/samples.npz")))["arr_0"].astype(int)
    # Compiled (fit) and eager (sample) EMA networks: the same images up to rounding.
    assert np.abs(np.load(out)["arr_0"].astype(int) - fitted).max() <= 1
    bench = tmp_path / "bench.csv"
    args = ["--heun_steps", "2", "--batch_size", "2", "--warmup", "0", "--repeats", "1"]
    main(["bench", "sample", "--ckpt_path", str(ckpt), *args, "--out", str(bench)])
    assert [r.split(",")[:2] for r in bench.read_text().splitlines()[1:]] == [
        ["onestep", "1"],
        ["heun", "3"],
    ]


def test_compile_diffusion2gan_generator_with_r1(tmp_path):
    """Compile G's network under manual optimisation with R1 (D stays eager); D + R1 is refused."""
    from cm.networks.discriminator import ADMDiscriminator
    from cm.objectives import SquaredL2
    from cm.training.diffusion2gan import Diffusion2GANModule

    torch.manual_seed(0)
    module = Diffusion2GANModule(
        EDMPrecond(tiny_adm(num_groups=8)),
        SquaredL2(),
        ADMDiscriminator(tiny_adm(num_groups=8), num_groups=8),
        teacher=EDMPrecond(tiny_adm(num_groups=8)),
        lambda_gan=0.5,
        r1_interval=1,
    )
    g = torch.Generator().manual_seed(1)
    z, x = torch.randn(8, 1, 8, 8, generator=g), torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(z, x, torch.eye(10)[torch.arange(8)]), batch_size=4
    )

    counters.clear()
    cpu_trainer(tmp_path, Compile(backend="aot_eager"), max_steps=2).fit(module, data)
    assert module.iteration == 2 and counters["stats"]["unique_graphs"] >= 1
    assert module.denoiser.net._compiled_call_impl is not None
    both = Compile(["denoiser.net", "discriminator"], backend="aot_eager")
    with pytest.raises(ValueError, match="cannot take R1's double backward"):
        cpu_trainer(tmp_path, both, max_steps=2).fit(module, data)
