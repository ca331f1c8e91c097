"""cm: train and sample few-step generative models (diffusion, CM, Diffusion2GAN)."""

__version__ = "0.1.0"
