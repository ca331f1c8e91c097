"""Networks: raw ``F(x, c_noise, labels)`` backbones, wrapped by ``cm.precond``."""

from cm.networks.adm import ADMUNet
from cm.networks.amed import AMEDPredictor
from cm.networks.ncsnpp import NCSNpp

__all__ = ["ADMUNet", "AMEDPredictor", "NCSNpp"]
