"""Networks: raw ``F(x, c_noise, labels)`` backbones, wrapped by ``cm.precond``."""

from cm.networks.adm import ADMUNet
from cm.networks.amed import AMEDPredictor
from cm.networks.discriminator import ADMDiscriminator, NCSNppDiscriminator, UNetDiscriminator
from cm.networks.latent_vgg import LatentVGG16BN
from cm.networks.ncsnpp import NCSNpp
from cm.networks.sd_discriminator import SDDiscriminator
from cm.networks.stable_diffusion import StableDiffusionDenoiser, load_unet
from cm.networks.text import TextEncoder

__all__ = [
    "ADMDiscriminator",
    "ADMUNet",
    "AMEDPredictor",
    "LatentVGG16BN",
    "NCSNpp",
    "NCSNppDiscriminator",
    "SDDiscriminator",
    "StableDiffusionDenoiser",
    "TextEncoder",
    "UNetDiscriminator",
    "load_unet",
]
