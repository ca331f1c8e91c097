"""Sharded training: ``cm.training.FSDP``, PyTorch FSDP2 (``fully_shard``) over every process.

Lightning 2.6 runs FSDP2 through ``ModelParallelStrategy``, which leaves the sharding to the
LightningModule's ``configure_model``; cm's modules all inherit one (``ConfiguredModule``) that
calls ``FSDP.shard``. What is sharded follows one rule: every *trainable* network (a submodule
whose parameters all train: the denoiser, Diffusion2GAN's generator and discriminator, sCM's
weighting head) is sharded, unit by unit (``units``); *frozen* networks stay replicated on
every rank: the evaluation EMA (so rank 0 samples grids alone, as under DDP), CD's target
network, frozen teachers and feature networks. The frozen copies that follow a trained network
(EMA, target) are blended from its gathered weights (``cm.ema.lerp_``).

``ModelParallelStrategy`` as is would make a data-parallel x tensor-parallel mesh of
``num_nodes x devices`` (no sharding within a node); ``FSDP`` makes the whole world one
data-parallel (sharding) dimension.
"""

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from cm.errors import UserError
from cm.sharded import check_metadata, is_sharded

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


class FSDP(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2; Zhao et al. 2023, ZeRO-3) over all ranks.

    Parameters, gradients and optimizer states of the trainable networks are split across the
    ranks; each block's weights are all-gathered for its forward and backward and freed after,
    and gradients are reduce-scattered (averaged, as DDP). Checkpoints are directories with one
    shard per rank (``save_distributed_checkpoint``); ``cm consolidate`` turns one into a single
    ``.ckpt``. Works on GPUs (NCCL) and CPUs (gloo).

    Args:
        reshard_after_forward: free each block's gathered weights after its forward (least
            memory; gathers them again for the backward); False keeps them until the backward
            (ZeRO-2 memory, one all-gather fewer per step).
        min_block_params: a block (an item of a network's ``ModuleList``/``ModuleDict``/
            ``Sequential``: ADM's and NCSN++'s U-Net blocks, DiT's transformer blocks) with fewer
            parameters is gathered with its parent instead of on its own: fewer, larger
            collectives.
        save_distributed_checkpoint: each rank writes its shards into a checkpoint directory
            (``last.ckpt/``); False gathers the whole state into one ``.ckpt`` file on rank 0
            (which must then hold it all in CPU memory).
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs unless given.
        timeout: how long a collective waits for the other ranks.
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        min_block_params: int = 0,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.reshard_after_forward = reshard_after_forward
        self.min_block_params = min_block_params

    def setup_environment(self) -> None:
        """One data-parallel mesh dimension over all ranks (no tensor parallelism)."""
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, module: nn.Module) -> None:
        """``fully_shard`` the trainable networks of ``module`` (idempotent); the rest stays."""
        mesh = self.device_mesh["data_parallel"]
        networks = trainable_networks(module)
        for network in networks:
            shard_network(network, mesh, self.reshard_after_forward, self.min_block_params)
        loose = [n for n, p in module.named_parameters() if p.requires_grad and not _sharded(p)]
        if loose:  # their gradients would not be synchronised: the ranks would drift apart
            raise RuntimeError(f"Trainable parameters left unsharded by cm.training.FSDP: {loose}")
        names = {id(m): n for n, m in module.named_modules()}
        units = sum(isinstance(m, FSDPModule) for m in module.modules())
        rank_zero_info(
            f"FSDP over {mesh.size()} ranks: sharded {', '.join(names[id(n)] for n in networks)} "
            f"({units} units); every other parameter is replicated."
        )

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Write a sharded checkpoint beside ``filepath``, then move it in place (rank 0).

        Lightning writes the shards straight into ``filepath``: a run killed while overwriting
        ``last.ckpt/`` would leave old and new shards mixed. Here the old directory stays whole
        until the new one is complete.
        """
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        if self.is_global_zero:
            _remove(partial)  # left by a run killed while saving
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()  # every rank's shards are written
        if self.is_global_zero:
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            if path.exists() or path.is_symlink():
                path.rename(old)
            partial.rename(path)
            _remove(old)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        """Resume from a sharded directory (its metadata checked first) or a single ``.ckpt``."""
        path = Path(checkpoint_path)
        if is_sharded(path):
            check_metadata(path)  # DCP unpickles it: refuse anything but DCP's own classes
        return super().load_checkpoint(checkpoint_path, weights_only)


def _remove(path: Path) -> None:
    """Delete a file, link or directory tree at ``path`` if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _called(module: nn.Module) -> bool:
    """Whether ``module`` has a ``forward`` (an FSDP unit gathers its weights there).

    Containers without one (``ModuleList``, NCSN++'s ``Level``) are iterated by their parent,
    which calls their items: the items are units, the container is not.
    """
    return type(module).forward is not nn.Module.forward


def _sharded(parameter: nn.Parameter) -> bool:
    """Whether ``parameter`` is a shard (a ``DTensor``) of FSDP2."""
    return isinstance(parameter, DTensor)


def trainable_networks(module: nn.Module) -> list[nn.Module]:
    """The largest submodules of ``module`` whose parameters all train, each once.

    A submodule that holds frozen and trainable parameters (a discriminator on a frozen
    backbone) is searched further down; one whose parameters are all frozen (EMA copy, CD
    target, a frozen feature network) is left out, to stay replicated.
    """
    found: dict[int, nn.Module] = {}
    for child in module.children():
        params = list(child.parameters())
        if params and all(p.requires_grad for p in params):
            found.setdefault(id(child), child)
        elif any(p.requires_grad for p in params):
            for network in trainable_networks(child):
                found.setdefault(id(network), network)
            own = [n for n, p in child.named_parameters(recurse=False) if p.requires_grad]
            if own:
                raise UserError(
                    f"cm.training.FSDP cannot shard {type(child).__name__}: it holds trainable "
                    f"parameters ({', '.join(own)}) beside frozen submodules; train it with "
                    "trainer.strategy=ddp."
                )
    return list(found.values())


def blocks(network: nn.Module, min_params: int = 0) -> list[nn.Module]:
    """The FSDP units inside ``network``: items of its module containers, outermost first.

    Items with fewer than ``min_params`` parameters, or without a ``forward`` of their own, are
    searched further down (their own containers' items may qualify); what is left is gathered
    with the enclosing unit.
    """
    found: list[nn.Module] = []

    def visit(parent: nn.Module) -> None:
        for child in parent.children():
            size = sum(p.numel() for p in child.parameters())
            if isinstance(parent, _CONTAINERS) and size >= max(min_params, 1) and _called(child):
                found.append(child)  # a block: its inside is gathered with it
            else:
                visit(child)

    visit(network)
    return found


def units(network: nn.Module, min_params: int = 0) -> list[nn.Module]:
    """The FSDP units inside ``network``, inner before outer (``network`` itself excluded).

    The ``blocks``, then every other module with parameters of its own and a ``forward``
    (embeddings, input and output layers, a network holding a positional embedding): each
    unit gathers its weights in its own forward, so a network used piecewise still works
    (sCM's ``trigflow_flow`` calls ``denoiser.net``, a Diffusion2GAN discriminator calls its
    network's embeddings and blocks one by one).
    """
    found = blocks(network, min_params)
    inside = {id(m) for block in found for m in block.modules()}
    for module in reversed(list(network.modules())):  # children before their parents
        own = any(True for _ in module.parameters(recurse=False))
        if module is not network and id(module) not in inside and own and _called(module):
            found.append(module)
    return found


def shard_network(
    network: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True, min_params: int = 0
) -> None:
    """``fully_shard`` each of ``units(network)``, then ``network`` (what is left)."""
    if isinstance(network, FSDPModule):
        return  # configure_model runs again for validate/test after fit
    for unit in units(network, min_params):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(network, mesh=mesh, reshard_after_forward=reshard_after_forward)
