"""Networks: raw ``F(x, c_noise, labels)`` backbones, wrapped by ``cm.precond``."""

from cm.networks.adm import ADMUNet
from cm.networks.amed import AMEDPredictor
from cm.networks.discriminator import ADMDiscriminator, NCSNppDiscriminator, UNetDiscriminator
from cm.networks.dit import DiT, SiT
from cm.networks.latent_vgg import LatentVGG16BN
from cm.networks.ncsnpp import NCSNpp
from cm.networks.sd_discriminator import SDDiscriminator
from cm.networks.stable_diffusion import StableDiffusionDenoiser, load_unet
from cm.networks.text import TextEncoder

__all__ = [
    "ADMDiscriminator",
    "ADMUNet",
    "AMEDPredictor",
    "DiT",
    "LatentVGG16BN",
    "NCSNpp",
    "NCSNppDiscriminator",
    "SDDiscriminator",
    "SiT",
    "StableDiffusionDenoiser",
    "TextEncoder",
    "UNetDiscriminator",
    "load_unet",
]
