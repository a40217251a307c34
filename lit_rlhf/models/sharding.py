"""FSDP2: :func:`shard` a model over a device mesh, tell whether it :func:`is_sharded`, and gather its
:func:`full_state_dict` for the export."""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor
from transformers import PreTrainedModel


def shard(module: torch.nn.Module, mesh) -> torch.nn.Module:
    """FSDP2 (``fully_shard``) over the device ``mesh``: every transformer block on its own (the classes the Hugging
    Face models inside name in ``_no_split_modules``), then the rest with ``module`` as the root, so that calling
    ``module`` gathers what its forward needs, one block at a time."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    block_names = {
        name for sub in module.modules() if isinstance(sub, PreTrainedModel) for name in sub._no_split_modules or ()
    }
    for block in [sub for sub in module.modules() if type(sub).__name__ in block_names]:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def is_sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(parameter, DTensor) for parameter in module.parameters())


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights of a sharded ``module`` on the CPU of rank 0 (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
