"""Networks: raw ``F(x, c_noise, labels)`` backbones, wrapped by ``cm.precond``."""

from cm.networks.adm import ADMUNet

__all__ = ["ADMUNet"]
