"""Data-parallel plumbing for the trainers: the process group under ``torchrun``.

:func:`join_process_group` finds (or creates) the process group and this
process's device; :class:`Ranks` says where this process stands and gives the
three collectives a trainer needs (a sum, an agreement, rank 0's values),
each a no-op in a world of one, so that a trainer's code reads the same with
one process or many. :func:`check_same_everywhere` refuses a run whose
processes were given different inputs, and :func:`data_parallel` wraps a model
in :class:`~torch.nn.parallel.DistributedDataParallel`.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Ranks", "check_same_everywhere", "data_parallel", "join_process_group", "summary"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in data-parallel training (``world_size == 1``: alone)."""

    world_size: int = 1
    rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, values: torch.Tensor, op=None) -> torch.Tensor:
        """``values`` combined in place over every process (summed unless ``op`` says otherwise)."""
        if self.distributed:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM if op is None else op)
        return values

    def all_agree(self, ok: bool, device: torch.device) -> bool:
        """Whether ``ok`` holds on every process (a collective: call it on all of them)."""
        if not self.distributed:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=device)
        return bool(self.all_reduce(flag, torch.distributed.ReduceOp.MIN).item())

    def from_main(self, values: torch.Tensor) -> torch.Tensor:
        """``values``, in place, as the main process (rank 0) holds them."""
        if self.distributed:
            torch.distributed.broadcast(values, src=0)
        return values


def _environment_world() -> tuple[int, int]:
    """``(WORLD_SIZE, RANK)`` as torchrun sets them; ``ValueError`` when they cannot start a group."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if world_size > 1 and missing:
        raise ValueError(
            f"WORLD_SIZE={world_size} asks for data-parallel training, but the environment lacks "
            f"{', '.join(missing)}: start the script with torchrun, or pass distributed=False"
        )
    return world_size, int(os.environ.get("RANK", "0"))


def _rank_device(device: torch.device, rank: int) -> torch.device:
    """The device of process ``rank``: with ``"cuda"`` and no index, GPU ``LOCAL_RANK`` of its node."""
    if device.type == "cuda" and device.index is None:
        local_rank = os.environ.get("LOCAL_RANK")
        index = int(local_rank) if local_rank is not None else rank % max(torch.cuda.device_count(), 1)
        device = torch.device("cuda", index)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def join_process_group(distributed: bool, device: torch.device) -> tuple[Ranks, torch.device]:
    """Find (or, under torchrun, create) the process group, and the device for this rank.

    Outside ``torchrun`` and without an initialised process group of more than
    one process, returns a world of one and ``device`` unchanged. A group it
    creates uses ``nccl`` on CUDA and ``gloo`` otherwise, and is left
    initialised for later calls.
    """
    if not distributed or not torch.distributed.is_available():
        return Ranks(), device
    td = torch.distributed
    initialised = td.is_initialized()
    world_size, rank = (td.get_world_size(), td.get_rank()) if initialised else _environment_world()
    if world_size <= 1:
        return Ranks(), device
    device = _rank_device(device, rank)
    if not initialised:
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        world_size, rank = td.get_world_size(), td.get_rank()
    if td.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(
            f"the process group uses nccl, which needs CUDA tensors, but the device is {device}; pass device='cuda'"
        )
    return Ranks(world_size, rank), device


def summary(tensor: torch.Tensor) -> list[float]:
    """Numbers that tell two tensors apart (shape, sum, and a sum weighted by row)."""
    rows = tensor.double().reshape(len(tensor), -1)
    weights = torch.arange(1, len(rows) + 1, dtype=torch.float64, device=rows.device)[:, None]
    return [float(n) for n in tensor.shape] + [rows.sum().item(), (rows * weights).sum().item()]


def check_same_everywhere(numbers: list[float], ranks: Ranks, device: torch.device, who: str) -> None:
    """Raise ``ValueError`` on every process unless they all passed the same ``numbers``."""
    if not ranks.distributed:
        return
    mine = torch.tensor(numbers, dtype=torch.float64, device=device)
    main = ranks.from_main(mine.clone())
    if not ranks.all_agree(torch.equal(mine, main), device):
        raise ValueError(
            f"{who} runs data-parallel over {ranks.world_size} processes, and every process must pass the same "
            "data, validation_data and arguments (each takes its share of every batch itself); "
            "they differ between processes"
        )


def data_parallel(model: nn.Module, device: torch.device, sync_buffers: bool) -> nn.Module:
    """``model`` wrapped in DDP; buffers re-broadcast from rank 0 before every forward only if ``sync_buffers``."""
    ddp = nn.parallel.DistributedDataParallel
    parameters = inspect.signature(ddp).parameters
    keyword = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{keyword: sync_buffers})
