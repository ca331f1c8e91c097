"""The Lightning shell: modules, data modules and callbacks (the only layer importing lightning)."""

from cm.training.amed import AMEDModule
from cm.training.callbacks import SampleGrid, Throughput
from cm.training.datamodule import ImageDataModule
from cm.training.diffusion2gan import Diffusion2GANModule
from cm.training.metrics import GenerativeMetrics
from cm.training.module import DenoiserModule
from cm.training.pair_data import PairDataModule, PairDataset
from cm.training.pairs import PairGenerator, PairSeedDataModule, PairWriter
from cm.training.prediction import NpzWriter, SeedDataModule
from cm.training.resilience import Preemption
from cm.training.sharding import FSDP
from cm.training.speed import Compile

__all__ = [
    "AMEDModule",
    "Compile",
    "DenoiserModule",
    "FSDP",
    "Diffusion2GANModule",
    "GenerativeMetrics",
    "ImageDataModule",
    "NpzWriter",
    "PairDataModule",
    "PairDataset",
    "PairGenerator",
    "PairSeedDataModule",
    "PairWriter",
    "Preemption",
    "SampleGrid",
    "SeedDataModule",
    "Throughput",
]
